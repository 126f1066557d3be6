"""Crash recovery: the trainer is SIGKILLed at fixed, seeded points (inside the forward, in the
backward, in the middle of the optimizer step, while dist_checkpointing writes iter_N.tmp, and
between the rename and the tracker update) under `torchrun --max-restarts`; each restarted
worker resumes by itself from its save directory (no --load). The oracle is an uninterrupted
run: every loss any attempt logged equals that step's uninterrupted loss, and the final model
and optimizer tensors are bitwise equal. One rank takes all five kills in one job; PP=2 on two
torchrun ranks takes one kill on each rank (a dead peer, then a torn multi-rank save)."""

import json
import random

import pytest
import torch

from tests.training.conftest import PP2, SHORT, torchrun
from tests.training.trainer_runs import checkpoint_tensors, metrics

pytestmark = [pytest.mark.slow]

SEED = 2026  # the kill steps below are drawn once from this seed; the list is fixed
SAVES = (2, 4, 6, 8)  # SHORT saves every 2 steps (and at the end)


def kill_plan(ranks: int) -> list[dict]:
    rng = random.Random(SEED + ranks)
    if ranks == 1:
        return [
            {"point": "forward", "step": rng.randint(1, 8)},
            {"point": "backward", "step": rng.randint(1, 8)},
            {"point": "optimizer", "step": rng.randint(1, 8)},
            {"point": "checkpoint_write", "step": rng.choice(SAVES)},
            {"point": "tracker", "step": rng.choice(SAVES)},
        ]
    return [
        {"point": "backward", "step": rng.randint(1, 8), "rank": 1},
        {"point": "checkpoint_write", "step": rng.choice(SAVES), "rank": 0},
    ]


def _fault_env(plan: list[dict], markers) -> dict[str, str]:
    spec = ";".join(",".join(f"{k}={v}" for k, v in kill.items()) for kill in plan)
    return {"ATTNRES_FAULT": spec, "ATTNRES_FAULT_MARKERS": str(markers)}


def assert_equals_the_uninterrupted_run(run_dir, baseline, scratch) -> None:
    want = metrics(baseline)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
    assert {step for step, _ in logged} == set(range(1, 9))
    assert [(s, loss) for s, loss in logged if loss != want[s]["loss"]] == []  # bitwise
    final = "checkpoints/iter_0000008"
    a, b = (
        checkpoint_tensors(baseline / final, scratch),
        checkpoint_tensors(run_dir / final, scratch),
    )
    tensors = [k for k, v in a.items() if isinstance(v, torch.Tensor)]
    assert len(tensors) > 100 and any(k.startswith("optimizer") for k in tensors)
    assert a.keys() == b.keys()
    assert [k for k in tensors if not torch.equal(a[k], b[k])] == []
    assert (run_dir / "checkpoints/latest_checkpointed_iteration.txt").read_text() == "8\n"


@pytest.mark.parametrize(
    ("ranks", "layout", "baseline"),
    [(1, [], "baseline_1rank"), (2, PP2, "baseline_pp2")],
    ids=["1rank-5kills", "pp2-2kills"],
)
def test_killed_runs_restart_and_equal_the_uninterrupted_run(
    tmp_path, request, ranks, layout, baseline
):
    baseline = request.getfixturevalue(baseline)
    plan, run_dir = kill_plan(ranks), tmp_path / "run"
    done = torchrun(
        run_dir,
        *SHORT,
        *layout,
        ranks=ranks,
        max_restarts=len(plan),
        env=_fault_env(plan, tmp_path / "markers"),
    )
    assert done.returncode == 0, done.stderr[-4000:]
    markers = sorted(p.name for p in (tmp_path / "markers").iterdir())
    expected = sorted(f"{k['point']}-step{k['step']}-rank{k.get('rank', 0)}" for k in plan)
    assert markers == expected  # every fault happened, once
    assert done.stdout.count("ATTNRES_FAULT: killing") == len(plan)
    assert "auto-resume:" in done.stdout  # restarts found their checkpoints without --load
    assert_equals_the_uninterrupted_run(run_dir, baseline, tmp_path)
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("iter_*"))
    assert kept == ["iter_0000004", "iter_0000006", "iter_0000008"]  # keep_last_checkpoints=3
