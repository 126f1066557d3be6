"""`DepthAttention`: the learned parameters of one depth read (docs/architecture.md section 3)."""

from collections.abc import Sequence
from functools import partial

import torch
from torch import nn

from megatron_attnres.attnres.depth_read import depth_read, depth_read_reference


class DepthAttention(nn.Module):
    """One depth read: a pseudo-query w (zero-initialised) and a key RMSNorm gain g (ones).

    With w = 0 every read starts as the equal-weight average of its sources. `lean=False` selects
    the plain autograd implementation (useful as an oracle and for debugging). `read_fn` replaces
    the lean read with another implementation of the same signature (the model passes
    `megatron_attnres.kernels.depth_read_auto`: the fused Triton kernel on GPU). `dtype` is the
    parameters' storage dtype (a bf16 model stores them in bf16 like its norm gains, with fp32
    main copies in the optimizer); the read itself always computes in fp32.
    """

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-5,
        lean: bool = True,
        read_fn=None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive integer, got {hidden_size!r}")
        self.hidden_size = hidden_size
        self.eps = float(eps)
        self.lean = lean
        self.read_fn = read_fn if read_fn is not None else depth_read
        self.pseudo_query = nn.Parameter(torch.empty(hidden_size, dtype=dtype))
        self.key_norm_weight = nn.Parameter(torch.empty(hidden_size, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.pseudo_query.zero_()
            self.key_norm_weight.fill_(1.0)

    def forward(self, sources: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(sources) == 1:
            # A single source: softmax over one entry is 1, the read is the identity.
            return sources[0]
        read = self.read_fn if self.lean else depth_read_reference
        return read(sources, self.pseudo_query, self.key_norm_weight, self.eps)

    def recompute_fn(self, sources: Sequence[torch.Tensor], result: torch.Tensor):
        """A function that computes `result` (this read's output over `sources`) again, bitwise:
        the weighted sum from the weights the read kept (`ctx.rebuild` of `LeanDepthRead` and
        of the CPU kernel's read), or else the whole read. It holds the sources and those
        weights, never `result` itself."""
        rebuild = getattr(result.grad_fn, "rebuild", None)
        if rebuild is not None:
            return partial(rebuild, list(sources))
        return partial(self.forward, list(sources))

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, eps={self.eps}, lean={self.lean}"
