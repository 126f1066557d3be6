"""The results of `attnres-ablate`: a table (Markdown and JSON) and the paper-style figures.

From every run's metrics.jsonl (the records attnres-train writes):
- final validation loss per variant: mean, sample standard deviation (n - 1) and the per-seed
  values; each AttnRes variant against `none`: the difference of means, Welch's t (difference
  over its standard error) and the mean of the per-seed paired differences (same seed: same data
  order);
- depth profile, from each run's last diagnostics record averaged over seeds: the RMS of every
  sublayer's raw output and of its gradient (paper Fig. 5); for `block`, the output RMS of each
  depth block's first sublayer against the previous sublayer (a reset is a drop there);
- figures in OUTPUT/plots: valid_loss.png (mean +- std over seeds), layer_norms.png (output and
  gradient RMS per sublayer, depth-block boundaries dashed), depth_attention_VARIANT.png (mean
  depth-attention weights, paper Fig. 8).
"""

import json
import math
import platform
import statistics
from pathlib import Path

from megatron_attnres.train.diagnostics import OUTPUT_KEY, sublayer_sort_key
from megatron_attnres.train.plots import plot_depth_attention, read_records, save_figure

# Paper Table 4 (16-layer, 436M-active ablation): final validation loss.
PAPER_TABLE4 = {"none": 1.766, "block": 1.746, "full": 1.737}
COLORS = {"none": "tab:gray", "block": "tab:blue", "full": "tab:orange"}


def _run_summary(spec) -> dict:
    records = read_records(spec.run_dir)
    final = records["final"][-1]
    curve = [(r["step"], r["loss"]) for r in records.get("valid", [])]
    curve.append((final["step"], final["valid_loss"]))
    diagnostics = records.get("diagnostics", [])
    return {
        "seed": spec.seed,
        "valid_loss": final["valid_loss"],
        "steps": final["step"],
        "curve": curve,
        "diagnostics": diagnostics[-1] if diagnostics else None,
    }


def _duration(run_dir: Path) -> float:
    path = run_dir / "duration_s.txt"
    return float(path.read_text()) if path.is_file() else 0.0


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def compare(variant: list[dict], baseline: list[dict]) -> dict:
    """`variant` against `baseline` (lists of run summaries): negative = lower loss."""
    a = [r["valid_loss"] for r in variant]
    b = [r["valid_loss"] for r in baseline]
    (mean_a, std_a), (mean_b, std_b) = _mean_std(a), _mean_std(b)
    out = {"difference": mean_a - mean_b, "welch_t": None, "paired_mean": None, "paired_std": None}
    if std_a is not None and std_b is not None:
        se = math.sqrt(std_a**2 / len(a) + std_b**2 / len(b))
        out["welch_t"] = (mean_a - mean_b) / se if se > 0 else None
    by_seed = {r["seed"]: r["valid_loss"] for r in baseline}
    paired = [r["valid_loss"] - by_seed[r["seed"]] for r in variant if r["seed"] in by_seed]
    if paired:
        out["paired_mean"], out["paired_std"] = _mean_std(paired)
    return out


def _mean_profile(runs: list[dict], name: str) -> dict[str, float]:
    """Mean over seeds of one per-sublayer diagnostics section (output_norm or grad_norm)."""
    sections = [r["diagnostics"][name] for r in runs if r["diagnostics"]]
    if not sections:
        return {}
    keys = sorted(sections[0], key=sublayer_sort_key)
    return {k: statistics.fmean(s[k] for s in sections) for k in keys}


def _mean_depth_attention(runs: list[dict]) -> dict:
    reads = [
        r["diagnostics"]["depth_attention"]
        for r in runs
        if r["diagnostics"] and r["diagnostics"].get("depth_attention")
    ]
    if not reads:
        return {}
    out = {}
    for key, first in reads[0].items():
        completed = [
            statistics.fmean(x) for x in zip(*(d[key]["completed"] for d in reads), strict=True)
        ]
        partial = (
            None if first["partial"] is None else statistics.fmean(d[key]["partial"] for d in reads)
        )
        out[key] = {"completed": completed, "partial": partial}
    return out


