"""The tables of `attnres-bench model` (results of bench/model_step.py)."""

from megatron_attnres.bench.common import device_info, header_line, table


def _memory(entry: dict) -> int | None:
    return entry.get("saved_activation_bytes") or entry.get("step_peak_memory_bytes")


def print_model_tables(results: dict, device: str) -> None:
    if device == "cuda":
        memory_kind = "peak CUDA memory of a step (B)"
    else:
        memory_kind = "saved activations, one forward (B)"
    rows = []
    for pp in (1, 2):
        res = results[f"pp{pp}"]
        if "skipped" in res:
            rows.append([f"PP={pp}", res["skipped"], None, None, None, None])
            continue
        block, none = res["block"], res["none"]
        for mode, entry in (("block", block), ("none", none)):
            rows.append(
                [
                    f"PP={pp}",
                    mode,
                    1e3 * entry["step_s"],
                    entry["tokens_per_s"],
                    entry["mfu"],
                    _memory(entry),
                ]
            )
        saved = _memory(block)
        results[f"pp{pp}"]["ratios"] = ratios = dict(
            step_time=block["step_s"] / none["step_s"],
            step_time_paired=block.get("paired_ratio_vs_none"),
            memory=saved / _memory(none) if saved else None,
        )
        rows.append(
            [
                f"PP={pp}",
                "block / none",
                ratios["step_time"],
                none["tokens_per_s"] and block["tokens_per_s"] / none["tokens_per_s"],
                None,
                ratios["memory"],
            ]
        )
        if ratios["step_time_paired"] is not None:
            rows.append(
                [f"PP={pp}", "block / none, paired", ratios["step_time_paired"], None, None, None]
            )
    text = table(
        f"model: {results['config']}, median of {results['steps']} steps after "
        f"{results['warmup']} (modes interleaved; 'paired' = median of the per-round ratios)",
        ["layout", "mode", "step ms (ratio)", "tokens/s (ratio)", "MFU", memory_kind],
        rows,
    )
    lines = [header_line(device_info(device)), text]
    wide = results.get("saved_activations") or {}
    if wide:
        rows = [
            [
                name,
                r["block_bytes"],
                r["none_bytes"],
                r["ratio"],
                r["overhead_measured"],
                r["overhead_predicted"],
            ]
            for name, r in wide.items()
        ]
        lines.append(
            table(
                "saved activations of one forward at hidden 512 (PP=1; predicted overhead: "
                "DepthBlockSchedule.saved_activation_overhead_bytes)",
                ["config", "block B", "none B", "block / none", "overhead B", "predicted B"],
                rows,
            )
        )
    print("\n".join(lines), flush=True)
