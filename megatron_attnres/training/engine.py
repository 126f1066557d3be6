"""One optimizer step of a Megatron model, through megatron.core's own machinery.

    ddp = wrap_ddp(model)
    optimizer = make_optimizer(ddp, lr=1e-3)
    result = train_step(ddp, optimizer, microbatches)

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


@dataclass
class StepResult:
    loss: float  # mean next-token cross-entropy over the global batch (all micro-batches, DP)
    grad_norm: float
    skipped: bool


def wrap_ddp(model, **ddp_options) -> DistributedDataParallel:
    options = dict(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                   use_distributed_optimizer=False)  # fmt: skip
    options.update(ddp_options)
    config = model.config
    config.finalize_model_grads_func = finalize_model_grads
    return DistributedDataParallel(config, DistributedDataParallelConfig(**options), model)


def make_optimizer(ddp_model, **options):
    fields = dict(optimizer="adam", lr=1e-3, weight_decay=0.0, clip_grad=1.0, bf16=False,
                  fp16=False, params_dtype=ddp_model.config.params_dtype)  # fmt: skip
    fields.update(options)
    return get_megatron_optimizer(OptimizerConfig(**fields), [ddp_model])


def _loss_func(loss_mask, per_token_loss):
    per_token_loss = per_token_loss.float()
    loss = (per_token_loss * loss_mask).sum() / loss_mask.sum()
    return loss, {"lm_loss": loss.detach().clone()}


def _forward_step(batches, model):
    batch = next(batches)
    tokens, labels = batch["tokens"], batch["labels"]
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    per_token_loss = model(tokens, positions, None, labels=labels)
    loss_mask = batch.get("loss_mask", torch.ones_like(labels, dtype=torch.float))
    return per_token_loss, lambda out: _loss_func(loss_mask.float(), out)


def forward_backward(ddp_model, microbatches: list[dict]) -> float:
    """Accumulate gradients over this rank's micro-batches; returns the global mean loss."""
    tokens = microbatches[0]["tokens"]
    losses = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iter(microbatches),
        model=[ddp_model],
        num_microbatches=len(microbatches),
        seq_length=tokens.shape[1],
        micro_batch_size=tokens.shape[0],
        forward_only=False,
    )
    mean = torch.stack([entry["lm_loss"] for entry in losses]).mean()
    dist.all_reduce(mean, group=ps.get_data_parallel_group())
    return mean.item() / ps.get_data_parallel_world_size()


def train_step(ddp_model, optimizer, microbatches: list[dict]) -> StepResult:
    ddp_model.zero_grad_buffer()
    optimizer.zero_grad()
    loss = forward_backward(ddp_model, microbatches)
    ok, grad_norm, _ = optimizer.step()
    return StepResult(loss=loss, grad_norm=float(grad_norm or 0.0), skipped=not ok)
