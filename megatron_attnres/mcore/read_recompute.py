"""Keep a depth read's result out of the saved activations: recompute it in backward.

A sublayer's first op, its pre-norm, saves its input for backward. Under the standard residual
that input is the residual stream, which exists anyway; under AttnRes it is the depth read's
result x, a new [s, b, h] tensor per sublayer, while the read's sources (completed summaries and
the partial summary) are kept as well. That one tensor per sublayer is the whole activation
overhead of AttnRes beyond 3 fp32 scalars per source and token (docs/benchmarks.md measures it).

`recomputed_read_result(x, recompute)` is a `saved_tensors_hooks` context for the sublayer's
forward: any tensor the sublayer saves that *is* x (same storage, offset, shape, strides and
dtype) is stored as a recipe instead, and rebuilt by `recompute()` (the same read, without
autograd, over the same sources, which the read keeps alive for its own backward) when backward
first needs it. The recomputation runs the same deterministic arithmetic on the same inputs, so
the result is bitwise the saved one. Every other saved tensor passes through untouched.
"""

import contextlib
from collections.abc import Callable

import torch


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
        and a.device == b.device
    )


class _Recipe:
    """Stands in for x among a sublayer's saved tensors."""

    __slots__ = ("recompute", "value")

    def __init__(self, recompute: Callable[[], torch.Tensor]):
        self.recompute = recompute
        self.value = None

    def get(self) -> torch.Tensor:
        # Unpacked once per saving op; two ops saving x share one recomputation.
        if self.value is None:
            with torch.no_grad():
                self.value = self.recompute()
        return self.value


def _outer_hooks():
    """The saved-tensor hooks already active (a memory profiler, activation offloading), if any:
    torch uses only the innermost pair, so ours hands every other tensor on to them. The getter
    is private torch API; without it the outer hooks are skipped inside sublayers."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    hooks = top(False) if top is not None else None
    return hooks if hooks is not None else (lambda t: t, lambda t: t)


@contextlib.contextmanager
def recomputed_read_result(x: torch.Tensor, recompute: Callable[[], torch.Tensor]):
    recipe = _Recipe(recompute)
    outer_pack, outer_unpack = _outer_hooks()

    def pack(tensor):
        return recipe if _same_tensor(tensor, x) else outer_pack(tensor)

    def unpack(packed):
        return packed.get() if packed is recipe else outer_unpack(packed)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
