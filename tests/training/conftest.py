"""Fixtures of the training tests: an in-process Megatron rank with the trainer's tiny model
(for checkpoint and NaN checks that need no trainer process), and uninterrupted trainer runs
shared by the fault tests (the oracle an interrupted run must reproduce bitwise)."""

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.training.trainer_runs import QUICK, ROOT, TINY, clean_env, train

# The fault tests' run: 8 steps, a checkpoint every 2, a progress line every step.
SHORT = ["--train-iters", "8", "--save-interval", "2", "--log-interval", "1"]
PP2 = ["--pipeline-model-parallel-size", "2"]


@pytest.fixture(scope="module")
def megatron_rank():
    """One gloo rank (TP = PP = EP = 1) with the CPU compat layer, in this process; reuses the
    parallel state a tests/mcore fixture may have started already."""
    from megatron.core import parallel_state as ps

    from megatron_attnres.mcore.compat import activate_cpu_compat

    activate_cpu_compat()
    own_group, own_state = not dist.is_initialized(), not ps.model_parallel_is_initialized()
    if own_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if own_state:
        ps.initialize_model_parallel(1, 1)
    yield
    if own_state:
        ps.destroy_model_parallel()
    if own_group:  # later tests may check that nothing started a process group
        dist.destroy_process_group()


@dataclass
class TinyModel:
    run: object  # RunConfig
    chunks: list  # DDP-wrapped model chunks
    optimizer: object
    scheduler: object
    signature: dict
    vocab: int = 256

    def batch(self, seed: int = 0) -> list[dict]:
        """The step's micro-batches: random tokens (global batch 8 = 2 x micro-batch 4)."""
        generator = torch.Generator().manual_seed(seed)
        shape = (self.run.micro_batch_size, self.run.seq_length)
        out = []
        for _ in range(self.run.global_batch_size // self.run.micro_batch_size):
            tokens = torch.randint(0, self.vocab, shape, generator=generator)
            labels = torch.roll(tokens, -1, dims=1)
            out.append({"tokens": tokens, "labels": labels, "loss_mask": torch.ones(shape)})
        return out


def tiny_model(*overrides: str, seed: int = 1234, vocab: int = 256) -> TinyModel:
    """The trainer's tiny model (configs/tiny.yaml shortened by QUICK), built as attnres-train
    builds it (with VOCAB tokens). Needs the megatron_rank fixture."""
    from megatron_attnres.config.load import load_run_config, parse_overrides
    from megatron_attnres.train.build import build_run

    run = load_run_config(TINY, parse_overrides([*QUICK, "--vocab-size", str(vocab), *overrides]))
    built = build_run(run, vocab, seed=seed)
    chunks, optimizer, scheduler, signature = (
        built.chunks,
        built.optimizer,
        built.scheduler,
        built.signature,
    )
    return TinyModel(run, chunks, optimizer, scheduler, signature, vocab)


def _baseline(tmp_path_factory, name: str, *layout: str, ranks: int = 1) -> Path:
    run_dir = tmp_path_factory.mktemp("baselines") / name
    train(run_dir, *SHORT, *layout, ranks=ranks)
    return run_dir


@pytest.fixture(scope="session")
def baseline_1rank(tmp_path_factory) -> Path:
    """An uninterrupted 8-step run on one rank."""
    return _baseline(tmp_path_factory, "1rank")


@pytest.fixture(scope="session")
def baseline_pp2(tmp_path_factory) -> Path:
    """An uninterrupted 8-step run with PP=2 (two torchrun ranks)."""
    return _baseline(tmp_path_factory, "pp2", *PP2, ranks=2)


def torchrun(
    run_dir: Path,
    *overrides: str,
    ranks: int = 1,
    max_restarts: int = 0,
    env: dict | None = None,
    timeout: int = 600,
) -> subprocess.CompletedProcess:
    """`torchrun --standalone --max-restarts N -m megatron_attnres.train` on the tiny config
    (as trainer_runs.train), with extra environment variables. A run past TIMEOUT is killed
    with its whole process group (torchrun's workers included) before failing."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={ranks}",
        f"--max-restarts={max_restarts}",
        "-m",
        "megatron_attnres.train",
        "--config",
        str(TINY),
        *QUICK,
        "--run-dir",
        str(run_dir),
        *overrides,
    ]
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=clean_env() | (env or {}),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        raise AssertionError(
            f"torchrun ran past {timeout} s:\n{out[-3000:]}\n{err[-3000:]}"
        ) from None
    return subprocess.CompletedProcess(command, process.returncode, out, err)
