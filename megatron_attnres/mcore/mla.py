"""MLA as DeepSeek-V3 and Kimi Linear define it, on Megatron-Core's MLASelfAttention.

With `qk_layernorm=True` the compressed KV latent (and, under q-LoRA, the compressed Q latent) is
RMS-normalised by a standalone norm before its up-projection; without q-LoRA the query
projection reads the layer's pre-normed input directly. Megatron-Core 0.19.2's resolver
(`QKNormConfigResolver`) differs in that last case: it fuses an extra norm into `linear_q_proj`
(a TransformerEngine LayerNormLinear), which the published checkpoints do not have, and it has no
local (non-TE) path at all. This subclass only changes which classes are built; the spec names
them (`kv_layernorm` / `q_layernorm` norms and plain linears), for local and TE specs alike.
"""

from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.multi_latent_attention import MLASelfAttention


class AttnResMLASelfAttention(MLASelfAttention):
    def _resolve_qk_norm_config(self, submodules):
        if self.config.qk_l2_norm:
            raise ValueError("qk_l2_norm is not supported with MLA; use qk_layernorm")
        norms = bool(self.config.qk_layernorm)
        q_lora = self.config.q_lora_rank is not None
        return dict(
            linear_q_proj=IdentityOp if q_lora else submodules.linear_q_proj,
            linear_q_up_proj=submodules.linear_q_up_proj if q_lora else IdentityOp,
            linear_kv_up_proj=submodules.linear_kv_up_proj,
            q_layernorm=submodules.q_layernorm if norms and q_lora else IdentityOp,
            kv_layernorm=submodules.kv_layernorm if norms else IdentityOp,
        )
