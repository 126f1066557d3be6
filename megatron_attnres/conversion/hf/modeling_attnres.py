"""Hugging Face modeling code for Kimi-Linear-shaped MoE decoders with Attention Residuals.

Self-contained (torch, transformers, the standard library and the sibling configuration file):
exported checkpoint folders ship it and load it with trust_remote_code=True.

Each layer is two sublayers, a mixer (grouped-query attention with RoPE, MLA, or KDA from
modeling_kda.py, which needs `pip install fla-core`) and an MLP/MoE,
each y = f(pre_norm(x)). attn_res_mode "none" adds y to the residual stream; "full" and "block"
form every sublayer's input by a depth read (softmax over depth) instead, per token:
    k_i = RMSNorm_g(v_i),  s_i = w . k_i (no 1/sqrt(h)),  a = softmax_i(s),  x = sum_i a_i v_i
in fp32 over the completed depth-block summaries (b_0 = the embedding) and the current block's
partial summary; an output read with its own (w, g) precedes the final norm. Since
s_i = rsqrt(mean(v_i^2) + eps) * (v_i . q) with q = w * g, a read needs only its query q.

Shape legend: N depth sources, R reads, T tokens (batch and sequence flattened), H hidden.
"""

from functools import partial as bind
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_attnres import AttnResConfig
from .depth_read_triton import (
    depth_read_phase1_triton,
    depth_read_phase2_triton,
    triton_depth_read_available,
)
from .modeling_kda import AttnResCache, KimiDeltaAttention, init_kda

try:  # transformers >= 5: init functions that leave weights loaded from a checkpoint alone
    from transformers import initialization as init
except ImportError:  # pragma: no cover - transformers 4.x
    from torch.nn import init


# ----------------------------------------------------------------------------- depth reads
def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Depth reads compute in fp32 (float64 stays float64, for exactness checks)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def depth_query(proj: nn.Linear, norm: nn.Module) -> torch.Tensor:
    """q = w * g (w: the pseudo-query Linear(h, 1), g: the key-norm gain), upcast."""
    return _upcast(proj.weight[0]) * _upcast(norm.weight)


def _scores(values_NTH: torch.Tensor, queries_RH: torch.Tensor, eps: float) -> torch.Tensor:
    """s[n, t, r] = rsqrt(mean(v^2) + eps) * (v . q_r): read r's score of source n."""
    inv_rms_NT1 = torch.rsqrt(values_NTH.pow(2).mean(-1, keepdim=True) + eps)
    return inv_rms_NT1 * (values_NTH @ queries_RH.T)


def depth_read(sources: list[torch.Tensor], query_H: torch.Tensor, eps: float) -> torch.Tensor:
    """One-shot read over all sources (upcast, cast back). One source is the identity."""
    if len(sources) == 1:
        return sources[0]
    values_NTH = _upcast(torch.stack(sources).flatten(1, -2))
    alpha_NT1 = torch.softmax(_scores(values_NTH, query_H[None], eps), dim=0)
    out_TH = (alpha_NT1 * values_NTH).sum(0)
    return out_TH.view(sources[0].shape).to(sources[0].dtype)


class DepthReadStats(NamedTuple):
    """Online-softmax state of R reads over the completed summaries: running max m, denominator
    l = sum exp(s - m), unnormalised weighted sum o = sum exp(s - m) v."""

    max_TR: torch.Tensor
    denom_TR: torch.Tensor
    acc_TRH: torch.Tensor


def depth_read_phase1(completed, queries_RH: torch.Tensor, eps: float) -> DepthReadStats:
    """Phase 1 (docs/architecture.md section 6): the R reads of one depth block over its
    completed summaries, as one batched attention (pseudo-queries do not depend on the input).
    On CUDA with triton: the fused kernel of depth_read_triton.py (ATTNRES_DEPTH_READ=torch keeps
    this code)."""
    if triton_depth_read_available(completed[0]):
        return DepthReadStats(*depth_read_phase1_triton(completed, queries_RH, eps))
    values_NTH = _upcast(torch.stack(completed).flatten(1, -2))
    scores_NTR = _scores(values_NTH, queries_RH, eps)
    max_TR = scores_NTR.amax(0)
    weights_NTR = torch.exp(scores_NTR - max_TR)
    acc_TRH = torch.einsum("ntr,nth->trh", weights_NTR, values_NTH)
    return DepthReadStats(max_TR, weights_NTR.sum(0), acc_TRH)


