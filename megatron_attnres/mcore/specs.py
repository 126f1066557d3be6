"""Layer and stack specs for HybridModel with AttnRes (docs/architecture.md section 4).

Every pattern symbol is one AttnRes sublayer ('*' attention, '+' MLA, 'G' Kimi Delta Attention,
'-' dense MLP, 'E' MoE). A layer returns its *raw* output y = f(pre_norm(x))
because its bias-dropout-add is swapped for `raw_output_bda`, which adds no residual; the stack
subclass (`AttnResHybridStack`) then forms every layer's input with a depth read.

Two variants:
- local (no TransformerEngine): Megatron-Core's local linears and MoE (SequentialMLP experts),
  plus the pieces megatron-core lacks without TE: `SDPACoreAttention` (the local
  DotProductAttention needs an explicit CUDA mask and rejects MLA's k/v channel arguments) and
  `LocalRMSNorm` (torch RMSNorm that allows sequence parallelism). Used on CPU and on GPUs without
  TE alike.
- TransformerEngine: Megatron-Core's own `hybrid_stack_spec` with the bias-dropout-adds swapped
  and our stack class; built only where TE is installed.
"""

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_submodules
from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import (
    MoETransformerLayer,
    TransformerLayer,
    TransformerLayerSubmodules,
)

from megatron_attnres.mcore.kda import KimiDeltaAttention
from megatron_attnres.mcore.mla import AttnResMLASelfAttention
from megatron_attnres.mcore.stack import AttnResHybridStack


def raw_output_bda(training: bool, fused: bool):
    """A bias-dropout-add without the add: returns dropout(x + bias), the sublayer's raw output."""

    def bias_dropout(x_with_bias, residual, prob):
        x, bias = x_with_bias
        if bias is not None:
            x = x + bias
        return F.dropout(x, p=prob, training=training)

    return bias_dropout


class LocalRMSNorm(torch.nn.Module):
    """RMSNorm with Megatron's norm constructor signature; allows sequence parallelism.

    Under sequence parallelism each rank normalises its own tokens, so the weight's gradient is a
    partial sum: the `sequence_parallel` attribute makes Megatron's finalize_model_grads all-reduce
    it over the tensor-parallel group, as it does for TransformerEngine's norms.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class SDPACoreAttention(MegatronModule):
    """Causal core attention through torch's scaled_dot_product_attention.

    Takes Megatron's core-attention arguments (including MLA's k_channels / v_channels); inputs
    q [sq, b, np, hk], k [sk, b, ng, hk], v [sk, b, ng, hv]; returns [sq, b, np * hv].
    """

    def __init__(
        self,
        config,
        layer_number,
        attn_mask_type,
        attention_type,
        attention_dropout=None,
        softmax_scale=None,
        k_channels=None,
        v_channels=None,
        cp_comm_type=None,
        pg_collection=None,
        **unused,
    ):
        super().__init__(config=config)
        self.softmax_scale = softmax_scale
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query,
        key,
        value,
        attention_mask=None,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
        **unused,
    ):
        if packed_seq_params is not None:
            raise NotImplementedError("SDPACoreAttention does not support packed sequences")
        heads, groups = query.shape[2], key.shape[2]
        if heads != groups:  # grouped-query attention: head h reads KV group h // (heads/groups)
            key = key.repeat_interleave(heads // groups, dim=2)
            value = value.repeat_interleave(heads // groups, dim=2)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            is_causal=True,
            scale=self.softmax_scale,
            dropout_p=self.dropout if self.training else 0.0,
        )
        out = out.permute(2, 0, 1, 3)
        return out.reshape(out.shape[0], out.shape[1], -1)


def _local_attention(bda, multi_latent: bool) -> ModuleSpec:
    sub = get_gpt_layer_local_submodules(multi_latent_attention=multi_latent)
    attention = sub.self_attention
    replacements = dict(core_attention=SDPACoreAttention)
    if multi_latent:
        # Latent norms are used when config.qk_layernorm is set (AttnResMLASelfAttention).
        replacements.update(kv_layernorm=LocalRMSNorm, q_layernorm=LocalRMSNorm)
        attention = dataclasses.replace(attention, module=AttnResMLASelfAttention)
    attention = dataclasses.replace(
        attention, submodules=dataclasses.replace(attention.submodules, **replacements)
    )
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=LocalRMSNorm, self_attention=attention, self_attn_bda=bda
        ),
    )


def kda_layer(bda) -> ModuleSpec:
    """The 'G' sublayer: pre-norm + Kimi Delta Attention (its linears are Megatron's local
    tensor-parallel ones, so the same spec serves the local and the TransformerEngine stacks)."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=LocalRMSNorm,
            self_attention=ModuleSpec(module=KimiDeltaAttention),
            self_attn_bda=bda,
        ),
    )


