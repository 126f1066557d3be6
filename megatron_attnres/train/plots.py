"""Plots of a training run from RUN_DIR/metrics.jsonl, written to RUN_DIR/plots:

    loss.png             train and validation loss against step
    depth_attention.png  mean depth-attention weight of every read (rows: sublayers, then the
                         output read) over its sources b_0, b_1, ... and the partial summary,
                         from the last diagnostics record (like the paper's Fig. 8)
    layer_norms.png      RMS of each sublayer's output and of its gradient, from the last
                         diagnostics record (like the paper's Fig. 5)

    attnres-plot runs/tiny
    attnres-plot runs/tiny --log-y

The records are those `attnres-train` writes (`train/metrics.py`); the diagnostics format is
documented in `train/diagnostics.py`.
"""

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from megatron_attnres.train.diagnostics import OUTPUT_KEY, sublayer_sort_key

PARTIAL_COLUMN = "partial"


class RunDirError(ValueError):
    """RUN_DIR cannot be plotted (missing, no metrics file, malformed or empty records)."""


def read_records(run_dir: Path) -> dict[str, list[dict]]:
    """The records of RUN_DIR/metrics.jsonl grouped by their "kind", in file order."""
    if not run_dir.is_dir():
        raise RunDirError(
            f"run directory {run_dir} does not exist; a run directory is written by attnres-train "
            "(its run_dir setting)"
        )
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise RunDirError(
            f"{path} not found; attnres-train writes it into its run directory as it trains"
        )
    records: dict[str, list[dict]] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise RunDirError(f"{path}, line {number}: not valid JSON ({error})") from None
        if not isinstance(record, dict) or "kind" not in record:
            raise RunDirError(f"{path}, line {number}: expected a JSON object with a 'kind' field")
        records.setdefault(record["kind"], []).append(record)
    return records


def write_plots(run_dir: str | Path, log_y: bool = False) -> list[Path]:
    """Write the plots of RUN_DIR and return their paths. Raises RunDirError on bad input; without
    diagnostics records only loss.png is written (and a note printed)."""
    import matplotlib

    matplotlib.use("Agg")
    run_dir = Path(run_dir)
    records = read_records(run_dir)
    if not records.get("train"):
        raise RunDirError(
            f"{run_dir / 'metrics.jsonl'} has no train records; the run has not logged a "
            "training step yet"
        )
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    written = [_plot_loss(records["train"], records.get("valid", []), out / "loss.png", log_y)]
    if not records.get("diagnostics"):
        print(
            f"note: {run_dir / 'metrics.jsonl'} has no diagnostics records (attnres-train writes "
            "them every diagnostics_interval steps); skipped depth_attention.png and "
            "layer_norms.png"
        )
        return written
    last = records["diagnostics"][-1]
    if last.get("depth_attention"):
        written.append(plot_depth_attention(last, out / "depth_attention.png"))
    else:
        print("note: the run has no depth reads (standard residual); skipped depth_attention.png")
    written.append(_plot_layer_norms(last, out / "layer_norms.png"))
    return written


def _plot_loss(train: list[dict], valid: list[dict], path: Path, log_y: bool) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", lw=1)
    if valid:
        ax.plot([r["step"] for r in valid], [r["loss"] for r in valid], "o-", label="valid")
    ax.set(xlabel="step", ylabel="loss", title="Loss")
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def depth_attention_grid(depth_attention: dict) -> tuple[list[str], list[str], list[list]]:
    """(row labels, column labels, rows) of the heatmap: one row per read in model order, columns
    b_0..b_{M-1} then the partial summary; None where a read has no such source."""
    keys = sorted(depth_attention, key=sublayer_sort_key)
    width = max(len(depth_attention[key]["completed"]) for key in keys)
    rows = []
    for key in keys:
        read = depth_attention[key]
        completed = list(read["completed"])
        rows.append(completed + [None] * (width - len(completed)) + [read["partial"]])
    columns = [f"b_{i}" for i in range(width)] + [PARTIAL_COLUMN]
    return keys, columns, rows


def plot_depth_attention(record: dict, path: Path, title: str | None = None) -> Path:
    """Heatmap of record["depth_attention"] (the diagnostics format) written to `path`."""
    import matplotlib.pyplot as plt
    import numpy as np

    keys, columns, rows = depth_attention_grid(record["depth_attention"])
    grid = np.ma.masked_invalid(np.array(rows, dtype=float))  # None -> nan -> blank cell
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(columns), 1.5 + 0.32 * len(keys)))
    image = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(columns)), columns)
    ax.set_yticks(range(len(keys)), [_row_label(key) for key in keys])
    title = title or f"Depth attention (step {record['step']})"
    ax.set(xlabel="source", ylabel="read", title=title)
    if grid.size <= 400:
        for (i, j), value in np.ndenumerate(grid.filled(np.nan)):
            if not np.isnan(value):
                color = "white" if value < 0.6 else "black"
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color=color)
    fig.colorbar(image, ax=ax, label="mean weight")
    return save_figure(fig, path)


def _row_label(key: str) -> str:
    return "output" if key == OUTPUT_KEY else f"sublayer {key}"


def _plot_layer_norms(record: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, name, title in [
        (axes[0], "output_norm", "Output RMS"),
        (axes[1], "grad_norm", "Gradient RMS"),
    ]:
        values = record.get(name, {})
        keys = sorted(values, key=sublayer_sort_key)
        ax.plot([int(key) for key in keys], [values[key] for key in keys], "o-", ms=3)
        ax.set(xlabel="sublayer", title=f"{title} (step {record['step']})")
        if values and min(values.values()) > 0:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    return save_figure(fig, path)


def save_figure(fig, path: Path) -> Path:
    """Lay out, write at 120 dpi and close `fig`; return `path`."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="attnres-plot",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory of attnres-train")
    parser.add_argument("--log-y", action="store_true", help="logarithmic loss axis")
    args = parser.parse_args(argv)
    try:
        written = write_plots(args.run_dir, log_y=args.log_y)
    except RunDirError as error:
        parser.error(str(error))
    for path in written:
        print(f"wrote {path}")
    return 0
