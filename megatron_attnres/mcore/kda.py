"""Kimi Delta Attention (KDA), the 'G' mixer of Kimi Linear, as a tensor-parallel Megatron module.

Per token x (the layer's pre-normed input), following transformers' `KimiLinearDeltaAttention`:

    q, k, v = silu(causal depthwise conv(W_q x)), ... (H heads of D channels each)
    g       = -exp(A_log[h]) * softplus(W_fb W_fa x + dt_bias)        per channel, fp32 (log decay)
    beta    = sigmoid(W_b x)                                            per head
    o       = KDA(l2norm(q), l2norm(k), v, g, beta), scale D^-0.5      (the fla-core operator)
    o       = rms_norm(o) * o_norm.weight * sigmoid(W_gb W_ga x)         per head, fp32
    y       = W_o o

Tensor parallelism splits the heads: q/k/v/f_b/g_b/b projections are column-parallel, o_proj is
row-parallel, and the per-head parameters (A_log, dt_bias, conv weights) hold this rank's heads.
The low-rank down projections f_a and g_a (width D) are column-parallel too and their outputs are
gathered, as Megatron's MLA does with its down projections, so every weight has exactly one owner
and its gradient needs no extra reduction. `o_norm.weight` is replicated: its gradient is summed
over the tensor-parallel ranks (each sees its own heads) by `copy_to_tensor_model_parallel_region`.
"""

import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
    sharded_state_dict_default,
)
from torch import nn

L2NORM_EPS = 1e-6  # fla's l2norm: x / sqrt(sum(x^2) + eps), as chunk_kda applies it in-kernel
A_INIT_RANGE = (1.0, 16.0)  # A = exp(A_log) ~ U(1, 16) (fla / Kimi)
DT_INIT_RANGE = (1e-3, 1e-1)  # dt log-uniform; dt_bias = softplus^-1(dt) (Mamba / GDN)


def kda_operator(q, k, v, g, beta):
    """Kimi Delta Attention on [b, t, h, d] tensors (g: fp32 log decay, beta: [b, t, h]).

    L2-normalises q and k and scales by d^-0.5. CUDA tensors go through fla-core's Triton
    `chunk_kda` (normalisation fused in the kernel). CPU tensors go through fla-core's pure
    PyTorch token recurrence `naive_recurrent_kda` (differentiable by autograd) after the same
    normalisation: its PyTorch chunked form `naive_chunk_kda` multiplies by exp(+cumulative decay)
    inside a chunk, which overflows to inf (and NaN gradients) once a channel forgets fast
    (a log decay of -7 per token over a 16-token chunk already does), while the recurrence only
    ever multiplies by exp(g) <= 1; on CPU it is also no slower (t steps either way).
    """
    scale = q.shape[-1] ** -0.5
    if q.is_cuda:
        from fla.ops.kda import chunk_kda

        q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
        out, _ = chunk_kda(q, k, v, g, beta, scale=scale, use_qk_l2norm_in_kernel=True)
        return out
    from fla.ops.kda.naive import naive_recurrent_kda

    def l2norm(x):
        x = x.float()
        return x * torch.rsqrt(x.square().sum(-1, keepdim=True) + L2NORM_EPS)

    out, _ = naive_recurrent_kda(l2norm(q), l2norm(k), v, g, beta, scale=scale)
    return out


def _tp_split(param: torch.Tensor) -> torch.Tensor:
    """Mark a parameter as split along dim 0 over the tensor-parallel ranks (by heads)."""
    param.tensor_model_parallel = True
    param.partition_dim = 0
    param.partition_stride = 1
    return param


