"""SIGTERM (what torchrun and Slurm forward on preemption) makes attnres-train save a checkpoint
at the end of the current step and exit cleanly, even when it arrives during start-up (while the
model and data are being built); the checkpoint then resumes."""

import signal
import subprocess
import sys

import pytest

from tests.training.trainer_runs import QUICK, ROOT, TINY, clean_env, train

pytestmark = [pytest.mark.slow]


def test_sigterm_during_startup_saves_after_the_first_step(tmp_path):
    run_dir = tmp_path / "run"
    env = clean_env()
    command = [
        sys.executable,
        "-m",
        "megatron_attnres.train",
        "--config",
        str(TINY),
        *QUICK,
        "--run-dir",
        str(run_dir),
    ]
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    lines = []
    for line in process.stdout:  # the resolved config is printed before start-up
        lines.append(line)
        if line.startswith("exit_duration_in_mins:"):
            process.send_signal(signal.SIGTERM)
            break
    lines += process.stdout.readlines()
    assert process.wait(timeout=300) == 0
    out = "".join(lines)
    assert "stopping at step 1: signal received" in out, out[-2000:]
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest_checkpointed_iteration.txt").read_text() == "1\n"

    resumed = train(
        run_dir, "--load", str(checkpoints), "--train-iters", "3", "--lr-wsd-decay-iters", "1"
    )
    assert "resumed from" in resumed.stdout and "at step 1 (8 samples consumed)" in resumed.stdout
    assert (checkpoints / "iter_0000003").is_dir()


def test_sigterm_mid_training_saves_the_current_step_and_resumes_exactly(tmp_path, baseline_1rank):
    """SIGTERM between steps 3 and 4 leaves a loadable checkpoint of the step that was running
    (no later than one step after the signal); the restarted run resumes from it by itself and
    ends bitwise equal to the uninterrupted run."""
    from tests.training.conftest import SHORT
    from tests.training.test_fault_injection import assert_equals_the_uninterrupted_run

    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "megatron_attnres.train",
        "--config",
        str(TINY),
        *QUICK,
        "--run-dir",
        str(run_dir),
        *SHORT,
    ]
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("step 3/8"):
            process.send_signal(signal.SIGTERM)
            break
    lines += process.stdout.readlines()
    assert process.wait(timeout=300) == 0
    out = "".join(lines)
    [stopped] = [int(s) for s in (3, 4) if f"stopping at step {s}: signal received" in out]
    tracker = run_dir / "checkpoints" / "latest_checkpointed_iteration.txt"
    assert tracker.read_text() == f"{stopped}\n"

    resumed = train(run_dir, *SHORT)  # no --load: the save directory's checkpoint is found
    assert "auto-resume:" in resumed.stdout
    checkpoint = f"iter_{stopped:07d}"
    assert f"at step {stopped} ({8 * stopped} samples consumed), checkpoint {checkpoint}" in (
        resumed.stdout
    )
    assert_equals_the_uninterrupted_run(run_dir, baseline_1rank, tmp_path)
