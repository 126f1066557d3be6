"""`attnres-model-size`: parameters, training FLOPs and per-GPU memory of a run config, by
arithmetic on the config (no model is built, no process group is started).

    attnres-model-size --config configs/kimi_linear_48b_attnres.yaml --gpus 64 [--json]
    attnres-model-size --config configs/kimi_linear_48b_attnres.yaml --gpus 128 \\
        --expert-model-parallel-size 32            # any config key, as for attnres-train

Parameters: every pattern symbol is counted as this codebase builds it (local specs, no biases,
SwiGLU, the router's expert bias is a buffer): a pre-norm gain (h) per sublayer, the mixer's or
MLP's weights, the embedding and the final norm, the LM head unless tied, and with AttnRes a
pseudo-query and a key-norm gain (2h) per sublayer read and for the output read. Mixers:
  attention '*'  Q, K, V, O projections (grouped KV heads)
  MLA '+'        Megatron's MultiLatentAttention; the qk_pos_emb_head_dim channels have their
                 weights whether or not they are rotated (mla_use_nope); with qk_layernorm the
                 latent norms (kv_lora_rank, + q_lora_rank under q-LoRA) count with MLA
  KDA 'G'        config.flops.kda_parameter_shapes (the KDA contract): q/k/v/o projections, three
                 depthwise short convolutions, forget gate f_a/f_b + A_log + dt_bias, beta
                 projection b_proj, output gate g_a/g_b and the gated output norm o_norm
Breakdown categories: each mixer, MLP and router counts everything inside it (its internal norms
included); `norms` are the sublayers' pre-norms and the final norm. Active parameters are those a
token passes through: everything except the input embedding, with top-k / num_experts of each MoE
layer's routed experts; the LM head counts (tied: the shared matrix counts once, as the LM head).
Training FLOPs per token: config.flops.flops_per_token.

Memory per GPU (bytes) on the rank of each pipeline stage:
  weights     params on the rank x 2 (bf16) or 4 (fp32); a rank holds the replicated parameters
              (norms, router, AttnRes, KDA's o_norm), 1/TP of the tensor-parallel ones
              (vocab-parallel embedding and LM head, attention, MLA, the rest of KDA, dense MLP,
              shared expert) and 1/(EP x ETP) of the routed experts. Tied embeddings with
              PP > 1 put a copy of the embedding on the last stage.
  gradients   params x 4 (Megatron DDP with grad_reduce_in_fp32: fp32 main grads)
  optimizer   params x (4 for the fp32 master copy when bf16 + states): Adam 8 (two moments);
              Muon 4 (momentum) for the hidden matrices and Adam for the embedding, the LM head and
              1-D parameters; SGD 4. The distributed optimizer divides master copy + states by the
              data-parallel size (the expert-data-parallel size for routed experts).
  activations micro-batches in flight x bytes saved for backward per micro-batch. Per micro-batch
              (t = micro_batch_size x seq_length tokens, a = activation bytes: 2 in bf16, 4 fp32),
              Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
              Models": 34 sbh + 5 a s^2 b per GPT layer) adapted to flash attention (Q, K, V, O and
              an fp32 log-sum-exp per head, no s^2 term), no dropout masks, SwiGLU, MLA and MoE:
                every sublayer  pre-norm input and output               2 a t h
                attention '*'   Q, K, V, O + LSE                        a t (2 n d + 2 g d) + 4 t n
                MLA '+'         Q, K, V, O + LSE + the KV latent (twice with its norm) and the
                                Q latent under q-LoRA (twice with its norm)
                KDA 'G'         (estimate for an unfused layer on fla-core's chunk_kda, whose
                                forward keeps its inputs and recomputes the chunk states; e = H D,
                                C = 64 the chunk size) q/k/v projection outputs, short-conv
                                outputs and SiLU outputs 9 a t e; the kernel's L2-normalised q, k
                                2 a t e; the output-gate projection, the kernel output and the
                                gated norm's output 3 a t e; the low-rank gate latents 2 a t D; the
                                fp32 forget-gate path (softplus input and output, g, its chunk
                                cumsum) 16 t e; the kernel's fp32 intra-chunk matrices Aqk, Akk
                                8 t H C; beta, its logits and the q/k rsqrt 16 t H
                dense MLP '-'   SwiGLU input + fc2 input                3 a t f
                MoE 'E'         fp32 router logits and scores 8 t E; routed tokens into and out of
                                the experts 2 a t k h; experts 3 a t k f_e; shared expert 3 a t f_s
                last stage      final norm input and output 2 a t h + the cross-entropy's fp32
                                softmax 4 t V / TP
                AttnRes         per sublayer one [t, h] partial summary and 3 fp32 scalars per
                                source and token of each read of two or more sources
                                (DepthBlockSchedule.saved_activation_overhead_bytes, split by
                                stage), plus the summaries a later stage receives ((m + 1) [t, h])
              TP divides all of it except the pre-norm tensors and the AttnRes tensors, which it
              divides only under sequence parallelism. Under 1F1B pipeline rank p of P holds
              min(P - p, micro-batches) micro-batches in flight (the first stage P); interleaved:
              Megatron's warm-up count + 1 chunk forwards, each the rank's mean chunk.
  Not counted: transient buffers (all-to-all, bf16 logits, recompute), allocator fragmentation,
  the CUDA context (~1-2 GB).
"""