def depth_read_phase2(stats: DepthReadStats, read: int, partial, query_H, eps: float, like):
    """Phase 2: read `read` merges the partial summary (None at a block's first sublayer) into
    its phase-1 statistics with an online-softmax update; exact. Output shaped like `like`."""
    max_T, denom_T = stats.max_TR[:, read], stats.denom_TR[:, read]
    acc_TH = stats.acc_TRH[:, read]
    if triton_depth_read_available(like):
        return depth_read_phase2_triton(max_T, denom_T, acc_TH, partial, query_H, eps, like)
    if partial is not None:
        p_TH = _upcast(partial.flatten(0, -2))
        score_T = _scores(p_TH[None], query_H[None], eps)[0, :, 0]
        new_max_T = torch.maximum(max_T, score_T)
        rescale_T, p_weight_T = torch.exp(max_T - new_max_T), torch.exp(score_T - new_max_T)
        acc_TH = acc_TH * rescale_T[:, None] + p_weight_T[:, None] * p_TH
        denom_T = denom_T * rescale_T + p_weight_T
    return (acc_TH / denom_T[:, None]).view(like.shape).to(like.dtype)


# ----------------------------------------------------------------------------- building blocks
class AttnResRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = _upcast(x)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class AttnResPseudoQuery(nn.Linear):
    """The pseudo-query w of one depth read as Linear(h, 1) (Kimi's `*_res_proj`); zero-init."""

    def __init__(self, hidden_size: int):
        super().__init__(hidden_size, 1, bias=False)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, position_ids: torch.Tensor, base: float) -> torch.Tensor:
    """Rotate-half RoPE as Megatron applies it. x [b, heads, s, d], position_ids [b, s]."""
    d = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d))
    freqs = position_ids.float()[..., None] * inv_freq  # [b, s, d/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return x * emb.cos().to(x.dtype) + rotate_half(x) * emb.sin().to(x.dtype)


def _attention(q, k, v, attn_bias, scale=None):
    """Causal SDPA; `attn_bias` None means a plain causal prefill."""
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_bias, is_causal=attn_bias is None, scale=scale
    )