class KimiDeltaAttention(MegatronModule):
    """The KDA mixer as a TransformerLayer's `self_attention`: [s, b, h] -> ([s, b, h], None).

    Config fields (Megatron's linear-attention names): `linear_num_key_heads` (H, for q, k and v),
    `linear_key_head_dim` (D, also the value head dim and the low-rank gate width),
    `linear_conv_kernel_dim` (short convolution length).
    """

    def __init__(self, config, layer_number: int = 1, pg_collection=None, **unused):
        super().__init__(config=config)
        self.layer_number = layer_number
        self.tp_group = pg_collection.tp if pg_collection is not None else None
        if self.tp_group is None:
            self.tp_group = ps.get_tensor_model_parallel_group()
        tp = self.tp_group.size()
        heads, dim = config.linear_num_key_heads, config.linear_key_head_dim
        _check_kda_shape(config, heads, dim, tp)
        self.heads, self.head_dim, self.kernel = heads // tp, dim, config.linear_conv_kernel_dim
        self.eps = config.layernorm_epsilon
        width = heads * dim
        column = self._column
        self.q_proj, self.k_proj, self.v_proj = (column(config.hidden_size, width) for _ in "qkv")
        self.q_conv1d, self.k_conv1d, self.v_conv1d = (self._conv() for _ in "qkv")
        self.f_a_proj, self.f_b_proj = column(config.hidden_size, dim), column(dim, width)
        self.b_proj = column(config.hidden_size, heads)
        self.g_a_proj, self.g_b_proj = column(config.hidden_size, dim), column(dim, width)
        self.o_norm = nn.Module()
        self.o_norm.weight = nn.Parameter(torch.ones(dim, **self._factory()))
        self.A_log = _tp_split(nn.Parameter(torch.empty(self.heads, **self._factory())))
        self.dt_bias = _tp_split(nn.Parameter(torch.empty(self.heads * dim, **self._factory())))
        self.o_proj = RowParallelLinear(
            width,
            config.hidden_size,
            config=config,
            init_method=config.output_layer_init_method,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=True,
            tp_group=self.tp_group,
        )
        if config.perform_initialization:
            self.reset_parameters()

    def _factory(self) -> dict:
        device = "cpu" if self.config.use_cpu_initialization else torch.cuda.current_device()
        return dict(dtype=self.config.params_dtype, device=device)

    def _column(self, fan_in: int, fan_out: int) -> ColumnParallelLinear:
        return ColumnParallelLinear(
            fan_in,
            fan_out,
            config=self.config,
            init_method=self.config.init_method,
            bias=False,
            gather_output=False,
            tp_group=self.tp_group,
        )

    def _conv(self) -> nn.Conv1d:
        channels = self.heads * self.head_dim
        conv = nn.Conv1d(
            channels, channels, self.kernel, groups=channels, bias=False, **self._factory()
        )
        _tp_split(conv.weight)
        return conv

    def reset_parameters(self) -> None:
        """Kimi/fla init on the GLOBAL tensors, then this rank's heads, so that every TP size
        starts from the same model: A = U(1, 16), dt_bias = softplus^-1(dt) with dt log-uniform
        in [1e-3, 1e-1], conv weights by `init_method`, o_norm weight 1."""
        rank, tp = self.tp_group.rank(), self.tp_group.size()
        heads, dim = self.heads * tp, self.head_dim
        a = torch.empty(heads).uniform_(*A_INIT_RANGE)
        low, high = (math.log(x) for x in DT_INIT_RANGE)
        dt = torch.exp(torch.empty(heads * dim).uniform_(low, high)).clamp(min=1e-4)
        dt_bias = dt + torch.log(-torch.expm1(-dt))  # inverse of softplus
        with torch.no_grad():
            self.A_log.copy_(a.log().chunk(tp)[rank])
            self.dt_bias.copy_(dt_bias.chunk(tp)[rank])
            for conv in (self.q_conv1d, self.k_conv1d, self.v_conv1d):
                full = torch.empty(heads * dim, 1, self.kernel)
                self.config.init_method(full)
                conv.weight.copy_(full.chunk(tp)[rank])
            self.o_norm.weight.fill_(1.0)

    def _short_conv(self, x, conv: nn.Conv1d):
        """silu(causal depthwise conv) over the sequence: [s, b, c] -> [b, s, heads, d]."""
        seq = x.shape[0]
        y = F.conv1d(x.permute(1, 2, 0), conv.weight, padding=self.kernel - 1, groups=x.shape[-1])
        y = F.silu(y[..., :seq]).transpose(1, 2)
        return y.reshape(*y.shape[:2], self.heads, self.head_dim)

    def _low_rank(self, x, down: ColumnParallelLinear, up: ColumnParallelLinear):
        """up(down(x)) with `down` split over TP: its output is gathered (and, under sequence
        parallelism, re-split along the sequence for `up`, which gathers it), as in Megatron MLA.
        Returns [b, s, heads, d] (full sequence)."""
        latent = gather_from_tensor_model_parallel_region(down(x)[0], group=self.tp_group)
        if self.config.sequence_parallel:
            latent = scatter_to_sequence_parallel_region(latent, group=self.tp_group)
        y = up(latent)[0].transpose(0, 1)
        return y.reshape(*y.shape[:2], self.heads, self.head_dim)

    def _gated_norm(self, o, gate):
        """KimiLinearRMSNormGated per head, in fp32: rms_norm(o) * weight * sigmoid(gate)."""
        weight = copy_to_tensor_model_parallel_region(self.o_norm.weight, group=self.tp_group)
        normed = F.rms_norm(o.float(), (self.head_dim,), weight.float(), self.eps)
        return (normed * torch.sigmoid(gate.float())).to(o.dtype)

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        inference_context=None,
        packed_seq_params=None,
        **unused,
    ):
        if inference_context is not None or packed_seq_params is not None:
            raise NotImplementedError(
                "KimiDeltaAttention supports training-style full sequences only; got "
                f"inference_context={inference_context!r}, packed_seq_params={packed_seq_params!r}"
            )
        x = hidden_states  # [s/tp under sequence parallelism, b, h]; the linears gather it
        q = self._short_conv(self.q_proj(x)[0], self.q_conv1d)
        k = self._short_conv(self.k_proj(x)[0], self.k_conv1d)
        v = self._short_conv(self.v_proj(x)[0], self.v_conv1d)
        decay_rate = torch.exp(self.A_log.float())[:, None]  # [heads, 1]
        dt_bias = self.dt_bias.float().view(self.heads, self.head_dim)
        g = -decay_rate * F.softplus(
            self._low_rank(x, self.f_a_proj, self.f_b_proj).float() + dt_bias
        )
        beta = torch.sigmoid(self.b_proj(x)[0]).transpose(0, 1)  # [b, s, heads]
        o = kda_operator(q, k, v, g, beta)
        o = self._gated_norm(o, self._low_rank(x, self.g_a_proj, self.g_b_proj))
        o = o.reshape(*o.shape[:2], -1).transpose(0, 1).contiguous()  # [s, b, heads * d]
        return self.o_proj(o)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Global tensors for dist checkpointing: A_log, dt_bias and the conv weights are split
        along dim 0 (heads) over TP; the linears shard themselves; o_norm is replicated."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        own = {}
        self._save_to_state_dict(own, "", keep_vars=True)
        state = make_sharded_tensors_for_checkpoint(
            own,
            prefix,
            {"A_log": 0, "dt_bias": 0},
            sharded_offsets,
            tp_group=self.tp_group,
            dp_cp_group=metadata["dp_cp_group"],
        )
        for name, module in self.named_children():
            if isinstance(module, nn.Conv1d):
                state.update(
                    make_sharded_tensors_for_checkpoint(
                        module.state_dict(keep_vars=True),
                        f"{prefix}{name}.",
                        {"weight": 0},
                        sharded_offsets,
                        tp_group=self.tp_group,
                        dp_cp_group=metadata["dp_cp_group"],
                    )
                )
            else:
                state.update(
                    sharded_state_dict_default(
                        module,
                        f"{prefix}{name}.",
                        sharded_offsets,
                        metadata,
                        tp_group=self.tp_group,
                    )
                )
        return state


