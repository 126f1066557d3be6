"""Resume is exact: 20 steps straight equal 10 steps, a checkpoint, a new process resuming, and 10
more steps: the same losses for steps 11-20 and bitwise the same final model and optimizer
state, on one rank and with PP=2 over gloo (two torchrun ranks). The oracle is the straight run.

The RNG streams too (issue 21): every rank's Python `random`, numpy, torch CPU and Megatron
tracker states, as each run's checkpoints record them, equal the straight run's at the same step.
Controls: another seed gives other states of every generator, and a run resumed under another
seed still has the straight run's states (they come from the restore, not from seeding alike).
"""

import shutil

import numpy as np
import pytest
import torch

from tests.training.conftest import SHORT
from tests.training.trainer_runs import checkpoint_tensors, metrics, train

pytestmark = [pytest.mark.slow]
GENERATORS = {"random", "numpy", "torch", "tracker"}  # and "cuda": None on CPU


def rng_states(tensors: dict) -> dict[int, dict]:
    """{rank: that rank's RNG states} of a checkpoint read with checkpoint_tensors."""
    states = {}
    for key, value in tensors.items():
        if key.startswith("rng_state/shard_"):  # rng_state/shard_RANK_WORLD
            (states[int(key.split("_")[-2])],) = value
    assert states and all(state.keys() >= GENERATORS for state in states.values())
    return states


def _same(a, b) -> bool:
    """Exact equality of nested tuples, lists and dicts of tensors, arrays and plain values."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, tuple | list):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


def differing(want: dict, got: dict) -> list[str]:
    """The (rank, generator) pairs whose states differ between two rng_states results."""
    assert want.keys() == got.keys()
    return [
        f"rank {r} {name}"
        for r in want
        for name in want[r]
        if not _same(want[r][name], got[r][name])
    ]


def checkpoint_rng(run_dir, step: int, scratch) -> dict[int, dict]:
    return rng_states(checkpoint_tensors(run_dir / f"checkpoints/iter_{step:07d}", scratch))


@pytest.mark.parametrize(
    ("ranks", "layout"),
    [(1, []), (2, ["--pipeline-model-parallel-size", "2"])],
    ids=["1rank", "pp2"],
)
def test_stop_and_resume_equals_the_straight_run(tmp_path, ranks, layout):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(straight, *layout, ranks=ranks)
    first = train(split, *layout, "--exit-interval", "10", ranks=ranks)
    assert "stopping at step 10: exit_interval=10" in first.stdout
    assert (split / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == "10\n"
    resumed = train(split, *layout, "--load", str(split / "checkpoints"), ranks=ranks)
    assert "resumed from" in resumed.stdout and "at step 10 (80 samples consumed)" in resumed.stdout

    want, got = metrics(straight), metrics(split)
    assert sorted(got) == list(range(1, 21))
    for step in range(1, 21):
        assert got[step]["loss"] == want[step]["loss"], step  # bitwise, as floats
        assert got[step]["lr"] == want[step]["lr"], step

    final = "checkpoints/iter_0000020"
    a = checkpoint_tensors(straight / final, tmp_path)
    b = checkpoint_tensors(split / final, tmp_path)
    tensors = [k for k, v in a.items() if isinstance(v, torch.Tensor)]
    assert any(k.startswith("optimizer") for k in tensors) and len(tensors) > 100
    assert a.keys() == b.keys()
    different = [k for k in tensors if not torch.equal(a[k], b[k])]
    assert different == []
    assert differing(rng_states(a), rng_states(b)) == []
    # The 10-step checkpoint differs from the final one: training did move the weights.
    mid = checkpoint_tensors(split / "checkpoints/iter_0000010", tmp_path)
    assert not torch.equal(
        mid["embedding.word_embeddings.weight"], b["embedding.word_embeddings.weight"]
    )


@pytest.fixture(scope="module")
def stopped_at_4(tmp_path_factory):
    """The fault tests' 8-step run (conftest SHORT) stopped after its checkpoint at step 4."""
    run_dir = tmp_path_factory.mktemp("rng") / "stopped"
    train(run_dir, *SHORT, "--exit-interval", "4")
    return run_dir


def _resume(stopped, run_dir, *overrides: str) -> None:
    shutil.copytree(stopped, run_dir)
    resumed = train(run_dir, *SHORT, *overrides)
    assert "auto-resume" in resumed.stdout and "at step 4" in resumed.stdout


def test_a_resumed_run_continues_every_rng_stream(baseline_1rank, stopped_at_4, tmp_path):
    _resume(stopped_at_4, tmp_path / "resumed")
    for step in (6, 8):  # the checkpoints written after the resume
        want = checkpoint_rng(baseline_1rank, step, tmp_path)
        assert differing(want, checkpoint_rng(tmp_path / "resumed", step, tmp_path)) == [], step


def test_rng_states_come_from_the_seed_and_then_the_restore(baseline_1rank, stopped_at_4, tmp_path):
    want = checkpoint_rng(baseline_1rank, 8, tmp_path)
    train(tmp_path / "other_seed", *SHORT, "--seed", "4321")
    other_seed = checkpoint_rng(tmp_path / "other_seed", 8, tmp_path)
    assert sorted(differing(want, other_seed)) == sorted(f"rank 0 {g}" for g in GENERATORS)
    # Resumed under seed 4321, the run still continues the seed-1234 checkpoint's streams.
    _resume(stopped_at_4, tmp_path / "resumed_other_seed", "--seed", "4321")
    assert differing(want, checkpoint_rng(tmp_path / "resumed_other_seed", 8, tmp_path)) == []
