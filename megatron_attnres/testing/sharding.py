"""Full (single-rank) tensors <-> this rank's shards of a Megatron model.

The layout is read from Megatron's own parameter attributes, never from a name table:
- `tensor_model_parallel`, `partition_dim`, `partition_stride`: a tensor-parallel weight is the
  full weight split into size * stride equal chunks along `partition_dim`; rank r holds chunks
  r, r + size, ... (stride 2 is the [gate; up] fc1: each rank holds [gate_r; up_r]);
- experts (`.experts.` in the name) are split over the expert-tensor-parallel group and placed
  by expert parallelism: local expert i on EP rank e is global expert e * num_local + i;
- pipeline stages (and virtual stages) hold layers offset by their first layer's number:
  local `decoder.layers.i` / `decoder.depth_reads.i` is global i + offset.

Names in the full dicts are the single-rank names (global expert numbers); everything else is
replicated. Every rank must call these functions together (they run collectives).
"""

import re
from collections.abc import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel

_LOCAL_EXPERT = re.compile(r"(\.experts\.local_experts\.)(\d+)(\.)")
_LOCAL_LAYER = re.compile(r"^(decoder\.(?:layers|depth_reads)\.)(\d+)(\.)")


def is_expert(name: str) -> bool:
    return ".experts." in name


def _ep_layout() -> tuple[int, int]:
    return ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size()


def layer_offset(model) -> int:
    """Global index of this (virtual) pipeline stage's first layer."""
    layers = model.decoder.layers
    return layers[0].layer_number - 1 if len(layers) else 0


def global_name(
    name: str, num_local_experts: int, ep_rank: int | None = None, offset: int = 0
) -> str:
    """The single-rank name of a local parameter (local expert and layer indices -> global)."""
    ep_rank = _ep_layout()[0] if ep_rank is None else ep_rank

    def expert(match):
        return f"{match[1]}{ep_rank * num_local_experts + int(match[2])}{match[3]}"

    def layer(match):
        return f"{match[1]}{offset + int(match[2])}{match[3]}"

    return _LOCAL_LAYER.sub(layer, _LOCAL_EXPERT.sub(expert, name))


def _tp_group(name: str):
    return (
        ps.get_expert_tensor_parallel_group()
        if is_expert(name)
        else ps.get_tensor_model_parallel_group()
    )


def _split(param) -> tuple[int, int] | None:
    if not getattr(param, "tensor_model_parallel", False):
        return None
    return param.partition_dim, getattr(param, "partition_stride", 1)


def shard(full: torch.Tensor, param, group) -> torch.Tensor:
    """This rank's piece of `full` for a parameter laid out like `param`."""
    size, split = dist.get_world_size(group), _split(param)
    if split is None or size == 1:
        return full
    dim, stride = split
    chunks = torch.split(full, full.shape[dim] // (size * stride), dim=dim)
    return torch.cat(chunks[dist.get_rank(group) :: size], dim=dim)


def unshard(local: torch.Tensor, param, group) -> torch.Tensor:
    """The full tensor from every rank's `local` piece (inverse of `shard`)."""
    size, split = dist.get_world_size(group), _split(param)
    if split is None or size == 1:
        return local
    dim, stride = split
    pieces = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(pieces, local.contiguous(), group=group)
    per_rank = [torch.split(p, p.shape[dim] // stride, dim=dim) for p in pieces]
    return torch.cat([per_rank[r][s] for s in range(stride) for r in range(size)], dim=dim)


def _named_tensors(model):
    """Parameters and the persistent buffers Megatron keeps state in (router expert bias)."""
    yield from model.named_parameters()
    for name, buf in model.named_buffers():
        if name.endswith("expert_bias"):
            yield name, buf


def _chunks(model_or_chunks) -> list:
    return list(model_or_chunks) if isinstance(model_or_chunks, list | tuple) else [model_or_chunks]


def _unwrapped(chunk):
    return chunk.module if isinstance(chunk, DistributedDataParallel) else chunk


def load_full_state(model_or_chunks, full: dict[str, torch.Tensor], num_local_experts: int):
    """Copy this rank's shard of every tensor in `full` (single-rank names) into the model
    (or into each of this rank's virtual-pipeline chunks)."""
    for chunk in map(_unwrapped, _chunks(model_or_chunks)):
        _load_chunk(chunk, full, num_local_experts)


def _load_chunk(model, full, num_local_experts) -> None:
    missing, offset = [], layer_offset(model)
    with torch.no_grad():
        for name, tensor in _named_tensors(model):
            key = global_name(name, num_local_experts, offset=offset)
            if key not in full:
                missing.append(key)
                continue
            tensor.copy_(shard(full[key], tensor, _tp_group(name)))
    if missing:
        raise KeyError(f"no full tensor for {len(missing)} model tensors, e.g. {missing[:3]}")


def gather_full(
    model_or_chunks,
    num_local_experts: int,
    select: Callable[[str, torch.Tensor], torch.Tensor | None] = lambda name, t: t,
) -> dict[str, torch.Tensor]:
    """Full tensors under single-rank names, on every rank: `select(name, param)` picks what
    to gather for each parameter (the parameter itself by default, e.g. `p.main_grad`)."""
    out = {}
    for chunk in map(_unwrapped, _chunks(model_or_chunks)):
        out.update(_gather_chunk(chunk, num_local_experts, select))
    if ps.get_pipeline_model_parallel_world_size() > 1:
        stages = [None] * ps.get_pipeline_model_parallel_world_size()
        dist.all_gather_object(stages, out, group=ps.get_pipeline_model_parallel_group())
        out = {key: value for stage in stages for key, value in stage.items()}
    return out


def _gather_chunk(model, num_local_experts, select) -> dict[str, torch.Tensor]:
    ep_rank, ep_size = _ep_layout()
    out, offset = {}, layer_offset(model)
    for name, tensor in _named_tensors(model):
        local = select(name, tensor)
        if local is None:
            continue
        # A copy: the result must not alias live parameters or gradient buffers.
        full = unshard(local.detach().clone(), tensor, _tp_group(name))
        if is_expert(name) and ep_size > 1:
            per_ep = [torch.empty_like(full) for _ in range(ep_size)]
            dist.all_gather(per_ep, full.contiguous(), group=ps.get_expert_model_parallel_group())
            for e, piece in enumerate(per_ep):
                out[global_name(name, num_local_experts, e, offset)] = piece
        else:
            out[global_name(name, num_local_experts, ep_rank, offset)] = full
    return out