class AttnResAttention(nn.Module):
    """Grouped-query causal self-attention with RoPE, no biases (our '*')."""

    def __init__(self, config: AttnResConfig, layer_idx: int):
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.layer_idx, self.head_dim, self.rope_theta = layer_idx, d, config.rope_theta
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.q_proj = nn.Linear(h, self.heads * d, bias=False)
        self.k_proj = nn.Linear(h, self.kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, self.kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.heads * d, h, bias=False)

    def forward(self, x, position_ids, attn_bias, cache):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = (
            apply_rope(q, position_ids, self.rope_theta),
            apply_rope(k, position_ids, self.rope_theta),
        )
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        rep = self.heads // self.kv_heads
        out = _attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_bias)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class AttnResMLA(nn.Module):
    """Multi-latent attention (our '+'), Kimi Linear / DeepSeek-V3 weight names. RoPE (unless
    mla_use_nope) on the qk_rope_head_dim channels as Megatron's MLA applies it: de-interleave,
    then rotate-half. The cache holds the normalised KV latent and the shared rotary key."""

    def __init__(self, config: AttnResConfig, layer_idx: int):
        super().__init__()
        c, h = config, config.hidden_size
        self.layer_idx, self.heads, self.rope_theta = layer_idx, c.num_attention_heads, c.rope_theta
        self.nope, self.rope, self.v_dim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.kv_lora_rank, self.use_rope = c.kv_lora_rank, not c.mla_use_nope
        q_out = self.heads * (self.nope + self.rope)
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(h, q_out, bias=False)
        else:
            self.q_a_proj = nn.Linear(h, c.q_lora_rank, bias=False)
            self.q_a_layernorm = AttnResRMSNorm(c.q_lora_rank, c.mla_latent_norm_eps)
            self.q_b_proj = nn.Linear(c.q_lora_rank, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, c.kv_lora_rank + self.rope, bias=False)
        self.kv_a_layernorm = AttnResRMSNorm(c.kv_lora_rank, c.mla_latent_norm_eps)
        self.kv_b_proj = nn.Linear(
            c.kv_lora_rank, self.heads * (self.nope + self.v_dim), bias=False
        )
        self.o_proj = nn.Linear(self.heads * self.v_dim, h, bias=False)

    def _rope(self, x, position_ids):
        if not self.use_rope:
            return x
        x = torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)
        return apply_rope(x, position_ids, self.rope_theta)

    def forward(self, x, position_ids, attn_bias, cache):
        b, s, _ = x.shape
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rot = (
            q.view(b, s, self.heads, -1).transpose(1, 2).split([self.nope, self.rope], -1)
        )
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope], -1)
        latent = self.kv_a_layernorm(latent)[:, None]  # [b, 1, s, rank]
        k_rot = self._rope(k_rot[:, None], position_ids)
        if cache is not None:
            latent, k_rot = cache.update(latent, k_rot, self.layer_idx)
        kv = self.kv_b_proj(latent[:, 0]).view(b, -1, self.heads, self.nope + self.v_dim)
        k_nope, v = kv.transpose(1, 2).split([self.nope, self.v_dim], -1)
        q = torch.cat((q_nope, self._rope(q_rot, position_ids)), dim=-1)
        k = torch.cat((k_nope, k_rot.expand(-1, self.heads, -1, -1)), dim=-1)
        out = _attention(q, k, v, attn_bias, scale=(self.nope + self.rope) ** -0.5)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class AttnResMLP(nn.Module):
    """SwiGLU: down(silu(gate x) * up x)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class AttnResExpert(nn.Module):
    """A routed SwiGLU expert with Kimi's names: w1 = gate, w3 = up, w2 = down."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.w1 = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.w3 = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.w2 = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class AttnResRouter(nn.Module):
    """Top-k router (docs/architecture.md section 3b): fp32 logits; sigmoid or softmax scores;
    experts chosen on score + e_score_correction_bias, weighted by their scores (the bias never
    weights), renormalised over the k chosen (a single sigmoid score is kept as is, like
    Megatron), times routed_scaling_factor."""

    def __init__(self, config: AttnResConfig):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        if config.use_expert_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(config.num_experts))

    def forward(self, x_TH):
        cfg, k = self.config, self.config.num_experts_per_token
        logits_TE = F.linear(x_TH.float(), self.weight.float())
        softmax = cfg.moe_router_activation_func == "softmax"
        scores_TE = logits_TE.softmax(-1) if softmax else logits_TE.sigmoid()
        choice_TE = scores_TE + self.e_score_correction_bias if cfg.use_expert_bias else scores_TE
        idx_TK = choice_TE.topk(k, dim=-1).indices
        weights_TK = scores_TE.gather(1, idx_TK)
        if cfg.moe_renormalize and (k > 1 or softmax):
            weights_TK = weights_TK / (weights_TK.sum(-1, keepdim=True) + 1e-20)
        return idx_TK, weights_TK * cfg.routed_scaling_factor


class AttnResMoE(nn.Module):
    """Dropless MoE: routed SwiGLU experts plus a shared expert (num_shared_experts wide)."""

    def __init__(self, config: AttnResConfig):
        super().__init__()
        h, f = config.hidden_size, config.moe_intermediate_size
        self.gate = AttnResRouter(config)
        self.experts = nn.ModuleList(AttnResExpert(h, f) for _ in range(config.num_experts))
        shared = config.num_shared_experts * f
        self.shared_experts = AttnResMLP(h, shared) if shared else None

    def forward(self, x):
        x_TH = x.reshape(-1, x.shape[-1])
        idx_TK, weights_TK = self.gate(x_TH)
        out_TH = torch.zeros_like(x_TH)
        for e, expert in enumerate(self.experts):
            token, slot = (idx_TK == e).nonzero(as_tuple=True)
            if token.numel():
                y = expert(x_TH[token]) * weights_TK[token, slot, None].to(x.dtype)
                out_TH = out_TH.index_add(0, token, y)
        if self.shared_experts is not None:
            out_TH = out_TH + self.shared_experts(x_TH)
        return out_TH.view(x.shape)