import argparse
import json
import math
import sys
import textwrap
from dataclasses import dataclass

from megatron_attnres.config.flops import (
    _attention_dims,
    flops_per_token,
    kda_parameter_shapes,
)
from megatron_attnres.config.load import load_run_config, parse_overrides
from megatron_attnres.config.megatron import layer_pattern, padded_vocab_size
from megatron_attnres.config.megatron import transformer_config as make_transformer_config
from megatron_attnres.config.rules import microbatches_per_step
from megatron_attnres.config.run import RunConfig
from megatron_attnres.mcore.model import check_pattern, pipeline_pattern
from megatron_attnres.mcore.pipeline import chunk_first_layers

CATEGORIES = (
    "embedding",
    "lm_head",
    "attention",
    "mla",
    "kda",
    "dense_mlp",
    "router",
    "shared_expert",
    "routed_experts",
    "norms",
    "attnres",
)
# KDA parameters every tensor-parallel rank holds whole (mcore/kda.py splits the rest: by heads,
# and the low-rank gates' down projections f_a/g_a along D)
KDA_REPLICATED = ("o_norm.weight",)
CONVENTION = (
    "active = the parameters one token passes through: LM head included, input "
    "embedding not; routed experts as top-k / num_experts of each MoE layer; KDA, MLA, "
    "attention, dense MLP, shared expert, router, norms and AttnRes in full"
)
LABELS = {
    "embedding": "embedding",
    "lm_head": "LM head",
    "attention": "attention *",
    "mla": "MLA +",
    "kda": "KDA G",
    "dense_mlp": "dense MLP -",
    "router": "MoE router",
    "shared_expert": "shared expert",
    "routed_experts": "routed experts",
    "norms": "norms",
    "attnres": "AttnRes w, g",
}
KDA_CHUNK = 64  # fla-core chunk_kda's default chunk size (activation estimate)
GB = 1e9
MEMORY_HEADER = "per GPU, GB    params(B)  weights  grads  optimizer  activations  in flight  total"


@dataclass(frozen=True)
class Params:
    """`count` parameters of one kind in one sublayer (or the embedding/output)."""

    category: str  # one of CATEGORIES
    count: int
    sharding: str = "replicated"  # replicated | tensor (split over TP) | expert (EP x ETP)
    matrix: bool = False  # a hidden 2-D weight: Muon steps these, AdamW everything else


def sublayer_params(run: RunConfig, symbol: str) -> list[Params]:
    """The parameters of one pattern symbol (pre-norm included, AttnRes read excluded)."""
    h = run.hidden_size
    norm = Params("norms", h)
    if symbol == "*":
        return [norm, Params("attention", _attention_dims(run, mla=False)[0], "tensor", True)]
    if symbol == "+":
        out = [norm, Params("mla", _attention_dims(run, mla=True)[0], "tensor", True)]
        if run.qk_layernorm:
            out.append(Params("mla", run.kv_lora_rank + (run.q_lora_rank or 0)))
        return out
    if symbol == "G":
        return [norm, *kda_params(run)]
    if symbol == "-":
        return [norm, Params("dense_mlp", 3 * h * run.ffn_hidden_size, "tensor", True)]
    if symbol == "E":
        expert_ffn = run.moe_ffn_hidden_size or run.ffn_hidden_size
        out = [
            norm,
            Params("router", run.num_experts * h, matrix=True),
            Params("routed_experts", 3 * h * expert_ffn * run.num_experts, "expert", True),
        ]
        if run.moe_shared_expert_intermediate_size:
            shared = 3 * h * run.moe_shared_expert_intermediate_size
            out.append(Params("shared_expert", shared, "tensor", True))
        return out
    raise ValueError(
        f"pattern symbol {symbol!r} has no parameter count here; use '*' (attention), '+' (MLA), "
        "'G' (KDA), '-' (dense MLP) or 'E' (MoE)"
    )


