"""Build a HybridModel with AttnRes from an `AttnResTransformerConfig` and a layer pattern."""

from megatron.core.models.hybrid.hybrid_model import HybridModel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.transformer_config import MLATransformerConfig

from megatron_attnres.mcore.config import AttnResTransformerConfig
from megatron_attnres.mcore.pipeline import (
    SummaryCache,
    balanced_cuts,
    check_cuts,
    chunk_first_layers,
    insert_cuts,
)
from megatron_attnres.mcore.specs import attnres_local_stack_spec

MIXERS, MLPS = "*+G", "-E"


def hybrid_pattern(num_layers: int, moe: bool, first_k_dense: int = 0, mixer: str = "*") -> str:
    """Pattern of `num_layers` transformer layers: a mixer symbol, then '-' (dense) or 'E' (MoE)."""
    return "".join(mixer + ("E" if moe and i >= first_k_dense else "-") for i in range(num_layers))


def pipeline_segments(config: AttnResTransformerConfig) -> int:
    """Pattern segments ('|'-separated) the config's pipeline needs: stages x virtual stages."""
    return config.pipeline_model_parallel_size * (config.virtual_pipeline_model_parallel_size or 1)


def pipeline_pattern(config: AttnResTransformerConfig, pattern: str) -> str:
    """`pattern` with '|' cuts for the config's pipeline (x virtual) stages: whole depth blocks,
    spread as evenly as possible. Patterns that already have cuts are returned unchanged."""
    segments = pipeline_segments(config)
    if "|" in pattern or segments == 1:
        return pattern
    return insert_cuts(pattern, balanced_cuts(config.depth_block_schedule(), segments))


def qk_layernorm_problem(pattern: str, qk_layernorm: bool) -> str | None:
    """Why qk_layernorm cannot apply to `pattern` (its QK norms are wired for MLA latents only),
    or None. The one definition of this rule: the pattern check and the run-config checks."""
    if qk_layernorm and "*" in pattern:
        return (
            f"qk_layernorm=true with standard attention ('*') layers in {pattern!r}: QK norms "
            "are wired for MLA latents only (the setting would be ignored); set "
            "multi_latent_attention: true or qk_layernorm: false"
        )
    return None


def check_pattern(config: AttnResTransformerConfig, pattern: str) -> None:
    symbols = pattern.replace("|", "")
    if config.pipeline_model_parallel_size > 1 or "|" in pattern:
        check_cuts(pattern, config.depth_block_schedule(), pipeline_segments(config))
    if len(symbols) != config.num_layers:
        raise ValueError(
            f"hybrid pattern {pattern!r} has {len(symbols)} sublayer symbols but num_layers="
            f"{config.num_layers}; num_layers counts pattern symbols (2 per transformer layer)"
        )
    for i in range(0, len(symbols), 2):
        mixer, mlp = symbols[i], symbols[i + 1]
        if mixer not in MIXERS or mlp not in MLPS:
            raise ValueError(
                f"hybrid pattern {pattern!r}: transformer layer {i // 2 + 1} is {mixer + mlp!r}; "
                f"each layer must be a mixer ({MIXERS}) followed by an MLP ('-') or MoE ('E')"
            )
    if "+" in symbols and not isinstance(config, MLATransformerConfig):
        raise ValueError(
            f"hybrid pattern {pattern!r} has MLA ('+') layers but the config is a "
            f"{type(config).__name__}; use AttnResMLATransformerConfig (it adds the MLA fields)"
        )
    problem = qk_layernorm_problem(pattern, config.qk_layernorm)
    if problem:
        raise ValueError(problem)
    if "E" in symbols and not config.num_moe_experts:
        raise ValueError(f"hybrid pattern {pattern!r} has MoE layers but num_moe_experts is unset")


def build_model(
    config: AttnResTransformerConfig,
    pattern: str,
    vocab_size: int,
    max_sequence_length: int,
    stack_spec=None,
    pre_process: bool = True,
    post_process: bool = True,
    position_embedding_type: str | None = None,
    rotary_base: int = 10000,
    share_embeddings_and_output_weights: bool = False,
    vp_stage: int | None = None,
) -> HybridModel:
    """A HybridModel over our AttnRes stack (local specs unless `stack_spec` is given).

    Position embedding defaults to RoPE for standard attention and to none for MLA patterns
    (MLA applies its own RoPE to qk_pos_emb_head_dim channels; 0 of them is NoPE).
    """
    check_pattern(config, pattern)
    if position_embedding_type is None:
        position_embedding_type = "none" if "+" in pattern else "rope"
    return HybridModel(
        config=config,
        hybrid_stack_spec=stack_spec or attnres_local_stack_spec(config),
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        hybrid_layer_pattern=pattern,
        pre_process=pre_process,
        post_process=post_process,
        position_embedding_type=position_embedding_type,
        rotary_base=rotary_base,
        share_embeddings_and_output_weights=share_embeddings_and_output_weights,
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
        vp_stage=vp_stage,
    )


def build_model_chunks(
    config: AttnResTransformerConfig,
    pattern: str,
    vocab_size: int,
    max_sequence_length: int,
    **kwargs,
) -> list[HybridModel]:
    """This rank's model chunks (one per virtual pipeline stage), with pre/post-processing on the
    first/last pipeline stage. `pattern` gets balanced cuts if it has none."""
    from megatron.core import parallel_state as ps

    pattern = pipeline_pattern(config, pattern)
    chunks = []
    for vp in range(config.virtual_pipeline_model_parallel_size or 1):
        vp_stage = vp if config.virtual_pipeline_model_parallel_size else None
        chunks.append(
            build_model(
                config,
                pattern,
                vocab_size,
                max_sequence_length,
                pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                vp_stage=vp_stage,
                **kwargs,
            )
        )
    if len(chunks) > 1 and config.depth_block_schedule().uses_depth_reads:
        _share_summary_cache(config, pattern, chunks, ps.get_pipeline_model_parallel_rank())
    return chunks


def _share_summary_cache(config, pattern: str, chunks: list, pipeline_rank: int) -> None:
    """Interleaved stages: one SummaryCache per rank, shared by its chunks (docs/architecture.md
    section 5)."""
    schedule, stages = config.depth_block_schedule(), config.pipeline_model_parallel_size
    entering = [schedule.summaries_entering(first) for first in chunk_first_layers(pattern)]
    cache = SummaryCache(entering, stages, pipeline_rank)
    for vstage, chunk in enumerate(chunks):
        chunk.decoder.summary_cache = cache
        chunk.decoder.chunk_index = vstage * stages + pipeline_rank
