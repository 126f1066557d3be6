"""launch/deepspeed.sh: the DeepSpeed launcher starts 2 local ranks on CPU (gloo), passes each its
--local_rank, and the tiny config trains with exactly the losses of the same 2 ranks under
torchrun (same config, same data order, same reductions: bit-identical floats)."""

import ast
import importlib.util
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from tests.training.trainer_runs import QUICK, ROOT, TINY, metrics, train

pytestmark = [
    pytest.mark.slow,
    pytest.mark.distributed,
    pytest.mark.skipif(
        importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"
    ),
]
STEPS = ["--train-iters", "6", "--log-interval", "1"]
TIMEOUT_S = 300
# set by a surrounding launcher, or read by launch/deepspeed.sh: the test sets what it needs
LAUNCH_VARIABLES = {
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "HOSTFILE",
    "NUM_GPUS",
    "NUM_NODES",
    "CONFIG",
    "RUN_DIR",
    "EXTRA_ARGS",
    "DS_LAUNCHER_ARGS",
    "CUDA_VISIBLE_DEVICES",
}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _deepspeed(run_dir, **env_vars: str) -> subprocess.Popen:
    """launch/deepspeed.sh in its own session, so a timeout can end the launcher and its ranks."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **env_vars}
    command = ["bash", "launch/deepspeed.sh", *QUICK, *STEPS, "--run-dir", str(run_dir)]
    return subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _wait(process: subprocess.Popen) -> str:
    try:
        out, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as timeout:
        os.killpg(process.pid, signal.SIGKILL)
        out, _ = process.communicate()
        raise AssertionError(
            f"launch/deepspeed.sh ran past {TIMEOUT_S}s:\n{out[-3000:]}"
        ) from timeout
    assert process.returncode == 0, out[-3000:]
    return out


def _spawned_commands(log: str) -> list[list[str]]:
    """The rank commands DeepSpeed's launch.py logs: "process N spawned with command: [...]"."""
    found = re.findall(r"spawned with command: (\[.*\])", log)
    return [ast.literal_eval(command) for command in found]


def test_deepspeed_launcher_trains_like_torchrun(tmp_path):
    launched = _deepspeed(tmp_path / "deepspeed", NUM_GPUS="2", MASTER_PORT=str(_port()))
    try:  # the torchrun reference runs meanwhile: both are mostly start-up time
        train(tmp_path / "torchrun", *STEPS, ranks=2, timeout=TIMEOUT_S)
    finally:
        log = _wait(launched)

    commands = _spawned_commands(log)
    assert len(commands) == 2, log[-3000:]
    for local_rank, command in enumerate(commands):
        assert command[command.index("-m") + 1] == "megatron_attnres.train"
        assert f"--local_rank={local_rank}" in command
        assert Path(command[command.index("--config") + 1]).resolve() == TINY
    assert "dist_world_size=2" in log
    assert "step 6/6" in log

    ours, reference = metrics(tmp_path / "deepspeed"), metrics(tmp_path / "torchrun")
    assert sorted(ours) == list(range(1, 7))
    assert [ours[s]["loss"] for s in range(1, 7)] == [reference[s]["loss"] for s in range(1, 7)]


def test_hostfile_example_parses_with_deepspeeds_parser():
    from deepspeed.launcher.runner import fetch_hostfile

    assert fetch_hostfile(str(ROOT / "launch" / "hostfile.example")) == {
        "worker-0": 8,
        "worker-1": 8,
    }


def test_missing_hostfile_is_refused():
    done = subprocess.run(
        ["bash", "launch/deepspeed.sh"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "HOSTFILE": "/nonexistent/hostfile"},
        timeout=60,
    )
    assert done.returncode == 2
    assert "HOSTFILE=/nonexistent/hostfile does not exist" in done.stderr
