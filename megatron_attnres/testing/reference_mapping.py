"""Weights of the eager reference model <-> the Megatron HybridModel (single rank, unsharded).

Sublayer j of the reference is HybridModel layer j (layer_number j + 1). Layout differences:
- attention: Megatron fuses q/k/v in `linear_qkv`, grouped per query group g:
  [q heads of g (heads/groups * d rows), k_g (d rows), v_g (d rows)] for g = 0..groups-1;
- SwiGLU: Megatron stacks [gate; up] in `linear_fc1` (experts, shared expert and dense MLP);
- the reference's pre-norm `sublayers.j.norm` is Megatron's `input_layernorm` (mixers) or
  `pre_mlp_layernorm` (MLP/MoE).
"""

import torch

from megatron_attnres.attnres.reference import ReferenceConfig
from megatron_attnres.mcore.config import ARCHITECTURE, UNFUSED_KERNELS, AttnResTransformerConfig
from megatron_attnres.mcore.model import hybrid_pattern
from megatron_attnres.mcore.weight_layout import fuse_qkv


def _swiglu(ref, src: str, dst: str, out: dict) -> None:
    out[dst + "linear_fc1.weight"] = torch.cat([ref[src + "gate.weight"], ref[src + "up.weight"]])
    out[dst + "linear_fc2.weight"] = ref[src + "down.weight"]


def reference_to_megatron(ref: dict, cfg: ReferenceConfig) -> dict:
    """Map a reference state dict (or a dict of its gradients) to HybridModel names."""
    groups = cfg.num_query_groups or cfg.num_attention_heads
    out = {
        "embedding.word_embeddings.weight": ref["embedding.weight"],
        "decoder.final_norm.weight": ref["final_norm.weight"],
    }
    if "output_layer.weight" in ref:
        out["output_layer.weight"] = ref["output_layer.weight"]
    for j in range(2 * cfg.num_layers):
        src, dst = f"sublayers.{j}.", f"decoder.layers.{j}."
        if j % 2 == 0:
            out[dst + "input_layernorm.weight"] = ref[src + "norm.weight"]
            out[dst + "self_attention.linear_qkv.weight"] = fuse_qkv(
                ref[src + "fn.wq.weight"],
                ref[src + "fn.wk.weight"],
                ref[src + "fn.wv.weight"],
                cfg.num_attention_heads,
                groups,
            )
            out[dst + "self_attention.linear_proj.weight"] = ref[src + "fn.wo.weight"]
        else:
            out[dst + "pre_mlp_layernorm.weight"] = ref[src + "norm.weight"]
            if src + "fn.router.weight" not in ref:
                _swiglu(ref, src + "fn.", dst + "mlp.", out)
                continue
            out[dst + "mlp.router.weight"] = ref[src + "fn.router.weight"]
            if src + "fn.expert_bias" in ref and cfg.moe_router_enable_expert_bias:
                out[dst + "mlp.router.expert_bias"] = ref[src + "fn.expert_bias"]
            for e in range(cfg.num_experts):
                _swiglu(ref, f"{src}fn.experts.{e}.", f"{dst}mlp.experts.local_experts.{e}.", out)
            if cfg.moe_shared_expert_intermediate_size:
                _swiglu(ref, src + "fn.shared_expert.", dst + "mlp.shared_experts.", out)
    for key, value in ref.items():
        if key.startswith(("depth_reads.", "output_read.")):
            out["decoder." + key] = value
    return out


def megatron_config(cfg: ReferenceConfig, **overrides) -> AttnResTransformerConfig:
    """The AttnResTransformerConfig computing the same function as `cfg` (fp32, CPU-safe flags)."""
    mode = cfg.residual_mode
    fields = dict(
        num_layers=2 * cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_moe_experts=cfg.num_experts or None,
        moe_router_topk=cfg.moe_router_topk,
        moe_ffn_hidden_size=cfg.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=cfg.moe_shared_expert_intermediate_size or None,
        moe_router_score_function=cfg.moe_router_score_function,
        moe_router_pre_softmax=cfg.moe_router_pre_softmax,
        moe_router_enable_expert_bias=cfg.moe_router_enable_expert_bias,
        moe_router_topk_scaling_factor=cfg.moe_router_topk_scaling_factor,
        moe_aux_loss_coeff=cfg.moe_aux_loss_coeff,
        moe_token_dispatcher_type="allgather",
        layernorm_epsilon=cfg.norm_eps,
        init_method_std=cfg.init_std,
        use_cpu_initialization=True,
        **ARCHITECTURE,
        **UNFUSED_KERNELS,
        enable_attention_residuals=mode != "none",
        attn_res_mode="full" if mode == "full" else "block",
        attn_res_block_layers=cfg.layers_per_block,
    )
    fields.update(overrides)
    return AttnResTransformerConfig(**fields)


def reference_pattern(cfg: ReferenceConfig) -> str:
    return hybrid_pattern(cfg.num_layers, moe=cfg.num_experts > 0, first_k_dense=cfg.first_k_dense)
