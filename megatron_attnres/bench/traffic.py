"""Instrumented memory traffic of the PyTorch two-phase depth reads (the exported HF model's
`depth_read_phase1` / `depth_read_phase2`), to check `cost_model.two_phase_traffic` against.

Every aten op that runs inside one phase call passes through a TorchDispatchMode. One call is
treated as one kernel, and what it counts is defined as:
- external reads: the bytes of every tensor region an op reads whose storage was not written
  inside this call (its sources, the phase-1 statistics, the pseudo-queries), each distinct
  region once (`region_key`: x and x[None] are one region; broadcast dimensions not repeated);
- result writes: the bytes of the tensors the call returns that it produced itself.
These are the reads and writes a fused kernel cannot avoid. Everything else the eager code moves
(temporaries: the stacked upcast, scores, exp weights, rescaled accumulators) is counted apart as
`all_read` / `all_write`: every op's inputs and outputs, views excluded. The partial-summary add
(`partial + y` in `_depth_attention`) is not a phase call and is not instrumented here.
"""

from contextlib import contextmanager
from dataclasses import dataclass, field
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from megatron_attnres.bench.cost_model import Traffic


def region_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a (possibly broadcast) view covers."""
    elements = 1
    for size, stride in zip(t.shape, t.stride(), strict=True):
        if stride != 0:
            elements *= size
    return elements * t.element_size()


def region_key(t: torch.Tensor) -> tuple:
    """Identifies the elements a view covers: storage, offset and the (size, stride) of its
    dimensions that move (size-1 and broadcast dimensions dropped), so that x and x[None] are
    one region."""
    dims = tuple((n, s) for n, s in zip(t.shape, t.stride(), strict=True) if n > 1 and s != 0)
    return (t.untyped_storage().data_ptr(), t.storage_offset(), t.element_size(), dims)


class _CallCounter(TorchDispatchMode):
    """Counts one call's external reads and all op traffic (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.produced: set[int] = set()  # storages written by ops inside the call
        self.external: dict[tuple, int] = {}
        self.all_read = self.all_write = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:  # no data moves
            return out
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor):
                nbytes = region_bytes(t)
                self.all_read += nbytes
                ptr = t.untyped_storage().data_ptr()
                if ptr not in self.produced:
                    self.external[region_key(t)] = nbytes
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.produced.add(t.untyped_storage().data_ptr())
                self.all_write += region_bytes(t)
        return out

    def result_bytes(self, result) -> int:
        return sum(
            region_bytes(t)
            for t in tree_leaves(tuple(result))
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in self.produced
        )


@dataclass
class MeasuredTraffic:
    """Per phase: unavoidable traffic (Traffic) and every op's traffic (temporaries included)."""

    unavoidable: dict[str, Traffic] = field(default_factory=dict)
    all_ops: dict[str, Traffic] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def add(self, phase: str, unavoidable: Traffic, all_ops: Traffic) -> None:
        self.unavoidable[phase] = self.unavoidable.get(phase, Traffic()) + unavoidable
        self.all_ops[phase] = self.all_ops.get(phase, Traffic()) + all_ops
        self.calls[phase] = self.calls.get(phase, 0) + 1


def counted(fn, phase: str, measured: MeasuredTraffic):
    """`fn` with each call's traffic added to `measured` under `phase`."""

    def wrapper(*args, **kwargs):
        with _CallCounter() as counter:
            result = fn(*args, **kwargs)
        outputs = result if isinstance(result, tuple) else (result,)
        unavoidable = Traffic(
            read=sum(counter.external.values()), write=counter.result_bytes(outputs)
        )
        measured.add(phase, unavoidable, Traffic(counter.all_read, counter.all_write))
        return result

    return wrapper


@contextmanager
def instrument_two_phase(modeling_module):
    """Count the traffic of every phase call made through `modeling_module` (the HF modeling
    module whose `_depth_attention` calls them) while the context is open."""
    measured = MeasuredTraffic()
    phase1 = counted(modeling_module.depth_read_phase1, "phase1", measured)
    phase2 = counted(modeling_module.depth_read_phase2, "phase2", measured)
    with (
        mock.patch.object(modeling_module, "depth_read_phase1", phase1),
        mock.patch.object(modeling_module, "depth_read_phase2", phase2),
    ):
        yield measured
