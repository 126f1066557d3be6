"""The CPU depth-read kernel (kernels/depth_read_cpu.c) against the plain autograd reference in
float64: forward and every gradient, the bitwise rebuild used by the read-result recomputation,
dispatch, and what happens without a working compiler."""

import functools
import operator

import pytest
import torch

from megatron_attnres.attnres.depth_read import LeanDepthRead, depth_read_reference
from megatron_attnres.kernels import depth_read_cpu, depth_read_triton
from megatron_attnres.kernels.depth_read_cpu import CpuDepthRead, cpu_depth_read
from megatron_attnres.kernels.depth_read_triton import ENV_SWITCH, depth_read_auto

EPS = 1e-5
pytestmark = pytest.mark.skipif(
    depth_read_cpu.unavailable_reason() is not None,
    reason=f"the CPU kernel does not build here: {depth_read_cpu.unavailable_reason()}",
)


def inputs(num, shape, seed=0, scales=None):
    gen = torch.Generator().manual_seed(seed)
    scales = scales or [1.0] * num
    sources = [(s * torch.randn(*shape, generator=gen)).requires_grad_() for s in scales]
    hidden = shape[-1]
    w = (0.5 * torch.randn(hidden, generator=gen)).requires_grad_()
    g = (1.0 + 0.2 * torch.randn(hidden, generator=gen)).requires_grad_()
    grad_out = torch.randn(*shape, generator=gen)
    return sources, w, g, grad_out


def reference_in_float64(sources, w, g, grad_out):
    leaves = [t.detach().double().requires_grad_() for t in (w, g, *sources)]
    out = depth_read_reference(leaves[2:], leaves[0], leaves[1], EPS)
    return out, torch.autograd.grad(out, leaves, grad_out.double())


@pytest.mark.parametrize(
    ("num", "shape"),
    [(1, (5, 16)), (2, (128, 8, 64)), (3, (7, 3, 37)), (5, (200, 24)), (9, (67, 1, 130))],
)
def test_forward_and_gradients_match_the_float64_reference(num, shape):
    # Sources of different scales so that the weights are far from uniform; 200 and 67x1
    # tokens cross the kernel's 64-token dq flush; hidden 37 and 130 are not SIMD multiples.
    sources, w, g, grad_out = inputs(num, shape, scales=[0.5 + j for j in range(num)])
    out = cpu_depth_read(sources, w, g, EPS)
    assert out.grad_fn.name() == "CpuDepthReadBackward"
    grads = torch.autograd.grad(out, [w, g, *sources], grad_out)
    ref_out, ref_grads = reference_in_float64(sources, w, g, grad_out)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    for name, got, want in zip(["w", "g", *range(num)], grads, ref_grads, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=2e-5, msg=f"grad {name}")


def test_a_wrong_weight_gradient_would_be_caught():
    """Negative control for the tolerance above: the lean op with one source's gradient
    dropped differs from the reference by far more than it allows."""
    sources, w, g, grad_out = inputs(3, (64, 32), scales=[0.5, 1.5, 2.5])
    out = cpu_depth_read(sources, w, g, EPS)
    grads = torch.autograd.grad(out, [w, *sources], grad_out)
    _, ref_grads = reference_in_float64(sources, w, g, grad_out)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(grads[1].double() * 0.99, ref_grads[2], rtol=1e-4, atol=2e-5)


def test_sources_without_gradient_and_non_contiguous_sources():
    sources, w, g, grad_out = inputs(3, (16, 4, 24))
    sources[1] = sources[1].detach()
    transposed = torch.randn(4, 16, 24).transpose(0, 1).requires_grad_()  # non-contiguous leaf
    sources[2] = transposed
    out = cpu_depth_read(sources, w, g, EPS)
    dw, d0, d2 = torch.autograd.grad(out, [w, sources[0], sources[2]], grad_out)
    ref_out, ref = reference_in_float64(sources, w, g, grad_out)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    for got, want in ((dw, ref[0]), (d0, ref[2]), (d2, ref[4])):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=2e-5)
    assert d2.shape == transposed.shape


