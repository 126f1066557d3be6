"""TP=2 with sequence parallelism, EP=2 and TP=2 x EP=2 train exactly like one rank.

The tiny Block AttnRes MoE of `parity_harness` (8 transformer layers, 2 per depth block, 4 experts
top-2, sigmoid router with expert-bias updates, aux loss, shared expert, dense first layer) takes 3
optimizer steps on each layout; losses, gathered gradients and weights must match the single-rank
run at rtol 1e-5. Each layout also runs a negative control, a sabotage a real bug could cause,
that must break parity on the AttnRes gradients (and only there) at the first step:
- `no_sp_allreduce`: the AttnRes parameters lose their `sequence_parallel` mark, so their
  gradients are no longer summed over the tensor-parallel ranks' sequence shards;
- `as_expert_params`: the AttnRes parameters are marked as expert parameters (allreduce=False),
  so DDP reduces them over the expert-data-parallel group instead of the data-parallel group.
"""

import pytest

from megatron_attnres.testing.launcher import run_distributed
from tests.distributed.parity_harness import (
    Layout,
    assert_trains_like,
    is_attnres,
    mismatched,
    train_on_layout,
)

pytestmark = [pytest.mark.distributed, pytest.mark.mcore]


@pytest.fixture(scope="module")
def single_rank():
    return run_distributed(train_on_layout, world_size=1, args=(Layout(),))[0]["none"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("layout", "sabotage"),
    [
        (Layout(tp=2), "no_sp_allreduce"),
        (Layout(ep=2, dp=2), "as_expert_params"),
        (Layout(tp=2, ep=2, dp=2), "no_sp_allreduce"),
    ],
    ids=["tp2-sp", "ep2", "tp2xep2"],
)
def test_parallel_layout_trains_like_one_rank(single_rank, layout, sabotage):
    runs = run_distributed(train_on_layout, layout.world_size, args=(layout, (sabotage,)))[0]
    assert_trains_like(runs["none"], single_rank)
    # The expert biases really moved (the same way on both layouts, compared above).
    bias = [k for k in single_rank["initial"] if k.endswith("expert_bias")]
    final = single_rank["weights"][-1]
    assert bias and all((final[k] != single_rank["initial"][k]).any() for k in bias)

    broken = mismatched(runs[sabotage]["grads"][0], single_rank["grads"][0])
    assert broken, f"sabotage {sabotage!r} went unnoticed"
    assert all(is_attnres(key) for key in broken), broken
