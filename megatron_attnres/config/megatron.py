"""A RunConfig in Megatron-Core's terms: the transformer config, the hybrid pattern, the padded
vocabulary and the parallel sizes derived from the run's fields. Builds no module."""

import math

import torch

from megatron_attnres.config.host import resolve_implementation
from megatron_attnres.config.run import RunConfig
from megatron_attnres.mcore.config import (
    ARCHITECTURE,
    UNFUSED_KERNELS,
    AttnResMLATransformerConfig,
    AttnResTransformerConfig,
)
from megatron_attnres.mcore.model import hybrid_pattern


def expert_tensor_parallel_size(run: RunConfig) -> int:
    """Tensor-parallel size inside the experts: 1 under expert parallelism (each EP rank holds
    whole experts), else the model's TP size (megatron-core's default). The one definition of
    this rule: the transformer config, the parallel state and the config checks all ask here."""
    return 1 if run.expert_model_parallel_size > 1 else run.tensor_model_parallel_size


def padded_vocab_size(run: RunConfig, tokenizer_vocab: int) -> int:
    """The model's vocabulary: `vocab_size` if set, else the tokenizer's padded up to a multiple
    of make_vocab_size_divisible_by x TP (as Megatron-LM pads)."""
    if run.vocab_size is not None:
        return run.vocab_size
    multiple = run.make_vocab_size_divisible_by * run.tensor_model_parallel_size
    return math.ceil(tokenizer_vocab / multiple) * multiple


def layer_pattern(run: RunConfig) -> str:
    if run.hybrid_layer_pattern:
        return run.hybrid_layer_pattern
    return hybrid_pattern(
        run.num_layers,
        moe=bool(run.num_experts),
        first_k_dense=run.moe_first_k_dense,
        mixer="+" if run.multi_latent_attention else "*",
    )


def transformer_config(run: RunConfig) -> AttnResTransformerConfig:
    """The AttnResTransformerConfig of the run. Local (non-TransformerEngine) modules: every
    fused-kernel switch that needs TE/apex is off."""
    run = resolve_implementation(run)  # a RunConfig built directly may leave them null
    pattern = layer_pattern(run).replace("|", "")
    on_gpu = torch.cuda.is_available()
    fields = dict(
        num_layers=len(pattern),
        hidden_size=run.hidden_size,
        ffn_hidden_size=run.ffn_hidden_size,
        num_attention_heads=run.num_attention_heads,
        num_query_groups=run.num_query_groups,
        kv_channels=run.kv_channels,
        num_moe_experts=run.num_experts or None,
        moe_router_topk=run.moe_router_topk,
        # megatron.core refuses an expert size without experts (a dense model)
        moe_ffn_hidden_size=(run.moe_ffn_hidden_size or run.ffn_hidden_size)
        if run.num_experts
        else None,
        moe_shared_expert_intermediate_size=run.moe_shared_expert_intermediate_size,
        moe_router_score_function=run.moe_router_score_function,
        moe_router_enable_expert_bias=run.moe_router_enable_expert_bias,
        moe_router_bias_update_rate=run.moe_router_bias_update_rate,
        moe_router_topk_scaling_factor=run.moe_router_topk_scaling_factor,
        moe_aux_loss_coeff=run.moe_aux_loss_coeff,
        moe_token_dispatcher_type=run.moe_token_dispatcher_type,
        moe_router_dtype=run.moe_router_dtype,
        moe_grouped_gemm=run.moe_grouped_gemm,
        layernorm_epsilon=run.norm_epsilon,
        init_method_std=run.init_method_std,
        use_cpu_initialization=not on_gpu,
        bf16=run.bf16,
        params_dtype=torch.bfloat16 if run.bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if run.bf16 else torch.float32,
        tensor_model_parallel_size=run.tensor_model_parallel_size,
        pipeline_model_parallel_size=run.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=run.virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=run.expert_model_parallel_size,
        expert_tensor_parallel_size=expert_tensor_parallel_size(run),
        sequence_parallel=run.sequence_parallel,
        batch_p2p_comm=run.batch_p2p_comm,  # refused where wrong (check_host_support)
        **ARCHITECTURE,
        **UNFUSED_KERNELS,
        enable_attention_residuals=run.enable_attention_residuals,
        attn_res_mode=run.attn_res_mode,
        attn_res_block_layers=run.attn_res_block_layers,
        attn_res_recompute_read=run.attn_res_recompute_read,
        # KDA ('G'): q, k and v have the same heads and head dim (Megatron's GDN field names)
        linear_num_key_heads=run.linear_num_key_heads,
        linear_num_value_heads=run.linear_num_key_heads,
        linear_key_head_dim=run.linear_key_head_dim,
        linear_value_head_dim=run.linear_key_head_dim,
        linear_conv_kernel_dim=run.linear_conv_kernel_dim,
    )
    if "+" in pattern:
        fields.update(
            q_lora_rank=run.q_lora_rank,
            kv_lora_rank=run.kv_lora_rank,
            qk_head_dim=run.qk_head_dim,
            qk_pos_emb_head_dim=run.qk_pos_emb_head_dim,
            v_head_dim=run.v_head_dim,
            qk_layernorm=run.qk_layernorm,
            rope_type="rope",
            rotary_base=run.rotary_base,
            mla_use_nope=run.mla_use_nope,
            mla_latent_norm_epsilon=run.mla_latent_norm_epsilon,
        )
        return AttnResMLATransformerConfig(**fields)
    return AttnResTransformerConfig(**fields)
