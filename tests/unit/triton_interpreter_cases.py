"""The fused Triton depth reads under Triton's CPU interpreter (TRITON_INTERPRET=1).

Training kernel (megatron_attnres.kernels): forward and gradients of every source, w and g equal
the plain autograd `depth_read_reference`. Inference kernels (the exported HF folder's
depth_read_triton.py): phase 1 / phase 2 equal the torch phase functions and the one-shot read.
Not collected by itself: tests/unit/test_triton_depth_read.py runs this file in a fresh process
with TRITON_INTERPRET=1 set before triton is imported (triton's own @triton.jit library functions,
such as tl.zeros, only run interpreted when the variable is set at import).
"""

import pytest
import torch

from megatron_attnres.attnres import DepthAttention, depth_read_reference, tolerance
from megatron_attnres.conversion.hf import depth_read_triton as hf_triton
from megatron_attnres.conversion.hf import modeling_attnres as hf
from megatron_attnres.kernels import depth_read_triton as kern

EPS = 1e-5
FP32 = tolerance(torch.float32)


@pytest.fixture
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv(kern.ENV_SWITCH, raising=False)


def make_inputs(num_sources, shape, dtype=torch.float32):
    """Sources with different scales (the key RMSNorm matters), random w (so g gets gradients)."""
    sources = [(torch.randn(shape) * (0.5 + 0.4 * i)).to(dtype) for i in range(num_sources)]
    w = torch.randn(shape[-1])
    g = 1.0 + 0.3 * torch.randn(shape[-1])
    return sources, w, g


def read_and_grads(op, sources, w, g, upstream, eps=EPS, **kwargs):
    leaves = [t.detach().requires_grad_() for t in [*sources, w, g]]
    out = op(leaves[:-2], leaves[-2], leaves[-1], eps, **kwargs)
    return out, torch.autograd.grad(out, leaves, grad_outputs=upstream)


# N sources, source shape (token dims..., H with H not a power of two), token rows per program.
CASES = [
    (1, (3, 8), None),
    (2, (17, 20), None),
    (5, (17, 40), 4),  # 5 token blocks over 2 backward programs: the strided loop
    (5, (3, 4, 33), 2),  # leading dims flattened, masks on tokens and hidden
]


