"""Resume is exact: 20 steps straight equal 10 steps, a checkpoint, a new process resuming, and 10
more steps: the same losses for steps 11-20 and bitwise the same final model and optimizer
state, on one rank and with PP=2 over gloo (two torchrun ranks). The oracle is the straight run.
"""

import pytest
import torch

from tests.training.trainer_runs import checkpoint_tensors, metrics, train

pytestmark = [pytest.mark.slow]


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
    # The 10-step checkpoint differs from the final one: training did move the weights.
    mid = checkpoint_tensors(split / "checkpoints/iter_0000010", tmp_path)
    assert not torch.equal(
        mid["embedding.word_embeddings.weight"], b["embedding.word_embeddings.weight"]
    )
