"""Megatron checkpoint keys <-> Hugging Face weight names, one row per Megatron tensor.

Megatron's dist checkpoints store every tensor under its global name and global shape, whatever
the TP/PP/EP layout it was saved with (pipeline stages use global layer numbers; experts are
stacked on a leading axis of all E experts; `linear_fc1` is [gate; up]; `linear_qkv` is grouped
per query group). So one table serves every layout. Transforms only move data (views, slices,
concatenation): a round trip in either direction is bitwise.

Sublayer j of the Megatron stack is HF layer j // 2: its mixer for even j, its MLP/MoE for odd j.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from megatron_attnres.conversion.hf.configuration_attnres import AttnResConfig
from megatron_attnres.mcore.weight_layout import fuse_qkv

Tensors = Sequence[torch.Tensor]


@dataclass(frozen=True)
class Row:
    megatron: str
    hf: tuple[str, ...]
    to_hf: Callable[[torch.Tensor], Tensors]
    to_megatron: Callable[[Tensors], torch.Tensor]


def _same(megatron: str, hf: str) -> Row:
    return Row(megatron, (hf,), lambda t: (t,), lambda ts: ts[0])


def _swiglu(megatron: str, hf_gate: str, hf_up: str) -> Row:
    """linear_fc1 = [gate; up] (halves are contiguous views)."""
    return Row(megatron, (hf_gate, hf_up), lambda t: t.chunk(2), lambda ts: torch.cat(ts))


def _qkv(megatron: str, prefix: str, cfg: AttnResConfig) -> Row:
    heads, groups, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    per_group = heads // groups

    def split(t):
        grouped = t.view(groups, (per_group + 2) * d, t.shape[-1])
        q, k, v = grouped.split([per_group * d, d, d], dim=1)
        return tuple(x.reshape(-1, t.shape[-1]) for x in (q, k, v))

    names = tuple(prefix + n for n in ("q_proj.weight", "k_proj.weight", "v_proj.weight"))
    return Row(megatron, names, split, lambda ts: fuse_qkv(*ts, heads, groups))


def _experts(megatron: str, hf_names: list[str], halves: int) -> Row:
    """[E, ...] stacked experts; `halves` = 2 splits each expert's [gate; up]."""

    def split(t):
        return tuple(part for expert in t for part in expert.chunk(halves))

    def merge(ts):
        return torch.stack([torch.cat(ts[e : e + halves]) for e in range(0, len(ts), halves)])

    return Row(megatron, tuple(hf_names), split, merge)


def _pseudo_query(megatron: str, hf: str) -> Row:
    """Megatron's pseudo-query [h] is the Linear(h, 1) weight [1, h] of the Kimi K3 names."""
    return Row(megatron, (hf,), lambda t: (t.view(1, -1),), lambda ts: ts[0].reshape(-1))


KDA_SAME = tuple(f"{n}_proj.weight" for n in ("q", "k", "v", "f_a", "f_b", "b", "g_a", "g_b"))
KDA_SAME += (
    "q_conv1d.weight",
    "k_conv1d.weight",
    "v_conv1d.weight",
    "dt_bias",
    "o_norm.weight",
    "o_proj.weight",
)


def _kda_rows(m: str, a: str) -> list[Row]:
    """KDA keeps Kimi Linear's names on both sides; only A_log's layout differs: Megatron [H],
    the released checkpoint (and transformers' kimi_linear) [1, 1, H, 1]."""
    a_log = Row(
        m + "A_log", (a + "A_log",), lambda t: (t.view(1, 1, -1, 1),), lambda ts: ts[0].reshape(-1)
    )
    return [_same(m + name, a + name) for name in KDA_SAME] + [a_log]


