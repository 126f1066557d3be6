"""The reference model learns the built-in corpus in every residual mode (fixed seed)."""

import pytest

from megatron_attnres.study.reference_train import tiny_config, train


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["none", "full", "block"])
def test_loss_drops_by_30_percent_in_100_steps(mode):
    _, losses = train(tiny_config(mode), steps=100, seed=1234)
    first, last = sum(losses[:10]) / 10, sum(losses[90:100]) / 10
    assert last <= 0.7 * first, (mode, first, last)
