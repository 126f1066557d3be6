"""What a run reports: the progress line (TFLOP/s and MFU from config.flops), the metrics JSONL
file and the wandb mirror of it.

MFU = achieved FLOP/s / (peak_tflops x 1e12 x ranks); without `peak_tflops` it is not reported.
"""

import json
import math
import time
from pathlib import Path

import numpy as np

from megatron_attnres.config.load import as_dict
from megatron_attnres.config.run import RunConfig


class MetricsLog:
    """metrics.jsonl (one JSON object per line with a "kind": train / valid / diagnostics / final,
    flushed as written so nothing is lost on a crash) and, unless disabled, a wandb run
    (offline by default: it writes RUN_DIR/wandb without a network)."""

    def __init__(self, run: RunConfig, enabled: bool):
        self.enabled = enabled
        self.path = Path(run.run_dir) / "metrics.jsonl"
        self.wandb = None
        if not enabled:
            return
        self.file = self.path.open("a")
        if run.wandb_mode != "disabled":
            import wandb

            self.wandb = wandb.init(
                project=run.wandb_project or "megatron-attnres",
                name=run.wandb_exp_name,
                dir=run.run_dir,
                mode=run.wandb_mode,
                config=as_dict(run),
                settings=wandb.Settings(silent=True),
            )

    def write(self, kind: str, step: int, **values) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, **values}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            flat = {f"{kind}/{k}": v for k, v in values.items() if isinstance(v, int | float)}
            self.wandb.log(flat, step=step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.wandb is not None:
                self.wandb.finish()


class ProgressLine:
    """`step 10/100 | loss 5.1234 | lr 3.00e-03 | grad 0.812 | 1,234 tok/s | 0.01 TFLOP/s |
    MFU 1.2% | ETA 1m23s`, from step times measured here."""

    def __init__(self, run: RunConfig, flops_per_token: float, ranks: int):
        self.run, self.flops, self.ranks = run, flops_per_token, ranks
        self.tokens_per_step = run.global_batch_size * run.seq_length
        self.start = self.last = time.perf_counter()

    def step(self, step: int, loss: float, lr: float, grad_norm: float) -> dict:
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        tokens_per_s = self.tokens_per_step / seconds
        tflops = tokens_per_s * self.flops / 1e12
        peak = self.run.peak_tflops
        mfu = tflops / (peak * self.ranks) if peak else None
        left = (self.run.train_iters - step) * seconds
        values = dict(
            loss=loss,
            lr=lr,
            grad_norm=grad_norm,
            step_time_s=seconds,
            tokens_per_s=tokens_per_s,
            tflops=tflops,
            mfu=mfu,
        )
        mfu_text = f"{100 * mfu:.1f}%" if mfu is not None else "n/a"
        self.text = (
            f"step {step}/{self.run.train_iters} | loss {loss:.4f} | lr {lr:.2e} | "
            f"grad {grad_norm:.3f} | {tokens_per_s:,.0f} tok/s | {tflops:.3g} TFLOP/s | "
            f"MFU {mfu_text} | ETA {_duration(left)}"
        )
        return values


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, sec = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{sec:02d}s"


def unigram_entropy(dataset, samples: int) -> float:
    """Entropy (nats) of the label-token distribution of the first `samples` samples: the loss of
    the best model that ignores context."""
    counts = {}
    for i in range(min(samples, len(dataset))):
        ids, n = np.unique(np.asarray(dataset[i]["labels"]), return_counts=True)
        for token, c in zip(ids.tolist(), n.tolist(), strict=True):
            counts[token] = counts.get(token, 0) + c
    p = np.array(list(counts.values()), dtype=np.float64)
    p /= p.sum()
    return float(-(p * np.log(p)).sum())
