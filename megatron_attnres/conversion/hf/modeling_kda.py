"""Kimi Delta Attention (KDA) for the exported Hugging Face model, with its generation cache.

Shipped next to modeling_attnres.py in exported folders (trust_remote_code). Models with KDA
layers need fla-core for the delta-rule operator: `pip install fla-core` (Triton `chunk_kda` on
CUDA; its pure-PyTorch `naive_chunk_kda` / `naive_recurrent_kda` elsewhere). Parameter names and
shapes are Kimi Linear's released checkpoint's, so transformers' `kimi_linear` loads the weights.

Per token x (after the layer's pre-norm), H heads of width D, short-conv kernel K:
    q, k, v = SiLU(causal depthwise conv_K(proj x))                  (each H*D)
    g       = -exp(A_log[h]) * softplus(f_b(f_a x) + dt_bias)          (log decay, fp32, H*D)
    beta    = sigmoid(b_proj x)                                        (H)
    o       = KDA(l2norm(q), l2norm(k), v, g, beta), scale D^-0.5      (state S [H, D, D], fp32)
    y       = o_proj(RMSNorm_o(o) * sigmoid(g_b(g_a x)))               (per head, fp32 norm)
KDA per step: S = diag(exp g) S;  S += beta k (v - S^T k)^T;  o = S^T (q D^-0.5).

The cache keeps, per KDA layer, the last K-1 inputs of each short convolution and the state S,
so a prefill, a multi-token continuation and a single-token decode compute what one forward over
the whole sequence computes.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DynamicCache

try:  # only models with KDA layers need fla-core; check_imports skips guarded imports
    from fla.ops.kda import chunk_kda
    from fla.ops.kda.naive import naive_chunk_kda, naive_recurrent_kda
except ImportError:  # pragma: no cover - reported when a KDA layer runs
    chunk_kda = naive_chunk_kda = naive_recurrent_kda = None

L2NORM_EPS = 1e-6  # fla's l2norm: x / sqrt(sum x^2 + eps)
CPU_CHUNK = 16  # naive_chunk_kda's chunk on CPU (any size is exact; small keeps its loops short)


@dataclass
class KDAState:
    """One KDA layer's cache: conv inputs [b, H*D, K-1] per q/k/v, recurrent S [b, H, D, D]."""

    conv: dict[str, torch.Tensor]
    recurrent: torch.Tensor
    seen_tokens: int


class AttnResCache(DynamicCache):
    """DynamicCache for attention layers plus per-layer KDA states (`kda[layer_idx]`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.kda: dict[int, KDAState] = {}

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        """Tokens seen so far: every layer sees all of them, so any filled layer tells (the
        first layer may be KDA, whose attention slot stays empty)."""
        lengths = [state.seen_tokens for state in self.kda.values()]
        lengths += [layer.get_seq_length() for layer in getattr(self, "layers", [])]
        if not hasattr(self, "layers"):  # pragma: no cover - transformers 4.x
            lengths.append(super().get_seq_length())
        return max(lengths, default=0)

    def _map_batch(self, select) -> None:
        """Apply `select` (a batch-dimension op) to every KDA state."""
        for layer, state in self.kda.items():
            conv = {name: select(t) for name, t in state.conv.items()}
            self.kda[layer] = KDAState(conv, select(state.recurrent), state.seen_tokens)

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        self._map_batch(lambda t: t[indices])


def l2norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + L2NORM_EPS)


def delta_rule(q, k, v, g, beta, initial_state):
    """fla's KDA operator on [b, s, H, D] inputs; returns (o, final state [b, H, D, D] fp32)."""
    if naive_chunk_kda is None:
        raise ImportError("this model has KDA layers, which need fla-core: pip install fla-core")
    if q.is_cuda:
        o, state = chunk_kda(
            q,
            k,
            v,
            g,
            beta,
            initial_state=initial_state,
            output_final_state=True,
            use_qk_l2norm_in_kernel=True,
        )
        return o, state.float()
    q, k = l2norm(q.float()), l2norm(k.float())
    if q.shape[1] == 1:
        return naive_recurrent_kda(
            q, k, v, g, beta, initial_state=initial_state, output_final_state=True
        )
    # Padded steps (k = 0, beta = 0, g = 0) leave the state unchanged and are cut from o.
    s = q.shape[1]
    pad = -s % CPU_CHUNK
    q, k, v, g = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, v, g))
    o, state = naive_chunk_kda(
        q,
        k,
        v,
        g,
        F.pad(beta, (0, 0, 0, pad)),
        initial_state=initial_state,
        output_final_state=True,
        chunk_size=CPU_CHUNK,
    )
    return o[:, :s], state


