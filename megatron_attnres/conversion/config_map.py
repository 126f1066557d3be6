"""The model part of a run config (Megatron-LM names) <-> the exported Hugging Face config (Kimi
Linear's names plus the AttnRes keys of docs/architecture.md section 3).

Only what defines the function the model computes crosses over; training settings stay behind.
Both directions refuse, by name, what the other side cannot express.
"""

import dataclasses

from megatron_attnres.config.megatron import layer_pattern
from megatron_attnres.config.run import RunConfig
from megatron_attnres.conversion.hf.configuration_attnres import AttnResConfig
from megatron_attnres.mcore.model import hybrid_pattern

# Hybrid-pattern mixer symbol <-> AttnResConfig.mixer_types entry.
MIXERS = {"*": "full_attention", "+": "mla", "G": "kda"}
MIXER_SYMBOLS = {name: symbol for symbol, name in MIXERS.items()}


class ConversionError(ValueError):
    """Input that cannot be converted; the message names the value and what to do instead."""


@dataclasses.dataclass(frozen=True)
class TokenIds:
    bos: int | None = None
    eos: int | None = None
    pad: int | None = None


def _layers(pattern: str) -> list[tuple[str, str]]:
    """(mixer symbol, MLP symbol) per transformer layer of a hybrid pattern."""
    symbols = pattern.replace("|", "")
    pairs = [(symbols[i], symbols[i + 1 : i + 2]) for i in range(0, len(symbols), 2)]
    for i, (mixer, mlp) in enumerate(pairs):
        if mixer not in MIXERS or mlp not in ("-", "E"):
            raise ConversionError(
                f"hybrid pattern {pattern!r}: transformer layer {i + 1} is {mixer + mlp!r}; the "
                f"Hugging Face model needs each layer to be a mixer ({' or '.join(MIXERS)}) "
                "followed by '-' (dense MLP) or 'E' (MoE)"
            )
    return pairs


def _first_k_dense(pattern: str, pairs: list[tuple[str, str]]) -> int:
    mlps = "".join(mlp for _, mlp in pairs)
    dense = len(mlps) - len(mlps.lstrip("-"))
    if "-" in mlps[dense:]:
        raise ConversionError(
            f"hybrid pattern {pattern!r} has a dense MLP ('-') after an MoE layer ('E'); Kimi "
            "Linear's config (first_k_dense_replace) allows dense layers only at the start"
        )
    return dense


def _shared_experts(run: RunConfig, moe_width: int) -> int:
    shared = run.moe_shared_expert_intermediate_size or 0
    if shared % moe_width:
        raise ConversionError(
            f"moe_shared_expert_intermediate_size={shared} is not a multiple of "
            f"moe_ffn_hidden_size={moe_width}; Kimi Linear's config states the shared expert as "
            "num_shared_experts x moe_intermediate_size"
        )
    return shared // moe_width


def hf_config(run: RunConfig, vocab_size: int, tokens: TokenIds = TokenIds()) -> AttnResConfig:
    """The AttnResConfig computing the same function as the model of `run` (vocab: padded)."""
    pattern = layer_pattern(run)
    pairs = _layers(pattern)
    mixers = [MIXERS[mixer] for mixer, _ in pairs]
    if "full_attention" in mixers and run.position_embedding_type != "rope":
        raise ConversionError(
            f"position_embedding_type={run.position_embedding_type!r}: the exported attention "
            "applies RoPE; export models trained with position_embedding_type: rope"
        )
    if "mla" in mixers and not run.qk_layernorm:
        raise ConversionError(
            "qk_layernorm=false with MLA: Kimi Linear / DeepSeek MLA always RMS-normalises the "
            "compressed KV (kv_a_layernorm); train MLA models with qk_layernorm: true"
        )
    moe = bool(run.num_experts) and any(mlp == "E" for _, mlp in pairs)
    moe_width = run.moe_ffn_hidden_size or run.ffn_hidden_size
    heads = run.num_attention_heads
    if run.attn_res_mode not in ("block", "full"):
        raise ConversionError(f"attn_res_mode={run.attn_res_mode!r}; use 'block' or 'full'")
    return AttnResConfig(
        vocab_size=vocab_size,
        hidden_size=run.hidden_size,
        num_hidden_layers=len(pairs),
        num_attention_heads=heads,
        num_key_value_heads=run.num_query_groups or heads,
        head_dim=run.kv_channels or run.hidden_size // heads,
        intermediate_size=run.ffn_hidden_size,
        moe_intermediate_size=moe_width,
        num_experts=run.num_experts if moe else 0,
        num_experts_per_token=run.moe_router_topk,
        num_shared_experts=_shared_experts(run, moe_width) if moe else 0,
        first_k_dense_replace=_first_k_dense(pattern, pairs) if moe else len(pairs),
        moe_router_activation_func=run.moe_router_score_function,
        routed_scaling_factor=run.moe_router_topk_scaling_factor or 1.0,
        moe_renormalize=True,  # Megatron: top-k then softmax; sigmoid scores renormalised
        use_expert_bias=run.moe_router_enable_expert_bias,
        rms_norm_eps=run.norm_epsilon,
        rope_theta=float(run.rotary_base),
        max_position_embeddings=run.seq_length,
        q_lora_rank=run.q_lora_rank,
        kv_lora_rank=run.kv_lora_rank,
        qk_nope_head_dim=run.qk_head_dim,
        qk_rope_head_dim=run.qk_pos_emb_head_dim,
        v_head_dim=run.v_head_dim,
        mla_use_nope=run.mla_use_nope or run.qk_pos_emb_head_dim == 0,
        mla_latent_norm_eps=run.mla_latent_norm_epsilon,
        mixer_types=mixers,
        linear_attn_config=_linear_attn_config(mixers, run),
        attn_res_mode=run.attn_res_mode if run.enable_attention_residuals else "none",
        attn_res_block_size=run.attn_res_block_layers,
        initializer_range=run.init_method_std,
        tie_word_embeddings=not run.untie_embeddings_and_output_weights,
        bos_token_id=tokens.bos,
        eos_token_id=tokens.eos,
        pad_token_id=tokens.pad,
        dtype="bfloat16" if run.bf16 else "float32",
    )


