"""`attnres-bench cost`: the cost model applied to a run config (default: the 48B AttnRes shape),
with the predicted time of the residual path at H100 / H200 bandwidth."""

import dataclasses
from pathlib import Path

from megatron_attnres.attnres.schedule import DepthBlockSchedule
from megatron_attnres.bench.common import table
from megatron_attnres.bench.cost_model import (
    PEAK_BANDWIDTH,
    paper_elements,
    seconds_at,
    training_traffic,
    two_phase_traffic,
)
from megatron_attnres.config.flops import flops_per_token
from megatron_attnres.config.load import load_run_config
from megatron_attnres.config.megatron import layer_pattern, padded_vocab_size
from megatron_attnres.config.run import RunConfig

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "kimi_linear_48b_attnres.yaml"


def schedules(run: RunConfig) -> dict[str, DepthBlockSchedule]:
    """The run's sublayers under each residual mode (Block with the run's depth-block size)."""
    L = len(layer_pattern(run).replace("|", ""))
    return {
        "none": DepthBlockSchedule(L, "none"),
        "full": DepthBlockSchedule(L, "full"),
        "block": DepthBlockSchedule(L, "block", 2 * run.attn_res_block_layers),
    }


def _paper_rows(N: int, S: int, d: int) -> list[list]:
    """Coefficients of d (mHC's 2m^2 + 4m scalars divided by d); mHC with m = 4 streams."""
    return [
        [mode, f"N={N}, S={S}" if mode != "mhc" else "m=4", paper_elements(mode, d, N, S) / d]
        for mode in ("none", "block", "full", "mhc")
    ]


def _ms_at(nbytes: float) -> list[float]:
    return [1e3 * seconds_at(nbytes, bw) for bw in PEAK_BANDWIDTH.values()]


def run_cost(config: str | None = None, tokens: int | None = None) -> dict:
    run = load_run_config(config or DEFAULT_CONFIG)
    sched = schedules(run)
    block = sched["block"]
    L, S, N = block.num_sublayers, block.sublayers_per_block, block.num_blocks
    T = tokens or run.micro_batch_size * run.seq_length
    d, a = run.hidden_size, 2 if run.bf16 else 4
    vocab = padded_vocab_size(run, run.tokenizer_vocab_size)
    peak = run.peak_tflops or 989.0
    out = {
        "config": str(config or DEFAULT_CONFIG),
        "sublayers": L,
        "S": S,
        "N": N,
        "tokens": T,
        "hidden": d,
        "act_bytes": a,
        "paper_d_per_sublayer": {},
        "inference": {},
        "training": {},
    }
    lines = [
        f"cost model: {out['config']}: L={L} sublayers, S={S}, N={N} depth blocks, "
        f"hidden {d}, {T} tokens, {a}-byte activations"
    ]
    rows = _paper_rows(8, 16, d) + _paper_rows(N, S, d)[:3]
    out["paper_d_per_sublayer"] = {f"{r[0]} {r[1]}": r[2] for r in rows}
    lines.append(
        table(
            "paper Table 1: residual-path traffic per token per sublayer, in d",
            ["mode", "shape", "x d"],
            rows,
        )
    )
    # Inference: the paper's fused two-phase figure, our PyTorch two-phase code (exact), and the
    # standard residual; one forward over T tokens.
    infer = {
        "none (3d per sublayer)": 3 * d * T * L * a,
        "block, paper fused (N/S+5)d": paper_elements("block", d, N, S) * T * L * a,
        "block, our PyTorch two-phase": sum(
            t.total for t in two_phase_traffic(sched["block"], T, d, a).values()
        ),
    }
    out["inference"] = infer
    per_layer = {k: v / T / (L / 2) for k, v in infer.items()}  # bytes per token per layer
    rows = [[k, v / 1e9, per_layer[k], *_ms_at(v)] for k, v in infer.items()]
    lines.append(
        table(
            f"inference, one forward of {T} tokens: residual-path bytes and time",
            ["residual path", "GB", "B/token/layer", *(f"ms at {k}" for k in PEAK_BANDWIDTH)],
            rows,
        )
    )
    rows = []
    for mode, schedule in sched.items():
        parts = training_traffic(schedule, T, d, a)
        nbytes = sum(p.total for p in parts.values())
        mode_run = dataclasses.replace(
            run,
            enable_attention_residuals=mode != "none",
            attn_res_mode="full" if mode == "full" else "block",
        )
        flops = flops_per_token(mode_run, vocab, layer_pattern(run), schedule.read_source_counts())
        matmul_ms = 1e3 * flops * T / (peak * 1e12)
        ms = _ms_at(nbytes)
        out["training"][mode] = dict(
            bytes=nbytes,
            model_flops_per_token=flops,
            compute_ms_at_peak=matmul_ms,
            residual_ms=dict(zip(PEAK_BANDWIDTH, ms, strict=True)),
        )
        out["training"][mode]["residual_flops_per_token"] = parts["reads"].flops / T
        row = [mode, nbytes / 1e9, nbytes / T / (L / 2), parts["reads"].flops / T, *ms]
        rows.append([*row, matmul_ms, 100 * ms[0] / matmul_ms])
    lines.append(
        table(
            f"training, forward + backward of {T} tokens: residual-path bytes and time (bandwidth-"
            f"bound) vs the model's FLOPs at {peak:g} TFLOP/s",
            [
                "mode",
                "GB",
                "B/token/layer",
                "read FLOPs/token",
                *(f"ms at {k}" for k in PEAK_BANDWIDTH),
                "model ms at peak",
                "residual / model % (H100)",
            ],
            rows,
        )
    )
    print("\n\n".join(lines), flush=True)
    return out
