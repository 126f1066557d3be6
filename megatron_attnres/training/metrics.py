"""What a run reports: the FLOP count behind TFLOP/s and MFU, the progress line, the metrics JSONL
file and the wandb mirror of it.

FLOPs per token (one training step = forward + backward = 3 x forward; multiply-accumulates
count 2 FLOPs; embeddings are lookups and count 0):

    forward = 2 x (matmul weights a token passes through: attention/MLA/KDA projections, KDA's
               short-convolution taps, dense MLPs, router, top-k routed experts + shared expert,
               output layer)
            + 2 x seq x heads x (d_qk + d_v) per attention or MLA sublayer (QK^T and AV over the
               full sequence, as Megatron-LM and PaLM count; causal masking is not subtracted)
            + 2 x 4 x H x D^2 per KDA sublayer (H heads of size D): the delta-rule state update
               and read-out, approximated as Megatron-LM's gdn_layer_flops approximates Gated
               DeltaNet's (4 D^2 multiply-accumulates per head and token: decay, k^T S, the rank-1
               write, q^T S; no sequence term, the chunked form's intra-chunk products ignored)
            + 4 x sources x hidden per depth read (AttnRes: dot products + weighted sum)

MFU = achieved FLOP/s / (peak_tflops x 1e12 x ranks); without `peak_tflops` it is not reported.
"""

import json
import math
import time
from pathlib import Path

import numpy as np

from megatron_attnres.training.run_config import RunConfig, as_dict


def _attention_dims(run: RunConfig, mla: bool) -> tuple[int, int, int]:
    """(matmul weights, d_qk, d_v) of one attention sublayer: MLA ('+') or standard ('*')."""
    h, heads = run.hidden_size, run.num_attention_heads
    if mla:
        d_qk, d_v = run.qk_head_dim + run.qk_pos_emb_head_dim, run.v_head_dim
        q = (
            (h * run.q_lora_rank + run.q_lora_rank * heads * d_qk)
            if run.q_lora_rank
            else h * heads * d_qk
        )
        kv = h * (run.kv_lora_rank + run.qk_pos_emb_head_dim)
        kv += run.kv_lora_rank * heads * (run.qk_head_dim + run.v_head_dim)
        return q + kv + heads * d_v * h, d_qk, d_v
    d = run.kv_channels or h // heads
    groups = run.num_query_groups or heads
    return h * (heads + 2 * groups) * d + heads * d * h, d, d


def kda_parameter_shapes(run: RunConfig) -> dict[str, tuple[int, ...]]:
    """Global shapes of one KDA mixer's parameters (`self_attention.` + name; the layer's pre-norm
    excluded), as the KDA contract and transformers' KimiLinearDeltaAttention define them: H heads
    of size D for q, k and v, low-rank forget and output gates of width D, per-head A_log."""
    h, heads, d = run.hidden_size, run.linear_num_key_heads, run.linear_key_head_dim
    inner, kernel = heads * d, run.linear_conv_kernel_dim
    return {
        **{f"{x}_proj.weight": (inner, h) for x in "qkv"},
        **{f"{x}_conv1d.weight": (inner, 1, kernel) for x in "qkv"},
        "f_a_proj.weight": (d, h),
        "f_b_proj.weight": (inner, d),
        "b_proj.weight": (heads, h),
        "A_log": (heads,),
        "dt_bias": (inner,),
        "g_a_proj.weight": (d, h),
        "g_b_proj.weight": (inner, d),
        "o_norm.weight": (d,),
        "o_proj.weight": (h, inner),
    }


def kda_matmul_weights(run: RunConfig) -> int:
    """Weights a token multiplies in one KDA mixer: the projections and the convolution taps (each
    used once per token); A_log, dt_bias and the output norm gain are elementwise."""
    return sum(math.prod(s) for s in kda_parameter_shapes(run).values() if len(s) > 1)


def flops_per_token(run: RunConfig, vocab_size: int, pattern: str, num_reads: list[int]) -> float:
    """Training FLOPs per token of the model (see the module docstring). `num_reads[i]` is the
    number of sources of depth read i (empty for the standard residual)."""
    h, s = run.hidden_size, run.seq_length
    matmul, sequence = h * vocab_size, 0
    for symbol in pattern.replace("|", ""):
        if symbol in "*+":
            weights, d_qk, d_v = _attention_dims(run, mla=symbol == "+")
            matmul += weights
            sequence += 2 * s * run.num_attention_heads * (d_qk + d_v)
        elif symbol == "G":
            matmul += kda_matmul_weights(run)
            sequence += 2 * 4 * run.linear_num_key_heads * run.linear_key_head_dim**2
        elif symbol == "-":
            matmul += 3 * h * run.ffn_hidden_size
        elif symbol == "E":
            moe_ffn = run.moe_ffn_hidden_size or run.ffn_hidden_size
            matmul += h * run.num_experts + 3 * h * moe_ffn * run.moe_router_topk
            matmul += 3 * h * (run.moe_shared_expert_intermediate_size or 0)
    depth = sum(4 * n * h for n in num_reads if n > 1)
    return 3.0 * (2 * matmul + sequence + depth)


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
