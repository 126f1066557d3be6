"""What every benchmark part shares: the device description, a timer, tables and JSON output."""

import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from megatron_attnres.bench.cost_model import PEAK_BANDWIDTH


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def device_info(device: str) -> dict:
    """Device name, peak bandwidth where known, torch version, commit."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((bw for key, bw in PEAK_BANDWIDTH.items() if key.split()[0] in name), None)
    else:
        name, peak = f"{cpu_model()} ({torch.get_num_threads()} threads)", None
    return {
        "device": device,
        "name": name,
        "peak_bandwidth": peak,
        "torch": torch.__version__,
        "commit": commit(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def commit() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            text=True,
            capture_output=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=root, text=True, capture_output=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head} plus uncommitted work" if dirty else head


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, device: str, warmup: int = 2, reps: int = 5) -> float:
    """Median wall time of `fn()` over `reps` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(fns: dict, device: str, warmup: int, reps: int) -> dict[str, float]:
    """Median time of each of `fns`, run interleaved (`interleaved_times`)."""
    times = interleaved_times(fns, device, warmup, reps)
    return {name: statistics.median(values) for name, values in times.items()}


def paired_ratio(times: dict[str, list[float]], name: str, baseline: str) -> float:
    """Median over rounds of times[name][i] / times[baseline][i]: each ratio compares two runs
    taken one after the other, so that slow drifts of a shared machine's speed cancel (on a
    noisy CPU the ratio of two medians moves by several percent between runs)."""
    pairs = zip(times[name], times[baseline], strict=True)
    return statistics.median(a / b for a, b in pairs)


def interleaved_times(fns: dict, device: str, warmup: int, reps: int) -> dict[str, list[float]]:
    """The seconds of every timed run of each of `fns`, run in turn, in the listed order in even
    rounds and reversed in odd ones (A B, B A, A B, ...): load from other processes falls on all
    of them alike, and so does any cost of running first or last in a round (measured on a
    shared CPU: two identical models differed by 3-5% in a fixed order)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    order = list(fns.items())
    for round_ in range(reps):
        for name, fn in order if round_ % 2 == 0 else order[::-1]:
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def table(title: str, header: list[str], rows: list[list]) -> str:
    """A plain fixed-width table (also valid Markdown)."""
    cells = [[_cell(v) for v in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [f"{title}", ""]
    for k, row in enumerate(cells):
        lines.append("| " + " | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if k == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def header_line(info: dict) -> str:
    peak = info["peak_bandwidth"]
    peak_text = f"{peak / 1e12:.2f} TB/s" if peak else "n/a"
    note = "" if info["device"] == "cuda" else " (CPU: ratios are CPU ratios, not GPU predictions)"
    return (
        f"device: {info['name']} | peak bandwidth {peak_text} | torch {info['torch']} | "
        f"commit {info['commit']} | {info['date']}{note}"
    )


def write_json(path: str | None, results: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(results, indent=2, default=str))