def check_kda_tensor_parallel(heads: int, dim: int, tp: int) -> None:
    """KDA splits whole heads over TP, and the low-rank gates' width D (the head dim) too. The
    one definition of this rule: the layer and the run-config checks both call it."""
    if heads % tp:
        raise ValueError(
            f"linear_num_key_heads={heads} is not divisible by tensor_model_parallel_size={tp} "
            f"(each tensor-parallel rank holds whole KDA heads); use a TP size that divides "
            f"{heads} or a multiple of {tp} KDA heads"
        )
    if dim % tp:
        raise ValueError(
            f"linear_key_head_dim={dim} is not divisible by tensor_model_parallel_size={tp} "
            f"(mcore/kda.py splits the low-rank gates' width D, which is the head dim, over TP); "
            f"use a TP size that divides {dim} or a head dim that is a multiple of {tp}"
        )


def _check_kda_shape(config, heads: int, dim: int, tp: int) -> None:
    if heads is None or dim is None or heads < 1 or dim < 1:
        raise ValueError(
            f"KDA ('G') needs linear_num_key_heads >= 1 and linear_key_head_dim >= 1; got "
            f"{heads} and {dim}; set both in the config"
        )
    check_kda_tensor_parallel(heads, dim, tp)
    if config.context_parallel_size > 1:
        raise ValueError(
            f"KDA with context_parallel_size={config.context_parallel_size} is not supported; "
            "use context_parallel_size=1"
        )
