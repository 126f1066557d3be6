"""README command (a): the embedded default run (configs/tiny.yaml as is, built-in corpus, CPU)
trains end to end and leaves what the README promises: a checkpoint, metrics.jsonl, wandb's
offline run directory and the three plots; its final validation loss is at least 0.5 nats below
the unigram entropy of the validation split (both computed by the run)."""

import json
import time

import pytest

from tests.training.trainer_runs import ROOT, TINY, clean_env

pytestmark = [pytest.mark.slow]


def test_tiny_config_learns_and_leaves_its_outputs(tmp_path):
    import subprocess
    import sys

    run_dir = tmp_path / "tiny"
    env = clean_env()
    env.pop("OMP_NUM_THREADS")  # as the README command runs: torch's own thread count
    start = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_attnres.train",
            "--config",
            str(TINY),
            "--run-dir",
            str(run_dir),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    minutes = (time.monotonic() - start) / 60
    assert done.returncode == 0, done.stderr[-3000:]
    assert minutes < 10

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if r["kind"] == "final"][-1]
    assert final["unigram_entropy"] - final["valid_loss"] >= 0.5, final
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 201))
    assert any(r["kind"] == "diagnostics" for r in records)
    assert (run_dir / "checkpoints" / "iter_0000200").is_dir()
    assert (run_dir / "config.yaml").read_text() == (
        run_dir / "checkpoints" / "config.yaml"
    ).read_text()
    assert list((run_dir / "wandb").glob("offline-run-*"))
    for name in ("loss", "depth_attention", "layer_norms"):
        assert (run_dir / "plots" / f"{name}.png").stat().st_size > 10_000
