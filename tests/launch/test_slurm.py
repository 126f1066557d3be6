"""launch/slurm/train.sbatch on a real (one-node) Slurm cluster: a job preempted with the
script's own signal (SIGUSR1 to the batch shell) checkpoints, requeues itself, resumes from that
checkpoint and finishes; MODE=srun trains with one Slurm task per rank and requeues after the
trainer's own early stop."""

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.training.trainer_runs import QUICK, ROOT, TINY

pytestmark = pytest.mark.slow
SCRIPT = "launch/slurm/train.sbatch"
ITERS = 60  # enough steps (0.1-0.3 s each) that the stop request lands mid-run


def _overrides(**changes: str) -> str:
    """EXTRA_ARGS: the trainer tests' quick tiny run, every step logged, with CHANGES."""
    pairs = dict(zip(QUICK[::2], QUICK[1::2], strict=True)) | {"--log-interval": "1"}
    pairs |= {"--" + key.replace("_", "-"): value for key, value in changes.items()}
    return " ".join(f"{key} {value}" for key, value in pairs.items())


def _job_env(run_dir: Path, extra_args: str, **extra: str) -> dict[str, str]:
    return {
        "CONFIG": str(TINY),
        "RUN_DIR": str(run_dir),
        "EXTRA_ARGS": extra_args,
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        **extra,
    }


class Job:
    """A submitted job, its log, and waiting on either with the log in every failure."""

    def __init__(self, cluster, log: Path, *options: str, env: dict):
        self.cluster, self.log = cluster, log
        self.id = cluster.sbatch(SCRIPT, f"--output={log}", *options, env=env, cwd=ROOT)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def report(self) -> str:
        try:
            state = self.cluster.job(self.id)
        except (RuntimeError, subprocess.TimeoutExpired) as err:
            state = {"JobState": f"unknown ({err})"}
        return (
            f"job {self.id} state {state and state.get('JobState')}; log {self.log}:\n"
            f"{self.text()[-6000:]}\n{self.cluster.logs()}"
        )

    def wait_for_log(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.text(), re.MULTILINE)
            if found:
                return found
            time.sleep(1)
        raise AssertionError(f"no {pattern!r} in the log after {timeout:.0f} s\n{self.report()}")

    def wait_until_done(self, timeout: float) -> dict | None:
        """The job's final record (None once Slurm has forgotten the finished job)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                job = self.cluster.job(self.id)
            except (RuntimeError, subprocess.TimeoutExpired):  # slurmctld busy: ask again
                time.sleep(2)
                continue
            if job is None or job["JobState"] in (
                "COMPLETED",
                "FAILED",
                "CANCELLED",
                "TIMEOUT",
                "NODE_FAIL",
                "OUT_OF_MEMORY",
            ):
                return job
            time.sleep(2)
        raise AssertionError(f"job {self.id} not done after {timeout:.0f} s\n{self.report()}")

    def cancel(self) -> None:
        self.cluster.command("scancel", str(self.id), check=False)


def test_preempted_job_checkpoints_requeues_and_finishes(slurm_cluster, tmp_path):
    """torchrun mode: SIGUSR1 to the batch shell (what --signal=B:USR1@120 sends before the time
    limit) makes the trainer save and stop, the job requeue itself and the next start resume."""
    run_dir, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoints"
    job = Job(
        slurm_cluster,
        tmp_path / "job.out",
        "-N1",
        "-n1",
        "--time=30",
        env=_job_env(run_dir, _overrides(train_iters=str(ITERS))),
    )
    try:
        job.wait_for_log(rf"^step 3/{ITERS} ", timeout=240)
        slurm_cluster.command("scancel", "--signal=USR1", "--batch", str(job.id))
        stop = int(job.wait_for_log(r"^stopping at step (\d+): signal received", 120)[1])
        job.wait_for_log(rf"^resumed from {re.escape(str(ckpt))} at step {stop} ", 240)
        record = job.wait_until_done(timeout=240)
        log = job.text()
        assert 3 <= stop < ITERS, job.report()
        assert (ckpt / f"iter_{stop:07d}").is_dir(), job.report()
        assert "got SIGUSR1" in log and f"requeueing job {job.id}" in log, job.report()
        assert log.count("(restart 0)") == 1 and log.count("(restart 1)") == 1, job.report()
        # --time=30: stop 10 (+1 for startup) minutes before the limit
        assert re.search(r"--exit-duration-in-mins 1[89] ", log), job.report()
        assert (ckpt / f"iter_{ITERS:07d}").is_dir(), job.report()
        tracker = ckpt / "latest_checkpointed_iteration.txt"
        assert tracker.read_text().strip() == str(ITERS), job.report()
        assert re.search(r"^final validation loss \d", log, re.MULTILINE), job.report()
        assert "training complete" in log, job.report()
        if record is not None:
            assert record["JobState"] == "COMPLETED" and record["Restarts"] == "1", job.report()
    finally:
        job.cancel()


def test_srun_mode_trains_one_task_per_rank_and_requeues_after_a_clean_stop(
    slurm_cluster, tmp_path
):
    """Two ranks as two Slurm tasks; the trainer's own early stop (--exit-interval here, as
    --exit-duration-in-mins before the time limit) is followed by a requeue and a resume."""
    run_dir, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoints"
    extra_args = _overrides(train_iters="4", exit_interval="2")
    job = Job(
        slurm_cluster,
        tmp_path / "job.out",
        "-N1",
        "--ntasks=2",
        "--ntasks-per-node=2",
        env=_job_env(run_dir, extra_args, MODE="srun"),
    )
    try:
        record = job.wait_until_done(timeout=360)
        log = job.text()
        assert "MODE=srun" in log and "srun --kill-on-bad-exit=1" in log, job.report()
        assert "stopping at step 2: exit_interval=2" in log, job.report()
        assert f"requeueing job {job.id}" in log, job.report()
        assert f"resumed from {ckpt} at step 2 " in log, job.report()
        assert re.search(r"^step 4/4 ", log, re.MULTILINE), job.report()
        assert "training complete" in log, job.report()
        # torch.distributed.checkpoint writes one __RANK_0.distcp file per rank
        for step in (2, 4):
            files = sorted(p.name for p in (ckpt / f"iter_{step:07d}").glob("*.distcp"))
            assert files == ["__0_0.distcp", "__1_0.distcp"], job.report()
        if record is not None:
            assert record["JobState"] == "COMPLETED", job.report()
            assert record["NumTasks"] == "2" and record["Restarts"] == "1", job.report()
    finally:
        job.cancel()
