"""The one place where numerical tolerances are defined (docs/architecture.md section 3b)."""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    """Elementwise `rtol`, plus an absolute floor `atol` measured at the tensor's own scale.

    The floor is atol * max(1, max|expected|): an element that cancels to near zero (a sum of O(1)
    terms, a gradient summed over tokens) can differ by a few ulp of the terms it came from, not
    of its own small value. A real bug gives O(1) relative errors and still fails.
    """

    rtol: float
    atol: float

    def assert_close(self, actual: torch.Tensor, expected: torch.Tensor, msg: str = "") -> None:
        scale = max(1.0, expected.detach().abs().max().item()) if expected.numel() else 1.0
        torch.testing.assert_close(
            actual,
            expected,
            rtol=self.rtol,
            atol=self.atol * scale,
            msg=(lambda m: f"{msg}\n{m}") if msg else None,
        )


# fp32: single-process parity and distributed-vs-single-rank parity at rtol 1e-5
# (docs/architecture.md section 3b).
_FP32 = Tolerance(rtol=1e-5, atol=1e-5)
_FP64 = Tolerance(rtol=1e-10, atol=1e-12)


def tolerance(dtype: torch.dtype) -> Tolerance:
    """Parity tolerance for results computed in `dtype`.

    float32/float64 are fixed by the design; half types derive from their machine epsilon: a few
    roundings of the output (4 eps).
    """
    if dtype == torch.float64:
        return _FP64
    if dtype == torch.float32:
        return _FP32
    if dtype in (torch.bfloat16, torch.float16):
        eps = torch.finfo(dtype).eps
        return Tolerance(rtol=4 * eps, atol=4 * eps)
    raise ValueError(
        f"no parity tolerance defined for dtype {dtype}; use float32, float64, bfloat16 or float16"
    )


def ulp(x: torch.Tensor) -> torch.Tensor:
    """Unit in the last place at each element's magnitude (float32/float64)."""
    return torch.nextafter(x.abs(), torch.full_like(x, float("inf"))) - x.abs()