def kda_params(run: RunConfig) -> list[Params]:
    """One KDA mixer's parameters by sharding; Muon steps its 2-D weights (the convolutions are
    3-D and, like A_log, dt_bias and o_norm, go to AdamW)."""
    out = []
    for name, shape in kda_parameter_shapes(run).items():
        sharding = "replicated" if name in KDA_REPLICATED else "tensor"
        out.append(Params("kda", math.prod(shape), sharding, matrix=len(shape) == 2))
    return out


def chunk_params(run: RunConfig, segment: str, vocab: int, first: bool, last: bool) -> list[Params]:
    """The parameters of one pipeline chunk (`segment`: its pattern symbols)."""
    h, attnres = run.hidden_size, run.enable_attention_residuals
    tied = not run.untie_embeddings_and_output_weights
    out = [Params("embedding", vocab * h, "tensor")] if first else []
    for symbol in segment:
        out += sublayer_params(run, symbol)
        out += [Params("attnres", 2 * h)] if attnres else []
    if last:
        out.append(Params("norms", h))
        out += [Params("attnres", 2 * h)] if attnres else []  # the output read
        if not tied:
            out.append(Params("lm_head", vocab * h, "tensor"))
        elif not first:  # Megatron keeps a synchronised copy of the embedding on the last stage
            out.append(Params("tied_lm_head_copy", vocab * h, "tensor"))
    return out


def parameter_counts(run: RunConfig, pattern: str, vocab: int) -> dict:
    """Total and active parameters of the whole model, with their breakdown by category."""
    params = chunk_params(run, pattern.replace("|", ""), vocab, first=True, last=True)
    tied = not run.untie_embeddings_and_output_weights
    breakdown = {c: {"total": 0, "active": 0} for c in CATEGORIES}
    for p in params:
        active = p.count
        if p.category == "embedding" and not tied:
            active = 0  # an input lookup; with tied embeddings this matrix is the LM head
        elif p.category == "routed_experts":
            active = p.count // run.num_experts * run.moe_router_topk
        breakdown[p.category]["total"] += p.count
        breakdown[p.category]["active"] += active
    total = sum(b["total"] for b in breakdown.values())
    active = sum(b["active"] for b in breakdown.values())
    return dict(total=total, active=active, breakdown=breakdown)


