"""One ordered build of a run's model side, used by the trainer, the benchmarks and the tests.

    initialize_parallel(run)          # parallel state + RNG streams (once per process)
    built = build_run(run, vocab)     # config -> pattern -> chunks -> DDP -> optimizer

Each step depends on the one before it, and every caller builds a run the same way, so a model
in a benchmark or a test is the model `attnres-train` trains.
"""

from dataclasses import dataclass

from megatron.core import parallel_state as ps

from megatron_attnres.checkpoint.format import model_signature
from megatron_attnres.config.host import probe, resolve_implementation
from megatron_attnres.config.megatron import (
    expert_tensor_parallel_size,
    layer_pattern,
    transformer_config,
)
from megatron_attnres.config.rules import check_host_support
from megatron_attnres.config.run import RunConfig
from megatron_attnres.mcore.compat import model_parallel_manual_seed
from megatron_attnres.mcore.config import AttnResTransformerConfig
from megatron_attnres.mcore.model import build_model_chunks, pipeline_pattern
from megatron_attnres.train.engine import wrap_ddp
from megatron_attnres.train.optimizer import optimizer_and_scheduler


def stack_spec(run: RunConfig):
    """The HybridModel stack spec of run.transformer_impl (None: build_model's local spec)."""
    if run.transformer_impl == "transformer_engine":
        from megatron_attnres.mcore.specs import attnres_te_stack_spec

        return attnres_te_stack_spec()
    return None


def initialize_parallel(run: RunConfig) -> None:
    """Megatron's parallel state for the run's TP/PP/VP/EP sizes, then the RNG streams (the
    model-parallel tracker needs the ranks)."""
    ps.initialize_model_parallel(
        run.tensor_model_parallel_size,
        run.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=run.virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=run.expert_model_parallel_size,
        expert_tensor_parallel_size=expert_tensor_parallel_size(run),
    )
    model_parallel_manual_seed(run.seed)


@dataclass
class BuiltRun:
    config: AttnResTransformerConfig
    pattern: str  # the hybrid pattern with its pipeline cuts
    chunks: list  # DDP-wrapped model chunks, one per virtual pipeline stage
    optimizer: object  # megatron.core's MegatronOptimizer
    scheduler: object  # megatron.core's OptimizerParamScheduler
    vocab_size: int  # the padded vocabulary the model was built with
    signature: dict  # the model fields every checkpoint records (checkpoint.format)


def build_run(
    run: RunConfig, vocab_size: int, *, pattern: str | None = None, seed: int | None = None
) -> BuiltRun:
    """Build the model chunks of `run` on this rank (parallel state already initialised), wrap
    them in Megatron's DDP and create the optimizer and schedule. `pattern` overrides the run's
    cut pattern (benchmarks lay two modes out alike); `seed` reseeds the weights (default
    run.seed)."""
    run = resolve_implementation(run)
    check_host_support(run, probe())
    model_parallel_manual_seed(run.seed if seed is None else seed)
    config = transformer_config(run)
    pattern = pattern or pipeline_pattern(config, layer_pattern(run))
    chunks = build_model_chunks(
        config,
        pattern,
        vocab_size,
        run.seq_length,
        position_embedding_type=None if run.multi_latent_attention else run.position_embedding_type,
        rotary_base=run.rotary_base,
        share_embeddings_and_output_weights=not run.untie_embeddings_and_output_weights,
        stack_spec=stack_spec(run),
    )
    chunks = wrap_ddp(
        chunks,
        use_distributed_optimizer=run.use_distributed_optimizer,
        overlap_grad_reduce=run.overlap_grad_reduce,
        overlap_param_gather=run.overlap_param_gather,
    )
    optimizer, scheduler = optimizer_and_scheduler(run, chunks)
    tied = not run.untie_embeddings_and_output_weights
    signature = model_signature(config, pattern, vocab_size, tied)
    return BuiltRun(config, pattern, chunks, optimizer, scheduler, vocab_size, signature)
