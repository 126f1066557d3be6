"""The NaN/Inf policy in real trainer runs, with a NaN injected into one expert's output
(ATTNRES_INJECT_NAN, training/faults.py). The oracles: where the test put the NaN, the state
saved before it (a skipped step must leave every model and optimizer tensor as it was), and an
uninterrupted run for the steps before it."""

import pytest
import torch
from megatron.core.dist_checkpointing import load_common_state_dict

from tests.training.conftest import SHORT, torchrun
from tests.training.trainer_runs import checkpoint_tensors, metrics, train

pytestmark = [pytest.mark.slow]


def _tensors(path, scratch) -> dict[str, torch.Tensor]:
    return {
        k: v for k, v in checkpoint_tensors(path, scratch).items() if isinstance(v, torch.Tensor)
    }


def test_skip_then_stop_after_max_skipped_steps(tmp_path, monkeypatch, baseline_1rank):
    run_dir = tmp_path / "run"
    monkeypatch.setenv("ATTNRES_INJECT_NAN", "step=3-4,sublayer=4,expert=1")
    done = train(run_dir, *SHORT, "--save-interval", "1", "--max-skipped-steps", "1", check=False)
    assert done.returncode == 3, done.stderr[-3000:]  # NONFINITE_EXIT
    out, origin = (
        done.stdout,
        (
            "sublayer 4 (MoE), expert 1 (first non-finite output: "
            "decoder.layers.3.mlp.experts.local_experts.1 on rank 0)"
        ),
    )
    assert f"step 3: non-finite loss or gradient, from {origin}; update skipped (1 of " in out
    assert f"step 4: non-finite loss or gradient, from {origin}; stopping (max_skipped_s" in out
    assert "stopping at step 3: non-finite values at step 4 from sublayer 4 (MoE), expert 1" in out
    events = metrics(run_dir, "nonfinite")
    summary = [(s, e["action"], e["sublayer"], e["expert"]) for s, e in events.items()]
    assert summary == [(3, "skip", 4, 1), (4, "stop", 4, 1)]
    train_records, want = metrics(run_dir), metrics(baseline_1rank)
    assert [train_records[s]["loss"] for s in (1, 2)] == [want[s]["loss"] for s in (1, 2)]
    assert train_records[3]["skipped"] and train_records[3]["lr"] == train_records[2]["lr"]
    assert sorted(train_records) == [1, 2, 3]  # step 4 was not counted

    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest_checkpointed_iteration.txt").read_text() == "3\n"
    after_skip = _tensors(checkpoints / "iter_0000003", tmp_path)
    before = _tensors(checkpoints / "iter_0000002", tmp_path)
    assert after_skip.keys() == before.keys() and any(k.startswith("optimizer") for k in before)
    assert [k for k in before if not torch.equal(before[k], after_skip[k])] == []
    first = _tensors(checkpoints / "iter_0000001", tmp_path)  # negative control: steps move it
    assert not torch.equal(
        first["embedding.word_embeddings.weight"], before["embedding.word_embeddings.weight"]
    )
    progress = load_common_state_dict(str(checkpoints / "iter_0000003"))["progress"]
    assert progress == {"iteration": 3, "consumed_samples": 24, "skipped_steps": 1}


def test_stop_names_an_expert_on_another_expert_parallel_rank(tmp_path):
    run_dir = tmp_path / "run"
    # EP=2 over 4 experts: expert 3 lives on rank 1; rank 0 prints the report.
    done = torchrun(
        run_dir,
        *SHORT,
        "--expert-model-parallel-size",
        "2",
        "--nan-policy",
        "stop",
        ranks=2,
        env={"ATTNRES_INJECT_NAN": "step=2,sublayer=6,expert=3"},
    )
    assert done.returncode != 0 and "exitcode  : 3" in done.stderr  # torchrun reports the code
    report = (
        "step 2: non-finite loss or gradient, from sublayer 6 (MoE), expert 3 (first non-finite "
        "output: decoder.layers.5.mlp.experts.local_experts.1 on rank 1); stopping "
        "(nan_policy=stop) and saving the last good state (step 1)"
    )
    assert report in done.stdout
    assert "stopping at step 1: non-finite values at step 2" in done.stdout
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest_checkpointed_iteration.txt").read_text() == "1\n"
    assert load_common_state_dict(str(checkpoints / "iter_0000001"))["progress"]["iteration"] == 1