class KimiRMSNormGated(nn.Module):
    """Per-head RMSNorm in fp32 times sigmoid(gate) (transformers' KimiLinearRMSNormGated)."""

    def __init__(self, head_dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(head_dim))
        self.eps = eps

    def forward(self, x, gate):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x32 * torch.sigmoid(gate.float())).to(x.dtype)


class KimiDeltaAttention(nn.Module):
    """A KDA mixer ('G') with Kimi Linear's parameter names; A_log is stored [1, 1, H, 1]."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        lin = config.linear_attn_config
        h, heads, d = config.hidden_size, lin["num_heads"], lin["head_dim"]
        self.layer_idx, self.heads, self.head_dim = layer_idx, heads, d
        self.kernel = lin["short_conv_kernel_size"]
        width = heads * d
        for name in ("q", "k", "v"):
            setattr(self, f"{name}_proj", nn.Linear(h, width, bias=False))
            conv = nn.Conv1d(width, width, self.kernel, groups=width, bias=False)
            setattr(self, f"{name}_conv1d", conv)
        self.f_a_proj = nn.Linear(h, d, bias=False)
        self.f_b_proj = nn.Linear(d, width, bias=False)
        self.b_proj = nn.Linear(h, heads, bias=False)
        self.A_log = nn.Parameter(torch.zeros(1, 1, heads, 1))
        self.dt_bias = nn.Parameter(torch.zeros(width))
        self.g_a_proj = nn.Linear(h, d, bias=False)
        self.g_b_proj = nn.Linear(d, width, bias=False)
        self.o_norm = KimiRMSNormGated(d, config.rms_norm_eps)
        self.o_proj = nn.Linear(width, h, bias=False)

    def _short_conv(self, name: str, x, conv_state, new_conv: dict):
        """SiLU(causal depthwise conv) over [cached K-1 inputs; x]; records the new K-1 inputs."""
        u = getattr(self, f"{name}_proj")(x).transpose(1, 2)  # [b, H*D, s]
        if conv_state is None:
            conv_state = u.new_zeros(*u.shape[:2], self.kernel - 1)
        full = torch.cat((conv_state.to(u.dtype), u), dim=-1)
        new_conv[name] = full[..., full.shape[-1] - (self.kernel - 1) :].clone()
        weight = getattr(self, f"{name}_conv1d").weight
        out = F.conv1d(full, weight, groups=u.shape[1])  # length s: the K-1 prefix is consumed
        return F.silu(out).transpose(1, 2).unflatten(-1, (self.heads, self.head_dim))

    def forgetting(self, x) -> torch.Tensor:
        """g = -exp(A_log) * softplus(f_b(f_a x) + dt_bias): log decay [b, s, H, D], fp32."""
        raw = self.f_b_proj(self.f_a_proj(x)).float() + self.dt_bias.float()
        decay_rate = self.A_log.float().exp()  # [1, 1, H, 1]
        return -decay_rate * F.softplus(raw.unflatten(-1, (self.heads, self.head_dim)))

    def forward(self, x, position_ids=None, attn_bias=None, cache=None, token_mask=None):
        """x [b, s, h]; `token_mask` [b, s] (0 = padding) zeroes padded inputs, which then leave
        the state unchanged; position_ids and attn_bias are unused (KDA is causal by design)."""
        if token_mask is not None:
            x = x * token_mask[..., None].to(x.dtype)
        state = cache.kda.get(self.layer_idx) if cache is not None else None
        new_conv = {}
        q, k, v = (
            self._short_conv(n, x, state.conv[n] if state else None, new_conv) for n in "qkv"
        )
        beta = torch.sigmoid(self.b_proj(x).float())
        initial = state.recurrent if state is not None else None
        o, final = delta_rule(q, k, v, self.forgetting(x), beta, initial)
        if cache is not None:
            seen = (state.seen_tokens if state else 0) + x.shape[1]
            cache.kda[self.layer_idx] = KDAState(new_conv, final.float(), seen)
        gate = self.g_b_proj(self.g_a_proj(x)).unflatten(-1, (self.heads, self.head_dim))
        o = self.o_norm(o.to(x.dtype), gate)
        return self.o_proj(o.flatten(-2))


@torch.no_grad()
def init_kda(module: KimiDeltaAttention, init) -> None:
    """fla / Kimi Linear init: A_log = log U(1, 16); dt = exp(U(log 1e-3, log 1e-1)) with
    dt_bias its inverse softplus; o_norm weight 1 (linears and convs: the model's init)."""
    copy = getattr(init, "copy_", None) or (lambda param, value: param.copy_(value))
    copy(module.A_log, torch.empty_like(module.A_log).uniform_(1.0, 16.0).log())
    dt = torch.empty_like(module.dt_bias).uniform_(-6.907755, -2.302585).exp().clamp_min(1e-4)
    copy(module.dt_bias, dt + torch.log(-torch.expm1(-dt)))
    init.ones_(module.o_norm.weight)
