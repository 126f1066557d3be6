"""Keep a depth read's result out of the saved activations: recompute it in backward.

A sublayer's first op, its pre-norm, saves its input for backward. Under the standard residual
that input is the residual stream, which exists anyway; under AttnRes it is the depth read's
result x, a new [s, b, h] tensor per sublayer, while the read's sources (completed summaries and
the partial summary) are kept as well. That one tensor per sublayer is the whole activation
overhead of AttnRes beyond 3 fp32 scalars per source and token (docs/benchmarks.md measures it).

`recomputed_read_result(x, recompute)` is a `saved_tensors_hooks` context: any tensor saved
inside it that *is* x (same storage, offset, shape, strides and dtype) is stored as a recipe
instead, and rebuilt by `recompute()` when backward first needs it. The model's recompute is the
read's weighted sum from its saved weights (`DepthAttention.recompute`: the same ops on the same
sources, which the read keeps alive for its own backward), so the result is bitwise the saved
one. Every other saved tensor passes through untouched.

Scope. Python saved-tensor hooks are not free: every tensor saved inside them crosses into
Python twice (pack, unpack), measured at tens of microseconds each on CPU, and a MoE sublayer
saves dozens. So the context covers only the sublayer's entry module, the pre-norm that consumes
x (`entry_module`), entered and left by forward hooks on that module (`ReadResultScope`); a
layer whose entry cannot be identified (TransformerEngine's norm fused into the first linear)
gets the context around its whole forward, as before.
"""

import contextlib
from collections.abc import Callable

import torch
from megatron.core.transformer.identity_op import IdentityOp


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


def entry_module(layer) -> torch.nn.Module | None:
    """The module of `layer` that first consumes the layer's input: its pre-norm
    (`input_layernorm`, else `pre_mlp_layernorm`); None when neither is a real module."""
    for name in ("input_layernorm", "pre_mlp_layernorm"):
        module = getattr(layer, name, None)
        if isinstance(module, torch.nn.Module) and not isinstance(module, IdentityOp):
            return module
    return None


class ReadResultScope:
    """Applies `recomputed_read_result` to the entry module of a layer only.

    `attach(module)` registers forward pre/post hooks on the entry module once; `run(x, recompute,
    consumer)` arms the scope and calls `consumer()` (the layer), whose entry module then saves
    inside the context. The post hook also runs when the module raises (always_call), so the
    hooks never leak. The scope is disarmed outside `run`: a layer re-run by Megatron's activation
    recompute in backward saves normally.
    """

    def __init__(self):
        self._armed = None  # (x, recompute) during run()
        self._active = None  # the entered context

    def attach(self, module: torch.nn.Module) -> None:
        module.register_forward_pre_hook(self._enter)
        module.register_forward_hook(self._exit, always_call=True)

    def run(self, x, recompute, consumer):
        self._armed = (x, recompute)
        try:
            return consumer()
        finally:
            self._armed = None

    def _enter(self, module, args):
        if self._armed is not None and self._active is None:
            self._active = recomputed_read_result(*self._armed)
            self._active.__enter__()

    def _exit(self, module, args, output):
        if self._active is not None:
            active, self._active = self._active, None
            active.__exit__(None, None, None)