def test_rebuild_is_bitwise_the_result_and_zero_query_gives_the_mean():
    sources, w, g, _ = inputs(3, (50, 2, 40), scales=[1.0, 2.0, 3.0])
    out = cpu_depth_read(sources, w, g, EPS)
    assert torch.equal(out.grad_fn.rebuild(sources), out)
    # w = 0: equal weights 1/4, a power of two, so the read is the plain mean bitwise.
    four, zero, ones = inputs(4, (30, 20))[0], torch.zeros(20), torch.ones(20)
    mean = functools.reduce(operator.add, four) / 4
    assert torch.equal(cpu_depth_read(four, zero, ones, EPS), mean)


def test_dispatch_follows_the_backend_switch(monkeypatch):
    sources, w, g, _ = inputs(2, (8, 16))
    monkeypatch.delenv(ENV_SWITCH, raising=False)
    assert type(depth_read_auto(sources, w, g, EPS).grad_fn).__name__ == "CpuDepthReadBackward"
    monkeypatch.setenv(ENV_SWITCH, "torch")
    assert depth_read_auto(sources, w, g, EPS).grad_fn.name() == "LeanDepthReadBackward"
    monkeypatch.setenv(ENV_SWITCH, "auto")
    halves = [s.detach().bfloat16().requires_grad_() for s in sources]
    assert depth_read_auto(halves, w, g, EPS).grad_fn.name() == "LeanDepthReadBackward"
    monkeypatch.setenv(ENV_SWITCH, "cpu")
    with pytest.raises(RuntimeError, match="ATTNRES_DEPTH_READ=cpu"):
        depth_read_auto(halves, w, g, EPS)
    # The two implementations agree.
    lean = LeanDepthRead.apply(w, g, EPS, *sources)
    torch.testing.assert_close(CpuDepthRead.apply(w, g, EPS, *sources), lean)


def test_a_failing_compiler_is_named_and_the_pytorch_op_takes_over(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNRES_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", "false")  # exists, always fails
    with pytest.raises(RuntimeError, match="false failed"):
        depth_read_cpu.build_library()
    monkeypatch.setattr(depth_read_cpu, "_state", {})
    monkeypatch.setattr(depth_read_triton, "_CHOICES", {})  # forget this process's decisions
    with pytest.warns(UserWarning, match="CPU depth-read kernel is unavailable"):
        assert not depth_read_cpu.cpu_kernel_available(torch.zeros(4))
    monkeypatch.delenv(ENV_SWITCH, raising=False)
    sources, w, g, _ = inputs(2, (8, 16))
    assert depth_read_auto(sources, w, g, EPS).grad_fn.name() == "LeanDepthReadBackward"


def test_the_library_is_built_once_per_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNRES_KERNEL_CACHE", str(tmp_path))
    first = depth_read_cpu.build_library()
    stamp = first.stat().st_mtime_ns
    assert depth_read_cpu.build_library() == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporaries left behind


def test_vector_flags_follow_pytorchs_cpu_capability(monkeypatch):
    monkeypatch.setattr(depth_read_cpu.platform, "machine", lambda: "x86_64")
    for capability, vector in (("AVX512", True), ("AVX2", True), ("DEFAULT", False)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        flags = depth_read_cpu.build_flags()
        assert ("-mavx2" in flags and "-mfma" in flags) == vector, capability
    monkeypatch.setattr(depth_read_cpu.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert depth_read_cpu.build_flags() == depth_read_cpu.FLAGS


def test_the_portable_build_is_correct_too(monkeypatch, tmp_path):
    """Machines without AVX2 get the portable flags: that library, cached under its own key,
    meets the same float64 reference."""
    this_machine = depth_read_cpu.build_library().name, depth_read_cpu.build_flags()
    monkeypatch.setenv("ATTNRES_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(depth_read_cpu, "build_flags", lambda: depth_read_cpu.FLAGS)
    monkeypatch.setattr(depth_read_cpu, "_state", {})
    portable = depth_read_cpu.build_library()
    # The flags are in the cache key: a shared cache keeps one library per flag set.
    assert (portable.name == this_machine[0]) == (this_machine[1] == depth_read_cpu.FLAGS)
    sources, w, g, grad_out = inputs(4, (77, 2, 45), scales=[0.5, 1.5, 2.5, 3.5])
    out = cpu_depth_read(sources, w, g, EPS)
    assert depth_read_cpu._state["lib"]._name == str(portable)
    grads = torch.autograd.grad(out, [w, g, *sources], grad_out)
    ref_out, ref_grads = reference_in_float64(sources, w, g, grad_out)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=2e-5)
    assert torch.equal(out.grad_fn.rebuild(sources), out)