class AttnResDecoderLayer(nn.Module):
    """One transformer layer = two sublayers, each y = f(pre_norm(x)) (its raw output)."""

    def __init__(self, config: AttnResConfig, layer_idx: int):
        super().__init__()
        h, eps, mixer = config.hidden_size, config.rms_norm_eps, config.mixer_types[layer_idx]
        attention = {"mla": AttnResMLA, "kda": KimiDeltaAttention}.get(mixer, AttnResAttention)
        self.is_kda = mixer == "kda"
        self.self_attn = attention(config, layer_idx)
        self.input_layernorm = AttnResRMSNorm(h, eps)
        self.post_attention_layernorm = AttnResRMSNorm(h, eps)
        if config.is_moe_layer(layer_idx):
            self.block_sparse_moe = AttnResMoE(config)
        else:
            self.mlp = AttnResMLP(h, config.intermediate_size)
        if config.attn_res_mode != "none":
            self.self_attention_res_proj = AttnResPseudoQuery(h)
            self.self_attention_res_norm = AttnResRMSNorm(h, eps)
            self.mlp_res_proj = AttnResPseudoQuery(h)
            self.mlp_res_norm = AttnResRMSNorm(h, eps)

    def mixer(self, x, position_ids, attn_bias, cache, token_mask=None):
        extra = {"token_mask": token_mask} if self.is_kda else {}  # KDA zeroes padded tokens
        return self.self_attn(self.input_layernorm(x), position_ids, attn_bias, cache, **extra)

    def ffn(self, x):
        ffn = self.block_sparse_moe if hasattr(self, "block_sparse_moe") else self.mlp
        return ffn(self.post_attention_layernorm(x))

    def forward(self, x, position_ids, attn_bias, cache, token_mask=None):
        """Standard residual (attn_res_mode 'none')."""
        x = x + self.mixer(x, position_ids, attn_bias, cache, token_mask)
        return x + self.ffn(x)

    def sublayers(self, position_ids, attn_bias, cache, token_mask=None):
        """(f, pseudo-query, key norm) of the mixer and the MLP/MoE sublayer, in order."""
        mixer = bind(
            self.mixer,
            position_ids=position_ids,
            attn_bias=attn_bias,
            cache=cache,
            token_mask=token_mask,
        )
        return [
            (mixer, self.self_attention_res_proj, self.self_attention_res_norm),
            (self.ffn, self.mlp_res_proj, self.mlp_res_norm),
        ]


# ----------------------------------------------------------------------------- models
class AttnResPreTrainedModel(PreTrainedModel):
    config_class = AttnResConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["AttnResDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, AttnResPseudoQuery):  # every read starts as an equal-weight mean
            init.zeros_(module.weight)
        elif isinstance(module, KimiDeltaAttention):
            init_kda(module, init)
        elif isinstance(module, nn.Linear | nn.Embedding | nn.Conv1d):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, AttnResRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, AttnResRouter):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.config.use_expert_bias:
                init.zeros_(module.e_score_correction_bias)


def _positions(attention_mask, q_len: int, past_len: int, device) -> torch.Tensor:
    """Position ids [b|1, q_len], offset by the cache; left padding does not count."""
    mask_2d = attention_mask is not None and attention_mask.dim() == 2
    if mask_2d and attention_mask.shape[1] == past_len + q_len:
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q_len:]
    return torch.arange(past_len, past_len + q_len, device=device)[None]


def _causal_bias(attention_mask, q_len: int, past_len: int, dtype, device):
    """Additive [b|1, 1, q, kv] mask: causal, offset by the cache, with 2-D padding masks; None
    for a plain causal prefill (SDPA's is_causal)."""
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask
    if past_len == 0 and (attention_mask is None or bool(attention_mask.all())):
        return None
    kv_len = past_len + q_len
    q_pos = torch.arange(past_len, kv_len, device=device)
    allowed = (torch.arange(kv_len, device=device)[None] <= q_pos[:, None])[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, -kv_len:].bool()
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