def _mixer_rows(j: int, layer: str, cfg: AttnResConfig, mixer: str) -> list[Row]:
    m, a = f"decoder.layers.{j}.self_attention.", f"{layer}self_attn."
    rows = [_same(f"decoder.layers.{j}.input_layernorm.weight", f"{layer}input_layernorm.weight")]
    if mixer == "kda":
        return rows + _kda_rows(m, a)
    if mixer == "full_attention":
        rows.append(_qkv(m + "linear_qkv.weight", a, cfg))
    else:
        if cfg.q_lora_rank is None:
            rows.append(_same(m + "linear_q_proj.weight", a + "q_proj.weight"))
        else:
            rows += [
                _same(m + "linear_q_down_proj.weight", a + "q_a_proj.weight"),
                _same(m + "q_layernorm.weight", a + "q_a_layernorm.weight"),
                _same(m + "linear_q_up_proj.weight", a + "q_b_proj.weight"),
            ]
        rows += [
            _same(m + "linear_kv_down_proj.weight", a + "kv_a_proj_with_mqa.weight"),
            _same(m + "kv_layernorm.weight", a + "kv_a_layernorm.weight"),
            _same(m + "linear_kv_up_proj.weight", a + "kv_b_proj.weight"),
        ]
    rows.append(_same(m + "linear_proj.weight", a + "o_proj.weight"))
    return rows


def _ffn_rows(j: int, layer: str, cfg: AttnResConfig, moe: bool) -> list[Row]:
    m = f"decoder.layers.{j}.mlp."
    rows = [
        _same(
            f"decoder.layers.{j}.pre_mlp_layernorm.weight",
            f"{layer}post_attention_layernorm.weight",
        )
    ]
    if not moe:
        mlp = f"{layer}mlp."
        return rows + [
            _swiglu(m + "linear_fc1.weight", mlp + "gate_proj.weight", mlp + "up_proj.weight"),
            _same(m + "linear_fc2.weight", mlp + "down_proj.weight"),
        ]
    moe_prefix, experts = f"{layer}block_sparse_moe.", range(cfg.num_experts)
    rows.append(_same(m + "router.weight", moe_prefix + "gate.weight"))
    if cfg.use_expert_bias:
        rows.append(_same(m + "router.expert_bias", moe_prefix + "gate.e_score_correction_bias"))
    w = [f"{moe_prefix}experts.{e}.{n}.weight" for e in experts for n in ("w1", "w3")]
    rows.append(_experts(m + "experts.experts.linear_fc1.weight", w, halves=2))
    w2 = [f"{moe_prefix}experts.{e}.w2.weight" for e in experts]
    rows.append(_experts(m + "experts.experts.linear_fc2.weight", w2, halves=1))
    if cfg.num_shared_experts:
        s = f"{moe_prefix}shared_experts."
        rows += [
            _swiglu(
                m + "shared_experts.linear_fc1.weight", s + "gate_proj.weight", s + "up_proj.weight"
            ),
            _same(m + "shared_experts.linear_fc2.weight", s + "down_proj.weight"),
        ]
    return rows


def _depth_read_rows(j: int, layer: str) -> list[Row]:
    kind = "self_attention" if j % 2 == 0 else "mlp"
    return [
        _pseudo_query(f"decoder.depth_reads.{j}.pseudo_query", f"{layer}{kind}_res_proj.weight"),
        _same(f"decoder.depth_reads.{j}.key_norm_weight", f"{layer}{kind}_res_norm.weight"),
    ]


def key_table(cfg: AttnResConfig) -> list[Row]:
    """Every tensor of the model, in the HF checkpoint's order (embedding, layers, head)."""
    attnres = cfg.attn_res_mode != "none"
    rows = [_same("embedding.word_embeddings.weight", "model.embed_tokens.weight")]
    for i in range(cfg.num_hidden_layers):
        layer = f"model.layers.{i}."
        rows += _mixer_rows(2 * i, layer, cfg, cfg.mixer_types[i])
        rows += _ffn_rows(2 * i + 1, layer, cfg, cfg.is_moe_layer(i))
        if attnres:
            rows += _depth_read_rows(2 * i, layer) + _depth_read_rows(2 * i + 1, layer)
    if attnres:
        rows += [
            _pseudo_query("decoder.output_read.pseudo_query", "model.output_attn_res_proj.weight"),
            _same("decoder.output_read.key_norm_weight", "model.output_attn_res_norm.weight"),
        ]
    rows.append(_same("decoder.final_norm.weight", "model.norm.weight"))
    if not cfg.tie_word_embeddings:
        rows.append(_same("output_layer.weight", "lm_head.weight"))
    return rows
