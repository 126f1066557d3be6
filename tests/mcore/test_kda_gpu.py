"""On CUDA, the KDA operator is fla-core's Triton `chunk_kda`: it equals the CPU path (fla-core's
token recurrence after an explicit L2 normalisation) on the same inputs, forward and gradients.
The kernel's dot products run in TF32, so the comparison uses the bf16 tolerance."""

import pytest
import torch
import torch.nn.functional as F

from megatron_attnres.attnres import tolerance
from megatron_attnres.mcore.kda import kda_operator

pytestmark = pytest.mark.gpu


def test_chunk_kda_kernel_matches_the_cpu_recurrence():
    torch.manual_seed(0)
    b, t, h, d = 2, 80, 2, 32  # t spans two 64-token chunks, the second one partial
    q, k, v = (torch.randn(b, t, h, d) for _ in range(3))
    g = -torch.exp(torch.randn(h))[:, None] * F.softplus(torch.randn(b, t, h, d))
    beta = torch.sigmoid(torch.randn(b, t, h))
    probe = torch.randn(b, t, h, d)
    results = {}
    for device in ("cpu", "cuda"):
        inputs = [x.to(device).requires_grad_() for x in (q, k, v, g, beta)]
        out = kda_operator(*inputs)
        (out * probe.to(device)).sum().backward()
        results[device] = [out.detach().cpu()] + [x.grad.cpu() for x in inputs]
    tol = tolerance(torch.bfloat16)
    for name, cuda, cpu in zip(
        ("out", "dq", "dk", "dv", "dg", "dbeta"), results["cuda"], results["cpu"], strict=True
    ):
        tol.assert_close(cuda, cpu, name)
