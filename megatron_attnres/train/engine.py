"""One optimizer step of a Megatron model, through megatron.core's own machinery.

    chunks = wrap_ddp(model_chunks)            # one chunk per virtual pipeline stage
    optimizer = make_optimizer(chunks, lr=1e-3)
    result = train_step(chunks, optimizer, microbatches)

Megatron's DistributedDataParallel reduces gradients over data parallelism, its
`finalize_model_grads` all-reduces the sequence-parallel parameters (norms, AttnRes) over tensor
parallelism and updates the router's expert bias, its schedule accumulates micro-batches and
scales the MoE aux loss, and its optimizer clips and steps. Nothing here re-implements them.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.schedules import _build_default_pg_collection
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.utils import get_model_config

from megatron_attnres.mcore.pipeline import SummaryP2PCommunicator, batched_p2p_problem
from megatron_attnres.mcore.stack import AttnResHybridStack
from megatron_attnres.train.nonfinite import expert_biases, step_is_finite


@dataclass
class StepResult:
    loss: float  # mean next-token cross-entropy over the global batch (all micro-batches, DP)
    grad_norm: float
    skipped: bool
    nonfinite: bool = False  # skipped because the loss or a gradient was NaN/Inf


def wrap_ddp(model_chunks: list, **ddp_options) -> list[DistributedDataParallel]:
    options = dict(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False
    )
    options.update(ddp_options)
    config = model_chunks[0].config
    _refuse_silent_wrong_results(config)
    config.finalize_model_grads_func = finalize_model_grads
    ddp_config = DistributedDataParallelConfig(**options)
    chunks = [
        DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(model_chunks)
    ]
    _hand_sync_to_the_schedule(config, chunks, ddp_config)
    return chunks


def _one_or_list(functions: list):
    return functions[0] if len(functions) == 1 else functions


def _hand_sync_to_the_schedule(config, chunks, ddp_config) -> None:
    """With overlap_grad_reduce, megatron-core's schedules start the gradient reduce themselves
    through these config hooks, as Megatron-LM's training loop sets them (align_grad_reduce, its
    default): no_sync holds the reduce until the last micro-batch, grad_sync_func starts it as a
    chunk's last backward finishes. The parameter gather of overlap_param_gather needs no hook:
    DDP's forward pre-hooks wait for it."""
    config.no_sync_func = config.grad_sync_func = None
    if ddp_config.overlap_grad_reduce:
        config.no_sync_func = _one_or_list([chunk.no_sync for chunk in chunks])
        config.grad_sync_func = _one_or_list([chunk.start_grad_sync for chunk in chunks])


def _refuse_silent_wrong_results(config) -> None:
    interleaved = (config.virtual_pipeline_model_parallel_size or 1) > 1
    problem = batched_p2p_problem(config.batch_p2p_comm, interleaved, dist.get_backend())
    if problem:
        raise ValueError(problem)


def make_optimizer(model_chunks: list, **options):
    fields = dict(
        optimizer="adam",
        lr=1e-3,
        weight_decay=0.0,
        clip_grad=1.0,
        bf16=False,
        fp16=False,
        params_dtype=model_chunks[0].config.params_dtype,
    )
    fields.update(options)
    return get_megatron_optimizer(OptimizerConfig(**fields), model_chunks)


def _loss_func(loss_mask, per_token_loss):
    per_token_loss = per_token_loss.float()
    loss = (per_token_loss * loss_mask).sum() / loss_mask.sum()
    return loss, {"lm_loss": loss.detach().clone()}


def _forward_step(batches, model):
    batch = next(batches)
    tokens, labels = batch["tokens"], batch["labels"]
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    output = model(tokens, positions, None, labels=labels)
    loss_mask = batch.get("loss_mask", torch.ones_like(labels, dtype=torch.float))
    return output, lambda out: _loss_func(loss_mask.float(), out)


def check_interleaved_microbatches(num_microbatches: int, summary_cache: bool) -> None:
    """Interleaved AttnRes needs at least 2 x PP micro-batches per step on each rank.

    With exactly PP, megatron-core 0.19.2's interleaved schedule runs rank 0 entirely in warm-up;
    its calls are then unbalanced in a way that the variable-shape exchange of AttnRes payloads
    deadlocks on (measured over gloo, PP=2 x V=2 with 2 micro-batches; 4 train exactly like one
    rank). Stock fixed-shape payloads are not affected.
    """
    stages = ps.get_pipeline_model_parallel_world_size()
    if summary_cache and num_microbatches < 2 * stages:
        raise ValueError(
            f"{num_microbatches} micro-batches per step with interleaved AttnRes stages and "
            f"pipeline size {stages}: use at least {2 * stages} (a larger global_batch_size or a "
            "smaller micro_batch_size)"
        )