def local_stack_submodules(config, residual: bool) -> HybridStackSubmodules:
    """Local layer specs for '*' attention, '+' MLA, 'G' KDA, '-' dense MLP and 'E' MoE.

    residual=False gives AttnRes's raw-output layers; residual=True gives the same layers with
    Megatron's own bias-dropout-add (the stock model used as an oracle).
    """
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

    bda = get_bias_dropout_add if residual else raw_output_bda
    dense = get_gpt_layer_local_submodules()
    layers = dict(
        attention_layer=_local_attention(bda, multi_latent=False),
        mla_layer=_local_attention(bda, multi_latent=True),
        gdn_layer=kda_layer(bda),
        mlp_layer=ModuleSpec(
            module=MLPLayer,
            submodules=TransformerLayerSubmodules(
                pre_mlp_layernorm=LocalRMSNorm, mlp=dense.mlp, mlp_bda=bda
            ),
        ),
    )
    if config.num_moe_experts:
        moe = get_gpt_layer_local_submodules(num_experts=config.num_moe_experts)
        layers["moe_layer"] = ModuleSpec(
            module=MoETransformerLayer,
            submodules=TransformerLayerSubmodules(
                pre_mlp_layernorm=LocalRMSNorm, mlp=moe.mlp, mlp_bda=bda
            ),
        )
    return HybridStackSubmodules(**layers)


def attnres_local_stack_spec(config) -> ModuleSpec:
    """HybridModel stack spec: our stack over raw-output local layers (any residual mode)."""
    return ModuleSpec(
        module=AttnResHybridStack,
        params={"final_norm_module": LocalRMSNorm},
        submodules=local_stack_submodules(config, residual=False),
    )


def stock_local_stack_spec(config) -> ModuleSpec:
    """Megatron's unmodified HybridStack over the same local layers with residual adds.

    HybridStack hard-codes TransformerEngine's norm as its final norm; without TE the caller
    must provide one (tests patch `megatron.core.models.hybrid.hybrid_block.TENorm`).
    """
    return ModuleSpec(module=HybridStack, submodules=local_stack_submodules(config, residual=True))


def _te_mla(layer_submodules) -> ModuleSpec:
    from megatron.core.extensions.transformer_engine import TENorm

    attention = layer_submodules.self_attention
    norms = dataclasses.replace(attention.submodules, kv_layernorm=TENorm, q_layernorm=TENorm)
    return dataclasses.replace(attention, module=AttnResMLASelfAttention, submodules=norms)


def attnres_te_stack_spec() -> ModuleSpec:
    """Megatron-Core's TransformerEngine hybrid spec with raw-output layers and our stack."""
    from megatron.core.extensions.transformer_engine import TENorm
    from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec
    from megatron.core.transformer.identity_op import IdentityFuncOp

    layers = {}
    for field in ("attention_layer", "mla_layer", "mlp_layer", "moe_layer"):
        layer = getattr(hybrid_stack_spec.submodules, field)
        # Swap the bias-dropout-add of the half each layer uses (the other half is an identity).
        swaps = {
            name: raw_output_bda
            for name in ("self_attn_bda", "mlp_bda")
            if getattr(layer.submodules, name) is not IdentityFuncOp
        }
        submodules = dataclasses.replace(layer.submodules, **swaps)
        if field == "mla_layer":
            submodules = dataclasses.replace(submodules, self_attention=_te_mla(submodules))
        layers[field] = dataclasses.replace(layer, submodules=submodules)
    # 'G' is Kimi Delta Attention (not megatron-core's GatedDeltaNet), with TE's norm in front.
    kda = kda_layer(raw_output_bda)
    layers["gdn_layer"] = dataclasses.replace(
        kda, submodules=dataclasses.replace(kda.submodules, input_layernorm=TENorm)
    )
    spec = dataclasses.replace(hybrid_stack_spec.submodules, mtp_block_spec=None, **layers)
    return ModuleSpec(
        module=AttnResHybridStack,
        params={"final_norm_module": TENorm},
        submodules=spec,
    )
