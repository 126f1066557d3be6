"""Pipeline parallelism where only depth-block summaries cross stages (docs/architecture.md
section 5).

1F1B with PP=2, PP=4, PP=2 x EP=2, Full AttnRes with PP=2, TP=2 with sequence parallelism x
PP=2 (payloads of s / TP rows per summary), and the interleaved schedule with
PP=2 x V=2 take 3 optimizer steps over 4 micro-batches with the same losses, gathered gradients
and weights as one rank (rtol 1e-5). The bytes Megatron's p2p calls move (shape messages
excluded) equal, at every boundary and micro-batch, (completed summaries, b_0 included) x seq x
micro-batch x hidden x 4 in both directions for 1F1B, and the documented cached count for the
interleaved schedule, whose cache entries are released once per micro-batch. 1F1B exchanges no
shape message (static payload shapes); the interleaved schedule one per tensor. Negative controls:
a receiving stage that detaches its summaries (no gradient back to their producers), loses b_0,
or (interleaved) drops the gradients of its cached own summaries must break parity.
"""

import pytest

from megatron_attnres.mcore.pipeline import balanced_cuts, payload_bytes
from megatron_attnres.testing.launcher import run_distributed
from megatron_attnres.testing.reference_mapping import megatron_config
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
    # Under sequence parallelism (tp > 1) each tensor-parallel rank sends its share of the rows.
    per_boundary = [
        payload_bytes(schedule, cut, SEQ * MICRO_BATCH // layout.tp, 32, 4)
        for cut in balanced_cuts(schedule, layout.pp)
    ]
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
        # 1F1B payload shapes are static: no shape message is exchanged at all.
        expected.append({"sent": sent, "received": received, "shape_messages": 0})
    return expected


@pytest.mark.parametrize(
    ("layout", "mode", "sabotage"),
    [
        (Layout(pp=2, microbatches=MICROBATCHES), "block", "detached_summaries"),
        (Layout(pp=4, microbatches=MICROBATCHES), "block", "dropped_b0"),
        (Layout(pp=2, ep=2, dp=2, microbatches=MICROBATCHES), "block", "detached_summaries"),
        (Layout(pp=2, microbatches=MICROBATCHES), "full", "dropped_b0"),
        (Layout(tp=2, pp=2, microbatches=MICROBATCHES), "block", "detached_summaries"),
    ],
    ids=["pp2", "pp4", "pp2xep2", "pp2-full-attnres", "tp2-sp-x-pp2"],
)
def test_pipeline_trains_like_one_rank_and_sends_only_summaries(
    single_rank, layout, mode, sabotage
):
    k = 2 if mode == "block" else 1
    runs = run_distributed(train_on_layout, layout.world_size, args=(layout, (sabotage,), mode, k))[
        0
    ]
    oracle = single_rank[mode]
    assert_trains_like(runs["none"], oracle)
    assert runs["none"]["traffic"] == expected_traffic(layout, mode, k)

    broken = mismatched(runs[sabotage]["grads"][0], oracle["grads"][0])
    assert broken, f"sabotage {sabotage!r} went unnoticed"


def closed_form_transfers(P: int, V: int, Np: int) -> list[int]:
    """Summaries sent into chunks 1 .. PV-1 with the cache, from docs/architecture.md section 5
    (not from the cache's code): the first round sends everything so far (b_0 + c Np into chunk
    c < P); later transitions send what the other P - 1 ranks produced since the receiver's last
    chunk."""
    return [c * Np + 1 if c < P else (P - 1) * Np for c in range(1, P * V)]


def test_interleaved_pp2_vp2_trains_like_one_rank_with_cached_summaries(single_rank):
    layout = Layout(pp=2, vp=2, microbatches=MICROBATCHES)
    sabotages = ("forgotten_cached_gradients", "detached_summaries")
    runs = run_distributed(train_on_layout, 2, args=(layout, sabotages, "block", 2))[0]
    assert_trains_like(runs["none"], single_rank["block"])
    for sabotage in sabotages:
        broken = mismatched(runs[sabotage]["grads"][0], single_rank["block"]["grads"][0])
        assert broken, f"sabotage {sabotage!r} went unnoticed"

    # 4 depth blocks over 2 x 2 chunks: one summary produced per chunk (Np = 1).
    P, V, Np = 2, 2, 1
    summary = SEQ * MICRO_BATCH * 32 * 4
    into = closed_form_transfers(P, V, Np)  # [2, 1, 1]
    per_microbatch = STEPS * MICROBATCHES
    for rank, counted in enumerate(runs["none"]["traffic"]):
        # Cached payloads differ per chunk: every tensor travels after its shape.
        transfers = sum(
            len(sizes) for flow in ("sent", "received") for sizes in counted[flow].values()
        )
        assert counted["shape_messages"] == transfers > 0
        sends = [into[c] * summary for c in range(rank, P * V - 1, P)]  # out of chunk c
        receives = [into[c - 1] * summary for c in range(rank, P * V, P) if c > 0]
        assert sorted(counted["sent"]["next"]) == sorted(sends * per_microbatch)
        assert sorted(counted["received"]["prev"]) == sorted(sends * per_microbatch)
        assert sorted(counted["received"]["next"]) == sorted(receives * per_microbatch)
        assert sorted(counted["sent"]["prev"]) == sorted(receives * per_microbatch)
    # Per micro-batch and token: ours (b_0 included) <= the paper's cached figure (b_0 excluded)
    # < the full history of every transition.
    ours = sum(into)
    paper = P * (P - 1) // 2 * Np + (V - 1) * P**2 * Np
    full_history = sum(c * Np + 1 for c in range(1, P * V))
    assert ours == 4 and paper == 5 and full_history == 9

    # The cache: for each micro-batch a rank keeps what its first chunk c = rank received and
    # produced (known(c + P) = entering[c + 1] summaries) and releases each part exactly once.
    for rank, steps in enumerate(runs["none"]["cache"]):
        assert len(steps) == STEPS
        for events, live_after in steps:
            assert live_after == 0
            live = [0] + [event[-1] for event in events]
            held, stored = {}, {k: 0 for k in range(MICROBATCHES)}
            for (kind, k, v, part, _), before, after in zip(events, live, live[1:], strict=False):
                assert v == 0  # only the first of the two chunks on a rank has later users
                if kind == "store":
                    held[(k, part)] = after - before
                    stored[k] += after - before
                else:
                    assert held.pop((k, part)) == before - after  # released once, whole
            assert held == {}
            assert stored == {k: (rank + 2) * summary for k in range(MICROBATCHES)}