def layer_rms(output_norm: dict[str, float]) -> list[float]:
    """Per transformer layer (mixer + MLP sublayer), the RMS over both raw outputs:
    sqrt((rms_mixer^2 + rms_mlp^2) / 2), from the per-sublayer RMS of the diagnostics."""
    values = [output_norm[k] for k in sorted(output_norm, key=sublayer_sort_key) if k != OUTPUT_KEY]
    return [math.sqrt((a * a + b * b) / 2) for a, b in zip(values[::2], values[1::2], strict=False)]


def depth_profile(output_norm: dict[str, float], block_layers: int | None) -> dict:
    """How the layer output RMS grows with depth and, for Block AttnRes (`block_layers` layers
    per depth block), how it changes where a depth block starts compared with inside blocks."""
    layers = layer_rms(output_norm)
    if len(layers) < 2:
        return {}
    half = len(layers) // 2
    profile = {
        "layer_rms": layers,
        "last_over_first": layers[-1] / layers[0],
        "second_half_over_first_half": statistics.fmean(layers[half:])
        / statistics.fmean(layers[:half]),
    }
    if block_layers:
        starts = set(range(block_layers, len(layers), block_layers))  # 0-based first layers
        profile["boundary_ratios"] = [layers[i] / layers[i - 1] for i in sorted(starts)]
        inside = [layers[i] / layers[i - 1] for i in range(1, len(layers)) if i not in starts]
        profile["within_block_ratio_mean"] = statistics.fmean(inside) if inside else None
    return profile


