"""The depth read: gradcheck, lean vs reference, zero-query mean, input validation."""

import functools
import operator

import pytest
import torch

from megatron_attnres.attnres import DepthAttention, depth_read, depth_read_reference, tolerance
from megatron_attnres.attnres.tolerances import ulp

EPS = 1e-5


def make_inputs(n, shape=(3, 2, 8), dtype=torch.float64, requires_grad=True, scale_step=0.5):
    hidden = shape[-1]
    sources = [torch.randn(shape, dtype=dtype, requires_grad=requires_grad) for _ in range(n)]
    # Different scales per source make the key RMSNorm matter.
    with torch.no_grad():
        for i, src in enumerate(sources):
            src.mul_(0.5 + scale_step * i)
    w = torch.randn(hidden, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    g = 1.0 + 0.3 * torch.randn_like(w)
    return sources, w.requires_grad_(requires_grad), g.requires_grad_(requires_grad)


@pytest.mark.parametrize("num_sources", [1, 2, 9])
def test_lean_op_passes_float64_gradcheck(num_sources):
    sources, w, g = make_inputs(num_sources)
    assert torch.autograd.gradcheck(
        lambda w, g, *s: depth_read(list(s), w, g, EPS), (w, g, *sources), eps=1e-6, atol=1e-8
    )


def grads_of(op, sources, w, g, upstream):
    out = op(sources, w, g, EPS)
    grads = torch.autograd.grad(out, [*sources, w, g], grad_outputs=upstream)
    return out, grads


@pytest.mark.parametrize("num_sources", [2, 5, 9])
def test_lean_matches_reference_fp32(num_sources):
    sources, w, g = make_inputs(num_sources, shape=(16, 4, 64), dtype=torch.float32, scale_step=0.1)
    upstream = torch.randn(16, 4, 64)
    out_ref, grads_ref = grads_of(depth_read_reference, sources, w, g, upstream)
    out_lean, grads_lean = grads_of(depth_read, sources, w, g, upstream)
    tol = tolerance(torch.float32)
    tol.assert_close(out_lean, out_ref)
    for lean, ref in zip(grads_lean, grads_ref, strict=True):
        tol.assert_close(lean, ref)


def test_lean_matches_reference_bf16_inputs():
    sources, w, g = make_inputs(6, shape=(32, 2, 64), dtype=torch.bfloat16, scale_step=0.1)
    upstream = torch.randn(32, 2, 64, dtype=torch.bfloat16)
    out_ref, grads_ref = grads_of(depth_read_reference, sources, w, g, upstream)
    out_lean, grads_lean = grads_of(depth_read, sources, w, g, upstream)
    assert out_lean.dtype == torch.bfloat16 and grads_lean[0].dtype == torch.bfloat16
    assert grads_lean[-1].dtype == torch.float32  # parameter grads keep the parameter dtype
    tol = tolerance(torch.bfloat16)
    tol.assert_close(out_lean, out_ref)
    for lean, ref in zip(grads_lean, grads_ref, strict=True):
        # Both compute in fp32; only the final cast to bf16 (or none for the params) differs.
        tol.assert_close(lean.float(), ref.float())


def test_bf16_read_is_computed_in_fp32():
    sources, w, g = make_inputs(4, shape=(8, 64), dtype=torch.bfloat16, requires_grad=False)
    fp32 = depth_read_reference([s.float() for s in sources], w, g, EPS)
    assert torch.equal(depth_read(sources, w, g, EPS), fp32.to(torch.bfloat16))


@pytest.mark.parametrize("num_sources", range(1, 10))
@pytest.mark.parametrize("op", [depth_read, depth_read_reference])
def test_zero_query_read_is_the_mean_within_2_ulp(op, num_sources):
    sources = [torch.randn(64, 32) for _ in range(num_sources)]
    read = DepthAttention(32, EPS)
    out = op(sources, read.pseudo_query, read.key_norm_weight, EPS)
    plain_mean = functools.reduce(operator.add, sources) / num_sources
    # ulp at the scale of the largest summand: a mean can cancel to near zero, where the rounding
    # of its O(1) summands dominates and the ulp of the result itself means nothing.
    summand_scale = torch.stack([s.abs() for s in sources]).amax(dim=0)
    assert ((out - plain_mean).abs() <= 2 * ulp(summand_scale)).all()


@pytest.mark.parametrize("num_sources", [2, 4, 8])
def test_zero_query_read_is_bitwise_the_mean_for_powers_of_two(num_sources):
    sources = [torch.randn(128, 4, 32) for _ in range(num_sources)]
    read = DepthAttention(32, EPS)  # zero-initialised pseudo-query
    plain_mean = functools.reduce(operator.add, sources) / num_sources
    assert torch.equal(read(sources), plain_mean)


def test_single_source_read_is_the_identity():
    source = torch.randn(5, 32)
    read = DepthAttention(32, EPS)
    torch.nn.init.normal_(read.pseudo_query)
    assert read([source]) is source
    assert torch.equal(depth_read([source], read.pseudo_query, read.key_norm_weight, EPS), source)


def test_depth_attention_initialisation():
    read = DepthAttention(48, eps=1e-6)
    assert torch.equal(read.pseudo_query, torch.zeros(48))
    assert torch.equal(read.key_norm_weight, torch.ones(48))
    assert read.eps == 1e-6


def test_bad_inputs_are_named():
    w, g = torch.zeros(8), torch.ones(8)
    with pytest.raises(ValueError, match="at least one source"):
        depth_read([], w, g, EPS)
    with pytest.raises(ValueError, match=r"source 1 is \(4, 9\)"):
        depth_read([torch.zeros(4, 8), torch.zeros(4, 9)], w, g, EPS)
    with pytest.raises(ValueError, match=r"pseudo-query shape \(7,\)"):
        depth_read([torch.zeros(4, 8)], torch.zeros(7), g, EPS)
    with pytest.raises(ValueError, match="hidden_size must be a positive integer, got 0"):
        DepthAttention(0)
