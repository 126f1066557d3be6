"""`AttnResTransformerConfig`: Megatron-Core's TransformerConfig plus the AttnRes fields.

Field names follow Megatron-LM PR #6840 (`--enable-attention-residuals`,
`--attn-res-block-layers`) so that users can switch: `enable_attention_residuals=True` selects
Block AttnRes unless `attn_res_mode` says "full". Depth blocks are configured in transformer layers
(a mixer and an MLP/MoE); in HybridModel's pattern that is 2 symbols each, so a depth block of k
layers is S = 2k sublayers.
"""

from dataclasses import dataclass

import torch.nn.functional as F
from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

from megatron_attnres.attnres.schedule import DepthBlockSchedule, ResidualMode

# Fused-kernel switches that Megatron-Core turns on by default but that need CUDA/TE/apex; the
# local specs (CPU, or GPUs without TransformerEngine) run with all of them off.
UNFUSED_KERNELS = dict(
    bias_activation_fusion=False,
    bias_dropout_fusion=False,
    apply_rope_fusion=False,
    persist_layer_norm=False,
    gradient_accumulation_fusion=False,
    masked_softmax_fusion=False,
)


# The model family of docs/architecture.md section 3b, as Megatron-Core fields: SwiGLU MLPs and
# experts, RMSNorm, no biases, no dropout, HybridModel layers. Shared by the trainer and the
# reference map.
ARCHITECTURE = dict(
    gated_linear_unit=True,
    activation_func=F.silu,
    normalization="RMSNorm",
    add_bias_linear=False,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    is_hybrid_model=True,
)


@dataclass
class AttnResTransformerConfig(TransformerConfig):
    enable_attention_residuals: bool = False
    """Replace the residual stream with depth attention (AttnRes)."""

    attn_res_mode: str = "block"
    """"block" (Block AttnRes) or "full" (every sublayer is its own depth block)."""

    attn_res_block_layers: int = 1
    """Transformer layers (mixer + MLP/MoE) per depth block in block mode."""

    attn_res_recompute_read: bool = True
    """Recompute each depth read's result in backward instead of keeping the copy the sublayer's
    pre-norm saves (mcore/read_recompute.py): AttnRes then saves no more activations than the
    standard residual beyond a few fp32 scalars per source and token, for one extra read forward
    per sublayer in backward. False keeps the copy (one [s, b, h] tensor per sublayer)."""

    def __post_init__(self):
        super().__post_init__()
        validate_attnres(self)
        if self.enable_attention_residuals and self.pipeline_model_parallel_size > 1:
            # Stage payloads are the completed summaries packed along the sequence: their length
            # differs per boundary, so the schedules must exchange shapes.
            self.variable_seq_lengths = True

    @property
    def residual_mode(self) -> ResidualMode:
        if not self.enable_attention_residuals:
            return ResidualMode.NONE
        return ResidualMode(self.attn_res_mode)

    def depth_block_schedule(self) -> DepthBlockSchedule:
        """The schedule over all `num_layers` pattern symbols (sublayers) of the model."""
        mode = self.residual_mode
        S = 2 * self.attn_res_block_layers if mode is ResidualMode.BLOCK else 1
        return DepthBlockSchedule(self.num_layers, mode, S)


@dataclass
class AttnResMLATransformerConfig(AttnResTransformerConfig, MLATransformerConfig):
    """For patterns with MLA ('+') mixers: adds Megatron's MLA fields (kv_lora_rank, q_lora_rank,
    qk_head_dim, qk_pos_emb_head_dim, v_head_dim, rope_type...). qk_pos_emb_head_dim=0 drops the
    positional channels; mla_use_nope=True keeps them unrotated (Kimi Linear's NoPE MLA);
    qk_layernorm=True gives the RMSNorm on the compressed KV (and Q) latents of DeepSeek/Kimi."""

    mla_use_nope: bool = False
    """Keep the qk_pos_emb_head_dim channels of q and k but never rotate them (Kimi Linear)."""

    mla_latent_norm_epsilon: float = 1e-6
    """Epsilon of the latent norms (kv_layernorm, q_layernorm) instead of layernorm_epsilon: Kimi
    Linear (like DeepSeek-V3) builds q_a/kv_a_layernorm with its RMSNorm's default 1e-6."""


def experts_split_problem(experts: int, ep: int, name: str = "num_moe_experts"):
    """(what is wrong, the fix) when the expert-parallel size does not divide the experts (each
    EP rank holds the same number), else None. The one definition of this rule: the model config
    refuses with it, and so do the run-config checks under their own field name."""
    if not experts or experts % ep == 0:
        return None
    return (
        f"{name}={experts} is not divisible by expert_model_parallel_size={ep} (each "
        "expert-parallel rank holds the same number of experts)",
        f"use an EP size dividing {experts}",
    )


def _refuse(combination: str, fix: str) -> None:
    raise ValueError(f"unsupported configuration: {combination}; {fix}")


def validate_attnres(cfg: AttnResTransformerConfig) -> None:
    """Refuse bad values and unsupported combinations before any module is built."""
    if cfg.attn_res_mode not in ("block", "full"):
        _refuse(f"attn_res_mode={cfg.attn_res_mode!r}", "use 'block' or 'full'")
    k = cfg.attn_res_block_layers
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        _refuse(f"attn_res_block_layers={k!r}", "it must be a positive integer (layers per block)")
    if cfg.num_layers % 2:
        _refuse(
            f"num_layers={cfg.num_layers} (pattern symbols)",
            "every transformer layer is a mixer symbol followed by an MLP/MoE symbol, so "
            "num_layers must be even",
        )
    layers = cfg.num_layers // 2
    if cfg.enable_attention_residuals and cfg.attn_res_mode == "block" and k > layers:
        _refuse(
            f"attn_res_block_layers={k} with {layers} transformer layers",
            f"use at most {layers} layers per depth block",
        )
    problem = experts_split_problem(cfg.num_moe_experts or 0, cfg.expert_model_parallel_size)
    if problem:
        _refuse(*problem)
    if getattr(cfg, "mla_use_nope", False) and (cfg.rope_type != "rope" or cfg.apply_rope_fusion):
        _refuse(
            f"mla_use_nope=True with rope_type={cfg.rope_type!r}, "
            f"apply_rope_fusion={cfg.apply_rope_fusion}",
            "use rope_type='rope' and apply_rope_fusion=False (nothing is rotated anyway)",
        )
    if not cfg.enable_attention_residuals:
        return
    if cfg.recompute_granularity == "full":
        _refuse(
            "AttnRes with recompute_granularity='full'",
            "use recompute_granularity='selective' or None (full recompute re-runs the stack "
            "without the depth-block state)",
        )
    if cfg.fp32_residual_connection:
        _refuse(
            "AttnRes with fp32_residual_connection=True",
            "there is no residual stream to keep in fp32; depth reads already compute in fp32",
        )
    if cfg.mtp_num_layers:
        _refuse(f"AttnRes with mtp_num_layers={cfg.mtp_num_layers}", "set mtp_num_layers=None")