def _pipeline_communication(
    model_chunks: list,
    forward_only: bool,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
) -> dict:
    """Schedule arguments for pipelines: our shape-safe communicator (SummaryP2PCommunicator)
    and a fresh step for each rank's summary cache (interleaved stages)."""
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return {}
    stacks = [
        m for chunk in model_chunks for m in chunk.modules() if isinstance(m, AttnResHybridStack)
    ]
    caches = {id(s.summary_cache): s.summary_cache for s in stacks if s.summary_cache}
    check_interleaved_microbatches(num_microbatches, bool(caches))
    for cache in caches.values():  # one per rank, shared by its chunks
        cache.begin_step(forward_only)
    config = get_model_config(model_chunks[0])
    shapes = None
    # Megatron asks for payload shapes only under variable_seq_lengths (AttnRes stages); with
    # one chunk per rank (1F1B) they are static.
    if config.variable_seq_lengths and len(model_chunks) == 1 and len(stacks) == 1 and not caches:
        shapes = stage_payload_shapes(stacks[0], config, seq_length, micro_batch_size)
    communicator = SummaryP2PCommunicator(
        ps.get_pipeline_model_parallel_group(), config, payload_shapes=shapes
    )
    return dict(p2p_communicator=communicator, pg_collection=_build_default_pg_collection())


def stage_payload_shapes(
    stack: AttnResHybridStack, config, seq_length: int, micro_batch_size: int
) -> tuple[tuple, tuple]:
    """Shapes of the payload this stage receives and of the gradient it receives for what it
    sends: the summary counts times the schedule's per-summary shape (sequence divided over
    context parallelism and, with sequence parallelism, over tensor parallelism)."""
    rows = seq_length // ps.get_context_parallel_world_size()
    if config.sequence_parallel:
        rows //= ps.get_tensor_model_parallel_world_size()
    received, sent = stack.payload_summary_counts()
    return tuple((count * rows, micro_batch_size, config.hidden_size) for count in (received, sent))


def forward_backward(
    model_chunks: list, microbatches: list[dict], forward_only: bool = False
) -> float:
    """Accumulate gradients over this rank's micro-batches; returns the global mean loss."""
    tokens = microbatches[0]["tokens"]
    iterators = [iter(microbatches) for _ in model_chunks]
    # megatron keeps the aux-loss scale in a class attribute and copies each step's scale into
    # it; models whose optimizers scale losses differently ([] vs [1]) in one process (tests, a
    # notebook) would clash, so each call starts from no scale.
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    losses = get_forward_backward_func()(
        **_pipeline_communication(
            model_chunks, forward_only, len(microbatches), tokens.shape[1], tokens.shape[0]
        ),
        forward_step_func=_forward_step,
        data_iterator=iterators if len(model_chunks) > 1 else iterators[0],
        model=model_chunks,
        num_microbatches=len(microbatches),
        seq_length=tokens.shape[1],
        micro_batch_size=tokens.shape[0],
        forward_only=forward_only,
    )
    # Only the last pipeline stage computes losses; the others contribute zero to the sum.
    total = torch.zeros(())
    if losses:
        total = torch.stack([entry["lm_loss"] for entry in losses]).mean()
    dist.all_reduce(total, group=ps.get_pipeline_model_parallel_group())
    dist.all_reduce(total, group=ps.get_data_parallel_group())
    return total.item() / ps.get_data_parallel_world_size()


def train_step(
    model_chunks: list, optimizer, microbatches: list[dict], skip_nonfinite: bool = False
) -> StepResult:
    """One optimizer step. With `skip_nonfinite`, a NaN/Inf loss or gradient on any rank skips
    the update and leaves the model as it was (the router's expert bias included); the caller
    decides what to do next (train/nonfinite.py)."""
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    biases = expert_biases(model_chunks) if skip_nonfinite else []
    loss = forward_backward(model_chunks, microbatches)
    if skip_nonfinite and not step_is_finite(model_chunks, loss):
        for bias, before in biases:
            bias.copy_(before)
        return StepResult(loss=loss, grad_norm=float("nan"), skipped=True, nonfinite=True)
    ok, grad_norm, _ = optimizer.step()
    return StepResult(loss=loss, grad_norm=float(grad_norm or 0.0), skipped=not ok)