def parallel_sizes(run: RunConfig, config, gpus: int | None) -> dict:
    """TP, PP, VP, EP, ETP, DP, expert-DP and micro-batches per step for `gpus` ranks (default:
    the smallest world the plan runs on)."""
    tp, pp, ep = (
        run.tensor_model_parallel_size,
        run.pipeline_model_parallel_size,
        run.expert_model_parallel_size,
    )
    etp = config.expert_tensor_parallel_size
    if gpus is None:
        gpus = next(
            n
            for n in range(tp * pp, tp * pp * ep * etp + 1, tp * pp)
            if (n // pp) % (ep * etp) == 0
        )
    if gpus % (tp * pp) or (gpus // pp) % (ep * etp):
        raise ValueError(
            f"--gpus {gpus} does not fit TP={tp} x PP={pp} with EP={ep} x ETP={etp} per stage; "
            f"use a multiple of {tp * pp} whose share per stage ({gpus // pp}) EP x ETP divides"
        )
    dp, edp = gpus // (tp * pp), gpus // (pp * ep * etp)
    microbatches = microbatches_per_step(run, dp)
    vp = run.virtual_pipeline_model_parallel_size or 1
    return dict(
        gpus=gpus,
        tp=tp,
        pp=pp,
        vp=vp,
        ep=ep,
        etp=etp,
        dp=dp,
        edp=edp,
        micro_batch_size=run.micro_batch_size,
        microbatches=microbatches,
    )


def sublayer_activation_bytes(run: RunConfig, symbol: str, tokens: int, tp: int) -> float:
    """Bytes one sublayer saves for backward per micro-batch of `tokens` (module docstring)."""
    h, n, a = run.hidden_size, run.num_attention_heads, 2 if run.bf16 else 4
    norm = 2 * a * tokens * h / (tp if run.sequence_parallel else 1)
    if symbol == "*":
        d = run.kv_channels or h // n
        inner = a * tokens * (2 * n * d + 2 * (run.num_query_groups or n) * d) + 4 * tokens * n
    elif symbol == "+":
        d_qk = run.qk_head_dim + run.qk_pos_emb_head_dim
        latents = run.kv_lora_rank + run.qk_pos_emb_head_dim + (run.q_lora_rank or 0)
        latents *= 2 if run.qk_layernorm else 1
        qkvo = n * (2 * d_qk + 2 * run.v_head_dim)
        inner = a * tokens * (qkvo + latents) + 4 * tokens * n
    elif symbol == "G":
        inner = kda_activation_bytes(run, tokens, a)
    elif symbol == "-":
        inner = 3 * a * tokens * run.ffn_hidden_size
    else:  # 'E'
        k, expert_ffn = run.moe_router_topk, run.moe_ffn_hidden_size or run.ffn_hidden_size
        shared = run.moe_shared_expert_intermediate_size or 0
        inner = 8 * tokens * run.num_experts
        inner += a * tokens * (2 * k * h + 3 * k * expert_ffn + 3 * shared)
    return norm + inner / tp


def kda_activation_bytes(run: RunConfig, tokens: int, a: int) -> int:
    """Bytes one KDA mixer saves for backward, its pre-norm excluded (the module docstring's
    estimate; TP splits all of it by heads)."""
    heads, d = run.linear_num_key_heads, run.linear_key_head_dim
    e = heads * d
    saved = a * (14 * e + 2 * d) + 16 * e + 8 * heads * KDA_CHUNK + 16 * heads
    return tokens * saved


def attnres_stage_bytes(
    schedule,
    first: int,
    last: int,
    final: bool,
    tokens: int,
    hidden: int,
    act_bytes: int,
    recompute_read: bool = True,
) -> int:
    """AttnRes's extra saved bytes on a chunk of sublayers first..last (1-based): the terms of
    DepthBlockSchedule.saved_activation_overhead_bytes that fall in the chunk, plus the summaries
    it receives when it is not the first chunk. Summed over PP=1's only chunk, the same number."""
    if not schedule.uses_depth_reads:
        return 0
    reads = [schedule.sources(j).num_sources for j in range(first, last + 1)]
    reads += [schedule.num_final_sources()] if final else []
    scalars = sum(3 * n * tokens * 4 for n in reads if n >= 2)
    received = schedule.summaries_entering(first) if first > 1 else 0
    kept_results = 0 if recompute_read else last - first + 1  # see the schedule's docstring
    return (kept_results + received) * tokens * hidden * act_bytes + scalars


def chunk_activation_bytes(
    run: RunConfig, schedule, segment: str, first: int, last: bool, vocab: int, tp: int
) -> float:
    """Bytes a pipeline chunk saves for backward per micro-batch."""
    tokens, a, h = run.micro_batch_size * run.seq_length, 2 if run.bf16 else 4, run.hidden_size
    total = sum(sublayer_activation_bytes(run, s, tokens, tp) for s in segment)
    if last:
        total += 2 * a * tokens * h / (tp if run.sequence_parallel else 1)
        total += 4 * tokens * vocab / tp
    attnres = attnres_stage_bytes(
        schedule, first, first + len(segment) - 1, last, tokens, h, a, run.attn_res_recompute_read
    )
    return total + attnres / (tp if run.sequence_parallel else 1)


def in_flight(sizes: dict, rank: int) -> int:
    """Chunk forwards whose activations pipeline rank `rank` holds at its peak."""
    P, V, m = sizes["pp"], sizes["vp"], sizes["microbatches"]
    if V == 1:
        return min(P - rank, m)
    return min((P - rank - 1) * 2 + (V - 1) * P + 1, m * V)  # Megatron's interleaved warm-up + 1


def optimizer_bytes_per_param(run: RunConfig, p: Params) -> int:
    master = 4 if run.bf16 else 0
    if run.optimizer == "sgd":
        return master + 4
    if run.optimizer == "muon" and p.matrix:
        return master + 4
    return master + 8  # Adam (and Muon's AdamW part): two fp32 moments


def rank_memory(
    run: RunConfig, sizes: dict, chunks: list[list[Params]], acts: list[float], rank: int
) -> dict:
    """Per-GPU memory of pipeline rank `rank` (its chunks: rank, rank + P, ...)."""
    tp, ep_etp = sizes["tp"], sizes["ep"] * sizes["etp"]
    mine = range(rank, len(chunks), sizes["pp"])
    split = {"replicated": 0, "tensor": 0, "expert": 0}
    weights = optimizer = 0.0
    for c in mine:
        for p in chunks[c]:
            share = p.count / {"replicated": 1, "tensor": tp, "expert": ep_etp}[p.sharding]
            split[p.sharding] += share
            weights += share
            states = optimizer_bytes_per_param(run, p) * share
            if run.use_distributed_optimizer:
                states /= sizes["edp"] if p.sharding == "expert" else sizes["dp"]
            optimizer += states
    mean_chunk = sum(acts[c] for c in mine) / len(mine)
    flying = in_flight(sizes, rank)
    out = dict(
        pipeline_rank=rank,
        chunks=list(mine),
        params=weights,
        params_by_sharding=split,
        weights_bytes=weights * (2 if run.bf16 else 4),
        grads_bytes=weights * 4,
        optimizer_bytes=optimizer,
        microbatches_in_flight=flying,
        activations_bytes=flying * mean_chunk,
    )
    parts = ("weights_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes")
    out["total_bytes"] = sum(out[k] for k in parts)
    return out


def model_size(run: RunConfig, gpus: int | None = None) -> dict:
    """Everything the command prints, as one JSON-ready dict."""
    config = make_transformer_config(run)
    vocab = padded_vocab_size(run, run.tokenizer_vocab_size)
    pattern = pipeline_pattern(config, layer_pattern(run))
    check_pattern(config, pattern)  # what build_model refuses (e.g. a cut inside a depth block)
    schedule = config.depth_block_schedule()
    sizes = parallel_sizes(run, config, gpus)
    counts = parameter_counts(run, pattern, vocab)
    segments, firsts = pattern.split("|"), chunk_first_layers(pattern)
    last = len(segments) - 1
    chunks = [chunk_params(run, seg, vocab, c == 0, c == last) for c, seg in enumerate(segments)]
    acts = [
        chunk_activation_bytes(run, schedule, seg, firsts[c], c == last, vocab, sizes["tp"])
        for c, seg in enumerate(segments)
    ]
    ranks = [rank_memory(run, sizes, chunks, acts, r) for r in range(sizes["pp"])]
    flops = flops_per_token(run, vocab, pattern, schedule.read_source_counts())
    return dict(
        pattern=pattern,
        vocab_size=vocab,
        parameters=dict(
            **counts,
            convention=CONVENTION,
        ),
        training_flops_per_token=flops,
        parallelism=sizes,
        memory_per_gpu=ranks,
        max_memory_per_gpu_bytes=max(r["total_bytes"] for r in ranks),
    )


def _short(count: int) -> str:
    """49122928512 -> '49.12B', 754168 -> '0.75M'."""
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.2f}M"


def format_report(report: dict) -> str:
    p, s = report["parameters"], report["parallelism"]
    lines = [
        f"pattern  {report['pattern']}   (vocab {report['vocab_size']:,})",
        "",
        f"{'parameters':16s} {'total':>16s} {'active':>16s}",
    ]
    for name, b in p["breakdown"].items():
        lines.append(f"  {LABELS[name]:14s} {b['total']:16,d} {b['active']:16,d}")
    lines += [
        f"  {'all':14s} {p['total']:16,d} {p['active']:16,d}   "
        f"({_short(p['total'])} total, {_short(p['active'])} active)",
        *("  " + line for line in textwrap.wrap(f"({p['convention']})", 96)),
        "",
        f"training FLOPs per token  {report['training_flops_per_token']:.4g}",
        "",
        f"{s['gpus']} GPUs = TP {s['tp']} x PP {s['pp']} x DP {s['dp']} (virtual stages "
        f"{s['vp']}); experts EP {s['ep']} x ETP {s['etp']} x expert-DP {s['edp']}; "
        f"{s['microbatches']} micro-batches of {s['micro_batch_size']} per step",
        "",
        MEMORY_HEADER,
    ]
    for r in report["memory_per_gpu"]:
        gb = [
            r[k] / GB
            for k in (
                "weights_bytes",
                "grads_bytes",
                "optimizer_bytes",
                "activations_bytes",
                "total_bytes",
            )
        ]
        lines.append(
            f"  stage {r['pipeline_rank']:<7d} {r['params'] / 1e9:9.3f}  {gb[0]:7.1f}  "
            f"{gb[1]:5.1f}  {gb[2]:9.1f}  {gb[3]:11.1f}  "
            f"{r['microbatches_in_flight']:9d}  {gb[4]:5.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="attnres-model-size",
        description="Parameters, training FLOPs per token and per-GPU memory of a run config.",
        epilog="Any config key can be overridden as for attnres-train: --num-layers 8.",
    )
    parser.add_argument("--config", help="YAML run config (default: all defaults)")
    parser.add_argument("--gpus", type=int, help="ranks (default: the smallest the plan fits)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        report = model_size(load_run_config(args.config, parse_overrides(rest)), args.gpus)
    except (ValueError, FileNotFoundError) as err:
        print(f"attnres-model-size: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
