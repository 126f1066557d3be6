"""MLA as DeepSeek-V3 and Kimi Linear define it, on Megatron-Core's MLASelfAttention.

With `qk_layernorm=True` the compressed KV latent (and, under q-LoRA, the compressed Q latent) is
RMS-normalised by a standalone norm before its up-projection; without q-LoRA the query
projection reads the layer's pre-normed input directly. Megatron-Core 0.19.2's resolver
(`QKNormConfigResolver`) differs in that last case: it fuses an extra norm into `linear_q_proj`
(a TransformerEngine LayerNormLinear), which the published checkpoints do not have, and it has no
local (non-TE) path at all. This subclass only changes which classes are built; the spec names
them (`kv_layernorm` / `q_layernorm` norms and plain linears), for local and TE specs alike.
Megatron builds those latent norms with `layernorm_epsilon`; Kimi Linear (and DeepSeek-V3) build
them with their RMSNorm's default 1e-6 whatever rms_norm_eps is, so they get
`mla_latent_norm_epsilon` here and every other norm keeps `layernorm_epsilon`.

Tensor parallelism with the local (column-parallel) KV down projection: megatron-core 0.19.2
gathers its output and splits off k_pos_emb, which every rank then shares among its own heads,
but the gather's backward only takes this rank's slice of a gradient that holds this rank's heads'
share: the k_pos_emb rows of `linear_kv_down_proj` (and everything before) get wrong gradients.
`_qkv_down_projection` below sums that gradient over the tensor-parallel ranks first.

`mla_use_nope=True` (Kimi Linear's MLA): the qk_pos_emb_head_dim channels of q (per head) and of
k (shared by the heads, from the KV down projection) are kept but never rotated.
"""

import torch
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.multi_latent_attention import MLASelfAttention
from torch import nn


class NoRotation(nn.Module):
    """Stands in for MLA's RotaryEmbedding under NoPE. Megatron's `apply_rotary_pos_emb` rotates
    the first `freqs.shape[-1]` channels of its input and passes the rest through unchanged
    (`_apply_rotary_pos_emb_bshd`), so zero-width frequencies leave q_pos_emb and k_pos_emb exactly
    as projected, also when the up-projection is recomputed in the backward pass."""

    def __init__(self, rotary: nn.Module):
        super().__init__()
        self._rotary_seq_len = rotary.get_rotary_seq_len  # not a submodule: it has no state

    def get_rotary_seq_len(self, *args, **kwargs) -> int:
        return self._rotary_seq_len(*args, **kwargs)

    def forward(self, max_seq_len: int, *args, **kwargs) -> torch.Tensor:
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        return torch.zeros(max_seq_len, 1, 1, 0, device=device)


def with_eps(norm, eps: float):
    """The norm builder `norm` with its eps fixed to `eps`, whatever eps the caller passes."""

    def build(*args, **kwargs):
        return norm(*args, **{**kwargs, "eps": eps})

    return build


class AttnResMLASelfAttention(MLASelfAttention):
    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        if getattr(config, "mla_use_nope", False):
            self.rotary_pos_emb = NoRotation(self.rotary_pos_emb)

    def _qkv_down_projection(self, hidden_states):
        """Megatron's, with a column-parallel KV down projection's output gathered here so that
        the k_pos_emb gradient is summed over the tensor-parallel ranks: under sequence
        parallelism the output is re-split along the sequence (Megatron then all-gathers
        k_pos_emb, whose backward reduce-scatters = sums); without it the k_pos_emb channels pass
        through copy_to_tensor_model_parallel_region (backward all-reduce)."""
        q_compressed, kv_combined = super()._qkv_down_projection(hidden_states)
        rank, rope = self.config.kv_lora_rank, self.config.qk_pos_emb_head_dim
        if kv_combined.size(-1) == rank + rope:  # not split over TP: Megatron's path is right
            return q_compressed, kv_combined
        group = self.tp_group
        kv_combined = gather_from_tensor_model_parallel_region(kv_combined, group=group)
        if self.config.sequence_parallel:
            return q_compressed, scatter_to_sequence_parallel_region(kv_combined, group=group)
        latent, k_pos_emb = torch.split(kv_combined, [rank, rope], dim=-1)
        k_pos_emb = copy_to_tensor_model_parallel_region(k_pos_emb, group=group)
        return q_compressed, torch.cat([latent, k_pos_emb], dim=-1)

    def _resolve_qk_norm_config(self, submodules):
        if self.config.qk_l2_norm:
            raise ValueError("qk_l2_norm is not supported with MLA; use qk_layernorm")
        norms = bool(self.config.qk_layernorm)
        q_lora = self.config.q_lora_rank is not None
        eps = self.config.mla_latent_norm_epsilon
        return dict(
            linear_q_proj=IdentityOp if q_lora else submodules.linear_q_proj,
            linear_q_up_proj=submodules.linear_q_up_proj if q_lora else IdentityOp,
            linear_kv_up_proj=submodules.linear_kv_up_proj,
            q_layernorm=with_eps(submodules.q_layernorm, eps) if norms and q_lora else IdentityOp,
            kv_layernorm=with_eps(submodules.kv_layernorm, eps) if norms else IdentityOp,
        )