def write_report(output: Path, specs: list, manifest: dict, elapsed_s: float) -> list[Path]:
    """Write OUTPUT/results.json, OUTPUT/results.md and OUTPUT/plots/*.png; return their paths."""
    runs: dict[str, list[dict]] = {}
    for spec in specs:
        runs.setdefault(spec.variant, []).append(_run_summary(spec))
    block_layers = manifest["config"].get("attn_res_block_layers", 1)
    results = {
        "preset": manifest["preset"],
        "config": manifest["config"],
        "data": manifest["data"],
        "host": f"{platform.node()} ({platform.processor() or platform.machine()})",
        "elapsed_s": round(elapsed_s, 1),
        "training_s": round(sum(_duration(spec.run_dir) for spec in specs), 1),
        "variants": {},
    }
    for variant, summaries in runs.items():
        mean, std = _mean_std([r["valid_loss"] for r in summaries])
        output_norm = _mean_profile(summaries, "output_norm")
        results["variants"][variant] = {
            "valid_loss_mean": mean,
            "valid_loss_std": std,
            "runs": [{k: r[k] for k in ("seed", "valid_loss", "steps")} for r in summaries],
            "vs_none": compare(summaries, runs["none"])
            if "none" in runs and variant != "none"
            else None,
            "output_norm": output_norm,
            "grad_norm": _mean_profile(summaries, "grad_norm"),
            "depth_profile": depth_profile(
                output_norm, block_layers if variant == "block" else None
            ),
            "paper_table4": PAPER_TABLE4[variant],
        }
    (output / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (output / "results.md").write_text(results_markdown(results))
    return [
        output / "results.json",
        output / "results.md",
        *write_plots(output / "plots", runs, block_layers),
    ]


def _f(value, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def results_markdown(results: dict) -> str:
    lines = [
        f"# attnres-ablate: preset {results['preset']}",
        "",
        f"Data: {results['data']}. Host: {results['host']}. Training time (all runs, including "
        f"start-up): {results['training_s'] / 60:.1f} min.",
        "",
        "| variant | runs | final valid loss (mean) | std | vs none | Welch t | paired diff "
        "(mean +- std) | paper Table 4 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for variant, r in results["variants"].items():
        cmp = r["vs_none"] or {}
        paired = (
            "n/a"
            if cmp.get("paired_mean") is None
            else (f"{cmp['paired_mean']:+.4f} +- {_f(cmp['paired_std'])}")
        )
        lines.append(
            f"| {variant} | {len(r['runs'])} | {r['valid_loss_mean']:.4f} | "
            f"{_f(r['valid_loss_std'])} | "
            f"{'' if not cmp else format(cmp['difference'], '+.4f')} | "
            f"{'' if not cmp else _f(cmp['welch_t'], 2)} | {'' if not cmp else paired} | "
            f"{r['paper_table4']:.3f} |"
        )
    lines += [
        "",
        "Depth profile: RMS of each transformer layer's raw output (mixer and MLP sublayers "
        "together), at the last diagnostics step, mean over seeds:",
        "",
    ]
    for variant, r in results["variants"].items():
        p = r["depth_profile"]
        if not p:
            continue
        text = (
            f"- {variant}: per layer {', '.join(f'{x:.3f}' for x in p['layer_rms'])}; last/first "
            f"layer {p['last_over_first']:.2f}, second half / first half "
            f"{p['second_half_over_first_half']:.2f}"
        )
        if "boundary_ratios" in p:
            ratios = ", ".join(f"{x:.2f}" for x in p["boundary_ratios"])
            text += (
                f"; where a depth block starts (its first layer / the previous): {ratios} "
                f"(inside blocks, mean {_f(p['within_block_ratio_mean'], 2)})"
            )
        lines.append(text)
    return "\n".join(lines) + "\n"


def write_plots(out: Path, runs: dict[str, list[dict]], block_layers: int) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant, summaries in runs.items():
        steps = [s for s, _ in summaries[0]["curve"]]
        per_step = list(
            zip(
                *(
                    [loss for _, loss in r["curve"]]
                    for r in summaries
                    if len(r["curve"]) == len(steps)
                ),
                strict=True,
            )
        )
        mean = [statistics.fmean(v) for v in per_step]
        std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in per_step]
        ax.plot(steps, mean, "o-", ms=3, color=COLORS[variant], label=variant)
        ax.fill_between(
            steps,
            [m - s for m, s in zip(mean, std, strict=True)],
            [m + s for m, s in zip(mean, std, strict=True)],
            color=COLORS[variant],
            alpha=0.2,
        )
    ax.set(xlabel="step", ylabel="validation loss (nats)", title="Validation loss (mean +- std)")
    ax.grid(alpha=0.3)
    ax.legend()
    written.append(save_figure(fig, out / "valid_loss.png"))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, name, title in [
        (axes[0], "output_norm", "Output RMS per sublayer"),
        (axes[1], "grad_norm", "Gradient RMS per sublayer"),
    ]:
        for variant, summaries in runs.items():
            profile = _mean_profile(summaries, name)
            keys = [k for k in profile if k != OUTPUT_KEY]
            ax.plot(
                [int(k) for k in keys],
                [profile[k] for k in keys],
                "o-",
                ms=3,
                color=COLORS[variant],
                label=variant,
            )
        for boundary in range(2 * block_layers, 10**4, 2 * block_layers):
            if boundary >= max((len(_mean_profile(s, name)) for s in runs.values()), default=0):
                break
            ax.axvline(boundary + 0.5, color="tab:blue", ls="--", lw=0.8, alpha=0.5)
        ax.set(xlabel="sublayer (dashed: block depth-block boundaries)", title=title, yscale="log")
        ax.grid(alpha=0.3)
        ax.legend()
    written.append(save_figure(fig, out / "layer_norms.png"))

    for variant, summaries in runs.items():
        weights = _mean_depth_attention(summaries)
        if weights:
            step = summaries[0]["diagnostics"]["step"]
            record = {"depth_attention": weights, "step": step}
            written.append(
                plot_depth_attention(
                    record,
                    out / f"depth_attention_{variant}.png",
                    title=f"Depth attention, {variant} (step {step}, {len(summaries)} seeds)",
                )
            )
    return written
