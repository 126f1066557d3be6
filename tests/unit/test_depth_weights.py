"""`depth_weights`: the softmax weights of the depth read (used by the training diagnostics)."""

import pytest
import torch

from megatron_attnres.attnres import depth_read_reference, tolerance
from megatron_attnres.attnres.depth_read import depth_weights

EPS = 1e-5
TOKENS = (5, 3)  # [S, B]
HIDDEN = 16


def make_sources(n, dtype=torch.float32):
    # Different scales per source make the key RMSNorm matter.
    return [(0.5 + 0.7 * i) * torch.randn(*TOKENS, HIDDEN).to(dtype) for i in range(n)]


def random_params():
    return torch.randn(HIDDEN), 1.0 + 0.3 * torch.randn(HIDDEN)


@pytest.mark.parametrize("num_sources", [1, 2, 7])
def test_weights_are_a_distribution_over_sources(num_sources):
    w, g = random_params()
    weights = depth_weights(make_sources(num_sources), w, g, EPS)
    assert weights.shape == (num_sources, *TOKENS)
    assert weights.dtype == torch.float32 and (weights >= 0).all()
    tolerance(torch.float32).assert_close(weights.sum(dim=0), torch.ones(TOKENS))


def test_zero_pseudo_query_gives_equal_weights():
    _, g = random_params()
    weights = depth_weights(make_sources(5), torch.zeros(HIDDEN), g, EPS)
    torch.testing.assert_close(weights, torch.full((5, *TOKENS), 1 / 5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weighted_sum_of_sources_is_the_reference_read(dtype):
    sources, (w, g) = make_sources(4, dtype), random_params()
    weights = depth_weights(sources, w, g, EPS)
    assert weights.dtype == torch.float32  # computed in fp32 for half inputs too
    # Independent of the reference's own sum: weights times fp32 values, summed in float64.
    mixed = sum(
        a.double().unsqueeze(-1) * v.double() for a, v in zip(weights, sources, strict=True)
    )
    expected = depth_read_reference(sources, w, g, EPS)
    tolerance(dtype).assert_close(mixed.to(dtype), expected)
    # A non-trivial read: the weights are far from uniform.
    assert (weights - 0.25).abs().max() > 0.05


def test_weights_follow_the_scores():
    # w aligned with the keys of source 1 (a constant vector) makes it the dominant source.
    sources = [torch.randn(*TOKENS, HIDDEN), torch.ones(*TOKENS, HIDDEN)]
    weights = depth_weights(sources, 3.0 * torch.ones(HIDDEN), torch.ones(HIDDEN), EPS)
    assert (weights[1] > 0.99).all()


def test_bad_input_is_refused():
    w, g = random_params()
    with pytest.raises(ValueError, match="at least one source"):
        depth_weights([], w, g, EPS)
    with pytest.raises(ValueError, match="pseudo-query shape"):
        depth_weights(make_sources(2), torch.zeros(HIDDEN + 1), g, EPS)