def _linear_attn_config(mixers: list[str], run: RunConfig) -> dict | None:
    """Kimi Linear's 1-based layer lists (so transformers' kimi_linear reads an MLA/KDA export)
    and, with KDA layers, its sizes."""
    if "full_attention" in mixers:
        return None
    lists = {
        "full_attn_layers": [i + 1 for i, m in enumerate(mixers) if m == "mla"],
        "kda_layers": [i + 1 for i, m in enumerate(mixers) if m == "kda"],
    }
    if "kda" not in mixers:
        return lists
    return lists | {
        "num_heads": run.linear_num_key_heads,
        "head_dim": run.linear_key_head_dim,
        "short_conv_kernel_size": run.linear_conv_kernel_dim,
    }


def _kda_fields(hf: AttnResConfig) -> dict:
    """RunConfig's KDA sizes from Kimi Linear's linear_attn_config (defaults without KDA)."""
    if "kda" not in hf.mixer_types:
        return {}
    lin = hf.linear_attn_config
    return dict(
        linear_num_key_heads=lin["num_heads"],
        linear_key_head_dim=lin["head_dim"],
        linear_conv_kernel_dim=lin["short_conv_kernel_size"],
    )


def run_fields(hf: AttnResConfig) -> dict:
    """RunConfig fields that build the Megatron model computing the same function as `hf`."""
    mixers = hf.mixer_types
    unknown = sorted(set(mixers) - set(MIXER_SYMBOLS))
    if unknown:
        raise ConversionError(
            f"mixer_types contains {unknown}; the Megatron model builds {sorted(MIXER_SYMBOLS)} "
            "mixers"
        )
    if hf.num_experts and not hf.moe_renormalize:
        raise ConversionError(
            "moe_renormalize=false: Megatron's router renormalises the top-k weights; only "
            "moe_renormalize=true checkpoints convert exactly"
        )
    pattern = "".join(
        MIXER_SYMBOLS[m] + ("E" if hf.is_moe_layer(i) else "-") for i, m in enumerate(mixers)
    )
    first_k_dense = min(hf.first_k_dense_replace, hf.num_hidden_layers)
    # layer_pattern() rebuilds a uniform pattern of '*' or (multi_latent_attention) '+' only
    only_mla = set(mixers) == {"mla"}
    uniform = hybrid_pattern(
        hf.num_hidden_layers, bool(hf.num_experts), first_k_dense, "+" if only_mla else "*"
    )
    shared = hf.num_shared_experts * hf.moe_intermediate_size
    fields = dict(
        num_layers=hf.num_hidden_layers,
        hidden_size=hf.hidden_size,
        ffn_hidden_size=hf.intermediate_size,
        num_attention_heads=hf.num_attention_heads,
        num_query_groups=hf.num_key_value_heads,
        kv_channels=hf.head_dim,
        seq_length=hf.max_position_embeddings,
        vocab_size=hf.vocab_size,
        position_embedding_type="rope",
        rotary_base=int(hf.rope_theta),
        norm_epsilon=hf.rms_norm_eps,
        init_method_std=hf.initializer_range,
        untie_embeddings_and_output_weights=not hf.tie_word_embeddings,
        hybrid_layer_pattern=None if pattern == uniform else pattern,  # None: from num_layers
        multi_latent_attention=only_mla,
        q_lora_rank=hf.q_lora_rank,
        kv_lora_rank=hf.kv_lora_rank,
        qk_head_dim=hf.qk_nope_head_dim,
        qk_pos_emb_head_dim=hf.qk_rope_head_dim,
        v_head_dim=hf.v_head_dim,
        qk_layernorm="mla" in mixers,
        mla_use_nope="mla" in mixers and hf.mla_use_nope and hf.qk_rope_head_dim > 0,
        mla_latent_norm_epsilon=hf.mla_latent_norm_eps,
        **_kda_fields(hf),
        num_experts=hf.num_experts or None,
        moe_first_k_dense=first_k_dense,
        moe_router_topk=hf.num_experts_per_token,
        moe_ffn_hidden_size=hf.moe_intermediate_size,
        moe_shared_expert_intermediate_size=shared or None,
        moe_router_score_function=hf.moe_router_activation_func,
        moe_router_enable_expert_bias=hf.use_expert_bias and bool(hf.num_experts),
        moe_router_topk_scaling_factor=hf.routed_scaling_factor,
        enable_attention_residuals=hf.attn_res_mode != "none",
        attn_res_mode=hf.attn_res_mode if hf.attn_res_mode != "none" else "block",
        attn_res_block_layers=hf.attn_res_block_size if hf.attn_res_mode == "block" else 1,
        bf16=str(getattr(hf, "dtype", None)).endswith("bfloat16"),
    )
    return fields
