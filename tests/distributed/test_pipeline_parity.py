"""Pipeline parallelism (1F1B) where only depth-block summaries cross stages (DESIGN section 5).

PP=2, PP=4 and PP=2 x EP=2 take 3 optimizer steps over 4 micro-batches with the same losses,
gathered gradients and weights as one rank (rtol 1e-5); so does Full AttnRes with PP=2. The bytes
Megatron's p2p calls move (shape messages excluded) equal, at every boundary and micro-batch,
(completed summaries, b_0 included) x seq x micro-batch x hidden x 4 in both directions. Negative
controls: a receiving stage that detaches its summaries (no gradient back to their producers) or
loses b_0 must break parity.
"""

import pytest

from megatron_attnres.mcore.pipeline import balanced_cuts, payload_bytes
from megatron_attnres.mcore.reference_mapping import megatron_config
from tests.distributed.launcher import run_distributed
from tests.distributed.parity_harness import (
    MICRO_BATCH,
    SEQ,
    STEPS,
    Layout,
    assert_trains_like,
    mismatched,
    tiny_moe,
    train_on_layout,
)

pytestmark = [pytest.mark.distributed, pytest.mark.mcore, pytest.mark.slow]
MICROBATCHES = 4


@pytest.fixture(scope="module")
def single_rank():
    runs = {}
    for mode, k in (("block", 2), ("full", 1)):
        layout = Layout(microbatches=MICROBATCHES)
        runs[mode] = run_distributed(train_on_layout, 1, args=(layout, (), mode, k))[0]["none"]
    return runs


def expected_traffic(layout: Layout, mode: str, k: int) -> list[dict]:
    """Per rank: bytes of every tensor sent/received forward ('next') and backward ('prev')."""
    schedule = megatron_config(tiny_moe(mode, k)).depth_block_schedule()
    per_boundary = [payload_bytes(schedule, cut, SEQ * MICRO_BATCH, 32, 4)
                    for cut in balanced_cuts(schedule, layout.pp)]  # fmt: skip
    transfers = STEPS * MICROBATCHES // layout.dp
    ranks_per_stage = layout.world_size // layout.pp  # pipeline is the outermost rank dimension
    expected = []
    for rank in range(layout.world_size):
        stage = rank // ranks_per_stage
        sent, received = {}, {}
        if stage < layout.pp - 1:  # activations out, their gradients back in
            sent["next"] = received["prev"] = [per_boundary[stage]] * transfers
        if stage > 0:
            received["next"] = sent["prev"] = [per_boundary[stage - 1]] * transfers
        expected.append({"sent": sent, "received": received})
    return expected


@pytest.mark.parametrize(
    ("layout", "mode", "sabotage"),
    [
        (Layout(pp=2, microbatches=MICROBATCHES), "block", "detached_summaries"),
        (Layout(pp=4, microbatches=MICROBATCHES), "block", "dropped_b0"),
        (Layout(pp=2, ep=2, dp=2, microbatches=MICROBATCHES), "block", "detached_summaries"),
        (Layout(pp=2, microbatches=MICROBATCHES), "full", "dropped_b0"),
    ],
    ids=["pp2", "pp4", "pp2xep2", "pp2-full-attnres"],
)
def test_pipeline_trains_like_one_rank_and_sends_only_summaries(single_rank, layout, mode,
                                                                 sabotage):  # fmt: skip
    k = 2 if mode == "block" else 1
    runs = run_distributed(train_on_layout, layout.world_size,
                           args=(layout, (sabotage,), mode, k))[0]  # fmt: skip
    oracle = single_rank[mode]
    assert_trains_like(runs["none"], oracle)
    assert runs["none"]["traffic"] == expected_traffic(layout, mode, k)

    broken = mismatched(runs[sabotage]["grads"][0], oracle["grads"][0])
    assert broken, f"sabotage {sabotage!r} went unnoticed"
