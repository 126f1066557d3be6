"""Step time before and after a checkpoint save (issue 21): a save must not slow the steps after it.

One `attnres-train` run on the tiny config, as its own process (as users start it, with the
trainer's own intra-op thread count: this part does not pin the CLI's one thread), saves a
checkpoint after WARMUP + STEPS steps and trains STEPS + 1 more. Reported: the median step time
(metrics.jsonl `step_time_s`) of the STEPS steps before the save and of the STEPS steps after it
(the step right after the save, whose time includes the save, is left out), their ratio, and the
quartiles as a measure of noise. Evaluation and diagnostics are moved past the end of the run so
that only the save lies between the two windows. Acceptance: ratio <= ACCEPT.

Also reported, where /proc exists: the trainer's OS thread count in the middle of each window.
The slowdown of issue 21 came with two more threads after the save (OpenMP pools started in
gloo's worker threads, train/checkpointing.py `_one_intra_op_thread`); the count does not depend
on the load of a shared machine, which moves the step times by tens of percent.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from megatron_attnres.bench.common import device_info

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
WARMUP = 10  # steps before the first timed one
ACCEPT = 1.05  # after / before, issue 21


def _train_command(config: str, run_dir: Path, steps: int) -> list[str]:
    save_at = WARMUP + steps
    after_end = WARMUP + 2 * steps + 1
    overrides = {
        "train-iters": after_end,
        "save-interval": save_at,
        "eval-interval": after_end + 1,
        "diagnostics-interval": after_end + 1,
        "log-interval": after_end,
        "lr-warmup-iters": 2,
        "lr-wsd-decay-iters": 4,
        "wandb-mode": "disabled",
        "plots": "false",
        "run-dir": run_dir,
    }
    args = [item for key, value in overrides.items() for item in (f"--{key}", str(value))]
    return [sys.executable, "-m", "megatron_attnres.train", "--config", config, *args]


def _environment(device: str) -> dict[str, str]:
    """This process's environment as a fresh shell's: no rank variables (a 1-rank run), and no
    GPU for --device cpu. OMP_NUM_THREADS is passed on when set."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _last_step(metrics: Path) -> int:
    step = 0
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line being written
                continue
            if record.get("kind") == "train":
                step = record["step"]
    return step


def _train(command: list[str], env: dict, run_dir: Path, probes: dict[str, int]) -> dict:
    """Run the trainer; the count of its OS threads once it has done each of `probes`' steps."""
    threads = {}
    with open(run_dir.parent / "train.log", "w+") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=log)
        while process.poll() is None:
            time.sleep(0.2)
            step = _last_step(run_dir / "metrics.jsonl")
            for name, at in probes.items():
                if name not in threads and step >= at:
                    try:
                        threads[name] = len(os.listdir(f"/proc/{process.pid}/task"))
                    except OSError:  # no /proc, or the process has just ended
                        threads[name] = None
        if process.returncode != 0:
            log.seek(0)
            tail = log.read()[-3000:]
            raise RuntimeError(f"attnres-train failed ({process.returncode}):\n{tail}")
    return threads


def _window(times: dict[int, float], first: int, last: int) -> dict:
    values = [times[step] * 1e3 for step in range(first, last + 1)]
    q1, median, q3 = statistics.quantiles(values, n=4)
    return {"steps": [first, last], "median_ms": median, "q1_ms": q1, "q3_ms": q3}


def run_save(device: str, quick: bool, config: str | None, steps: int) -> dict:
    steps = 15 if quick else steps
    config = config or str(TINY)
    save_at = WARMUP + steps
    probes = {"before": WARMUP + steps // 2, "after": save_at + 1 + steps // 2}
    with tempfile.TemporaryDirectory(prefix="attnres-bench-save-") as tmp:
        run_dir = Path(tmp) / "run"
        command = _train_command(config, run_dir, steps)
        threads = _train(command, _environment(device), run_dir, probes)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    times = {r["step"]: r["step_time_s"] for r in records if r["kind"] == "train"}
    before = _window(times, WARMUP + 1, save_at) | {"os_threads": threads.get("before")}
    after = _window(times, save_at + 2, save_at + 1 + steps) | {"os_threads": threads.get("after")}
    ratio = after["median_ms"] / before["median_ms"]
    info = device_info(device)
    info["name"] = info["name"].split(" (")[0]  # this process's thread count is not the run's
    results = {
        "device": info,
        "config": config,
        "intra_op_threads": os.environ.get("OMP_NUM_THREADS", f"torch default ({os.cpu_count()})"),
        "save_at_step": save_at,
        "save_step_ms": times[save_at + 1] * 1e3,
        "before": before,
        "after": after,
        "ratio": ratio,
        "accept": ratio <= ACCEPT,
    }
    _print_table(results)
    return results


def _print_table(results: dict) -> None:
    info = results["device"]
    print(
        f"save: step time before and after the checkpoint at step {results['save_at_step']} "
        f"({info['name']}, intra-op threads {results['intra_op_threads']}, torch {info['torch']}, "
        f"commit {info['commit']})"
    )
    print(f"{'window':<8} {'steps':>9} {'median ms':>10} {'q1 ms':>8} {'q3 ms':>8} {'threads':>8}")
    for name in ("before", "after"):
        w = results[name]
        steps = f"{w['steps'][0]}-{w['steps'][1]}"
        threads = "n/a" if w["os_threads"] is None else w["os_threads"]
        print(
            f"{name:<8} {steps:>9} {w['median_ms']:>10.1f} {w['q1_ms']:>8.1f} {w['q3_ms']:>8.1f} "
            f"{threads:>8}"
        )
    verdict = "ok" if results["accept"] else "FAIL"
    print(
        f"ratio after / before: {results['ratio']:.3f} ({verdict}: <= {ACCEPT}); the step with "
        f"the save took {results['save_step_ms']:.0f} ms"
    )