@pytest.mark.parametrize(("num_sources", "shape", "block_tokens"), CASES)
def test_fused_read_matches_reference_fp32(interpreter, num_sources, shape, block_tokens):
    sources, w, g = make_inputs(num_sources, shape)
    upstream = torch.randn(shape)
    out, grads = read_and_grads(
        kern.fused_depth_read, sources, w, g, upstream, block_tokens=block_tokens
    )
    ref_out, ref_grads = read_and_grads(depth_read_reference, sources, w, g, upstream)
    FP32.assert_close(out, ref_out)
    names = [f"source {i}" for i in range(num_sources)] + ["w", "g"]
    for name, grad, ref in zip(names, grads, ref_grads, strict=True):
        FP32.assert_close(grad, ref, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_accumulate_in_fp32(interpreter, dtype):
    sources, w, g = make_inputs(3, (13, 24), dtype)
    upstream = torch.randn(13, 24).to(dtype)
    out, grads = read_and_grads(kern.fused_depth_read, sources, w, g, upstream)
    assert out.dtype == dtype and all(gr.dtype == dtype for gr in grads[:3])
    # The fp32 oracle on the same values: only the final roundings to `dtype` differ.
    sources32 = [s.float() for s in sources]
    ref_out, ref_grads = read_and_grads(depth_read_reference, sources32, w, g, upstream.float())
    half = tolerance(dtype)
    half.assert_close(out.float(), ref_out)
    for i in range(3):
        half.assert_close(grads[i].float(), ref_grads[i], msg=f"source {i}")
    # dw, dg are fp32 sums of fp32 products of the same half values.
    FP32.assert_close(grads[3], ref_grads[3], msg="w")
    FP32.assert_close(grads[4], ref_grads[4], msg="g")


def test_negative_controls_make_the_comparison_fail(interpreter):
    sources, w, g = make_inputs(4, (9, 20))
    upstream = torch.randn(9, 20)
    ref_out, ref_grads = read_and_grads(depth_read_reference, sources, w, g, upstream)
    out, grads = read_and_grads(kern.fused_depth_read, sources, w, g, upstream, eps=0.5)
    with pytest.raises(AssertionError):
        FP32.assert_close(out, ref_out)
    with pytest.raises(AssertionError):
        FP32.assert_close(grads[-1], ref_grads[-1])  # dg with a perturbed eps
    dropped, _ = read_and_grads(kern.fused_depth_read, sources[:-1], w, g, upstream)
    with pytest.raises(AssertionError):
        FP32.assert_close(dropped, ref_out)


def test_only_requested_source_gradients(interpreter):
    sources, w, g = make_inputs(3, (7, 12))
    leaves = [sources[0], sources[1].requires_grad_(), sources[2].requires_grad_()]
    w, g = w.requires_grad_(), g.detach()
    out = kern.fused_depth_read(leaves, w, g, EPS)
    grads = torch.autograd.grad(out.square().sum(), [leaves[1], leaves[2], w])
    ref = depth_read_reference(leaves, w, g, EPS)
    ref_grads = torch.autograd.grad(ref.square().sum(), [leaves[1], leaves[2], w])
    for grad, expected in zip(grads, ref_grads, strict=True):
        FP32.assert_close(grad, expected)


def test_saves_only_per_token_fp32_scalars(interpreter):
    num, tokens, hidden = 4, 10, 24
    sources, w, g = make_inputs(num, (tokens, hidden))
    leaves = [t.requires_grad_() for t in [*sources, w, g]]
    inputs = {t.untyped_storage().data_ptr() for t in leaves}
    saved = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in inputs:
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        kern.fused_depth_read(leaves[:num], leaves[-2], leaves[-1], EPS)
    assert sum(saved.values()) == (2 * num + 1) * tokens * 4  # r, t per source; lse per token


def test_dispatch_switch(monkeypatch):
    cpu = torch.zeros(2, 8)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(kern.ENV_SWITCH, raising=False)
    assert kern.depth_read_backend() == "auto"
    assert not kern.fused_depth_read_available(cpu)  # CPU without the interpreter
    monkeypatch.setenv(kern.ENV_SWITCH, "triton")
    with pytest.raises(RuntimeError, match="ATTNRES_DEPTH_READ=triton"):
        kern.fused_depth_read_available(cpu)
    monkeypatch.setenv(kern.ENV_SWITCH, "cuda")
    with pytest.raises(ValueError, match="one of"):
        kern.fused_depth_read_available(cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(kern.ENV_SWITCH, "auto")
    assert kern.fused_depth_read_available(cpu)
    assert not kern.fused_depth_read_available(cpu.double())  # float64 stays on PyTorch
    monkeypatch.setenv(kern.ENV_SWITCH, "torch")
    assert not kern.fused_depth_read_available(cpu)
    with pytest.raises(ValueError, match="float64"):
        kern.fused_depth_read([cpu.double()] * 2, torch.zeros(8), torch.ones(8), EPS)


@pytest.mark.parametrize(
    ("backend", "expected"), [("auto", "FusedDepthRead"), ("torch", "LeanDepthRead")]
)
def test_model_read_dispatches(interpreter, monkeypatch, backend, expected):
    monkeypatch.setenv(kern.ENV_SWITCH, backend)
    read = DepthAttention(16, EPS, read_fn=kern.depth_read_auto)
    with torch.no_grad():
        read.pseudo_query.normal_()
    sources = [torch.randn(5, 16, requires_grad=True) for _ in range(3)]
    out = read(sources)
    assert type(out.grad_fn).__name__.startswith(expected)
    FP32.assert_close(
        out, depth_read_reference(sources, read.pseudo_query, read.key_norm_weight, EPS)
    )


# ----------------------------------------------------------------------------- two-phase
PHASE_CASES = [
    (1, 3, (2, 3, 8), torch.float32),
    (3, 5, (1, 17, 40), torch.float32),
    (2, 2, (5, 20), torch.bfloat16),
]


@pytest.mark.parametrize(("num_completed", "reads", "shape", "dtype"), PHASE_CASES)
def test_two_phase_kernels_match_torch(interpreter, num_completed, reads, shape, dtype):
    completed = [(torch.randn(shape) * (0.5 + 0.4 * i)).to(dtype) for i in range(num_completed)]
    partial = torch.randn(shape).to(dtype)
    queries = torch.randn(reads, shape[-1])
    assert hf_triton.triton_depth_read_available(completed[0])
    stats = hf_triton.depth_read_phase1_triton(completed, queries, EPS)
    ref = hf.depth_read_phase1(completed, queries, EPS)
    for name, got, expected in zip(ref._fields, stats, ref, strict=True):
        FP32.assert_close(got, expected, msg=name)
    out_tol = tolerance(dtype)
    for r in range(reads):
        for part in (None, partial):
            got = hf_triton.depth_read_phase2_triton(
                stats[0][:, r], stats[1][:, r], stats[2][:, r], part, queries[r], EPS, completed[0]
            )
            assert got.dtype == dtype and got.shape == shape
            expected = hf.depth_read_phase2(ref, r, part, queries[r], EPS, like=completed[0])
            out_tol.assert_close(got.float(), expected.float(), msg=f"read {r}")
            sources = completed if part is None else [*completed, part]
            one_shot = hf.depth_read(sources, queries[r], EPS)
            out_tol.assert_close(got.float(), one_shot.float(), msg=f"one-shot read {r}")


def test_two_phase_negative_control(interpreter):
    completed = [torch.randn(6, 12) * (1 + i) for i in range(3)]
    partial, queries = torch.randn(6, 12), torch.randn(2, 12)
    stats = hf_triton.depth_read_phase1_triton(completed[:-1], queries, EPS)  # dropped summary
    got = hf_triton.depth_read_phase2_triton(
        stats[0][:, 0], stats[1][:, 0], stats[2][:, 0], partial, queries[0], EPS, completed[0]
    )
    with pytest.raises(AssertionError):
        FP32.assert_close(got, hf.depth_read([*completed, partial], queries[0], EPS))


def test_modeling_code_uses_the_kernels_under_the_interpreter(interpreter, monkeypatch):
    calls = []
    phase2 = hf_triton.depth_read_phase2_triton
    monkeypatch.setattr(
        hf, "depth_read_phase2_triton", lambda *a, **k: calls.append(1) or phase2(*a, **k)
    )
    completed = [torch.randn(4, 8) for _ in range(2)]
    partial, queries = torch.randn(4, 8), torch.randn(2, 8)
    stats = hf.depth_read_phase1(completed, queries, EPS)
    got = hf.depth_read_phase2(stats, 1, partial, queries[1], EPS, like=completed[0])
    assert calls == [1]
    FP32.assert_close(got, hf.depth_read([*completed, partial], queries[1], EPS))
