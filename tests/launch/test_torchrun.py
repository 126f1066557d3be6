"""launch/torchrun.sh: a 2-node job on localhost (two torchrun invocations, node ranks 0 and 1,
one process each, static rendezvous) trains the tiny config with exactly the losses of the same
2 ranks started on one node."""

import os
import socket
import subprocess

import pytest

from tests.training.trainer_runs import QUICK, ROOT, TINY, metrics

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
STEPS = ["--train-iters", "6"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(*launcher: str, run_dir) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [
        "bash",
        "launch/torchrun.sh",
        *launcher,
        "--config",
        str(TINY),
        *QUICK,
        *STEPS,
        "--run-dir",
        str(run_dir),
    ]
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait(process: subprocess.Popen) -> str:
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    return out


def test_two_nodes_on_localhost_train_like_one_node(tmp_path):
    port = _port()
    nodes = [
        _launch(
            "--nnodes",
            "2",
            "--node-rank",
            str(rank),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(port),
            "--nproc-per-node",
            "1",
            run_dir=tmp_path / "two_nodes",
        )
        for rank in (0, 1)
    ]
    outputs = [_wait(node) for node in nodes]
    assert "step 6/6" in outputs[0]  # rank 0 (on node 0) reports
    _wait(_launch("--nproc-per-node", "2", run_dir=tmp_path / "one_node"))

    two, one = metrics(tmp_path / "two_nodes"), metrics(tmp_path / "one_node")
    assert sorted(two) == list(range(1, 7))
    assert [two[s]["loss"] for s in range(1, 7)] == [one[s]["loss"] for s in range(1, 7)]


def test_launcher_refuses_an_incomplete_multi_node_request():
    done = subprocess.run(
        ["bash", "launch/torchrun.sh", "--nnodes", "2", "--config", str(TINY)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "--nnodes 2 needs --master-addr (with --node-rank) or --rdzv-endpoint" in done.stderr
