"""FLOPs per token of a run's model, counted from its config (TFLOP/s, MFU, benchmarks, sizes).

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
"""

import math

from megatron_attnres.config.run import RunConfig


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