class AttnResModel(AttnResPreTrainedModel):
    def __init__(self, config: AttnResConfig):
        super().__init__(config)
        h = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, h)
        self.layers = nn.ModuleList(
            AttnResDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = AttnResRMSNorm(h, config.rms_norm_eps)
        if config.attn_res_mode != "none":
            self.output_attn_res_proj = AttnResPseudoQuery(h)
            self.output_attn_res_norm = AttnResRMSNorm(h, config.rms_norm_eps)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        attn_res_two_phase=None,
        **kwargs,
    ):
        """`attn_res_two_phase` overrides config.attn_res_two_phase for this call."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        embeds = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = AttnResCache()
        cache = past_key_values if use_cache else None
        past_len = cache.get_seq_length() if cache is not None else 0
        q_len = embeds.shape[1]
        if position_ids is None:
            position_ids = _positions(attention_mask, q_len, past_len, embeds.device)
        attn_bias = _causal_bias(attention_mask, q_len, past_len, embeds.dtype, embeds.device)
        padded = attention_mask is not None and attention_mask.dim() == 2
        token_mask = attention_mask[:, -q_len:] if padded else None
        if self.config.attn_res_mode == "none":
            hidden = embeds
            for layer in self.layers:
                hidden = layer(hidden, position_ids, attn_bias, cache, token_mask)
        else:
            two_phase = (
                self.config.attn_res_two_phase if attn_res_two_phase is None else attn_res_two_phase
            )
            sublayers = [
                s
                for layer in self.layers
                for s in layer.sublayers(position_ids, attn_bias, cache, token_mask)
            ]
            hidden = self._depth_attention(embeds, sublayers, two_phase)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden), past_key_values=cache)

    def _depth_attention(self, embeds, sublayers, two_phase: bool):
        """Full/Block AttnRes (docs/architecture.md section 3); a depth block starts at every
        S-th sublayer."""
        eps, S = self.config.rms_norm_eps, self.config.sublayers_per_block
        output_query = depth_query(self.output_attn_res_proj, self.output_attn_res_norm)
        completed, partial = [embeds], None  # summaries b_0..b_m, partial summary
        for start in range(0, len(sublayers), S):
            if partial is not None:
                completed, partial = completed + [partial], None
            block, last = sublayers[start : start + S], start + S >= len(sublayers)
            queries = [depth_query(proj, norm) for _, proj, norm in block]
            queries += [output_query] if last else []  # the output read joins the last block
            stats = depth_read_phase1(completed, torch.stack(queries), eps) if two_phase else None
            for i, (f, _, _) in enumerate(block):
                sources = completed if partial is None else completed + [partial]
                if len(sources) == 1:  # the first sublayer reads the embedding alone
                    x = sources[0]
                elif two_phase:
                    x = depth_read_phase2(stats, i, partial, queries[i], eps, like=embeds)
                else:
                    x = depth_read(sources, queries[i], eps)
                y = f(x)
                partial = y if partial is None else partial + y
        if two_phase:
            return depth_read_phase2(stats, len(block), partial, output_query, eps, like=embeds)
        return depth_read(completed + [partial], output_query, eps)


class AttnResForCausalLM(AttnResPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: AttnResConfig):
        super().__init__(config)
        self.model = AttnResModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """generate() gets an AttnResCache (KDA states beside the KV cache) unless given one."""
        wanted = generation_config.use_cache is not False and not getattr(
            generation_config, "cache_implementation", None
        )
        if wanted and model_kwargs.get("past_key_values") is None:
            model_kwargs["past_key_values"] = AttnResCache()
            return None
        return super()._prepare_cache_for_generation(
            generation_config, model_kwargs, *args, **kwargs
        )

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        attn_res_two_phase=None,
        return_dict=None,
        **kwargs,
    ):
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            attn_res_two_phase=attn_res_two_phase,
        )
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=logits.shape[-1])
        result = CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=out.past_key_values
        )
        return result if return_dict is not False else result.to_tuple()
