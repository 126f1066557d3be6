"""Run `attnres-train` as its own process(es), as users do, and read back what a run left."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
# The tiny config, shortened for tests: 20 steps, no mid-run evaluation, no wandb, no plots.
QUICK = [
    "--seq-length",
    "64",
    "--micro-batch-size",
    "4",
    "--global-batch-size",
    "8",
    "--train-iters",
    "20",
    "--lr-warmup-iters",
    "2",
    "--lr-wsd-decay-iters",
    "4",
    "--eval-interval",
    "1000",
    "--eval-iters",
    "1",
    "--log-interval",
    "5",
    "--wandb-mode",
    "disabled",
    "--plots",
    "false",
]


def clean_env() -> dict[str, str]:
    """This process's environment without the rank variables a test process may carry (an
    in-process Megatron fixture sets MASTER_ADDR/MASTER_PORT), as a fresh shell would have."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def train(
    run_dir: Path, *overrides: str, ranks: int = 1, check: bool = True, timeout: int = 600
) -> subprocess.CompletedProcess:
    """`python -m megatron_attnres.train` (under torchrun for several ranks) on the tiny config."""
    args = ["--config", str(TINY), *QUICK, "--run-dir", str(run_dir), *overrides]
    if ranks == 1:
        command = [sys.executable, "-m", "megatron_attnres.train", *args]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={ranks}",
            "-m",
            "megatron_attnres.train",
            *args,
        ]
    env = clean_env()
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and done.returncode != 0:
        raise AssertionError(f"attnres-train failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return done


def metrics(run_dir: Path, kind: str = "train") -> dict[int, dict]:
    """The last record of each step of `kind` in RUN_DIR/metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if r["kind"] == kind}


def checkpoint_tensors(checkpoint: Path, scratch: Path) -> dict:
    """Every tensor of a dist checkpoint (model and optimizer state), unsharded, read with
    torch.distributed.checkpoint's own converter (no process group needed)."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = scratch / (checkpoint.parent.parent.name + "_" + checkpoint.name + ".pt")
    dcp_to_torch_save(str(checkpoint), str(out))
    return torch.load(out, weights_only=False)
