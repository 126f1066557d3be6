"""attnres-model-size's arithmetic against built models: the total equals the parameter count of
the HybridModel this codebase builds, and the active count equals one taken from its named
parameters (all but the input embedding, top-k / num_experts of each routed expert)."""

import pytest

from megatron_attnres.mcore.model import build_model
from megatron_attnres.training.model_setup import layer_pattern, transformer_config
from megatron_attnres.training.model_size import model_size
from megatron_attnres.training.run_config import load_run_config

pytestmark = [pytest.mark.mcore]

# Scaled-down copies of the 48B pattern style: 4 layers, the first dense, MoE with a shared expert.
SMALL = dict(num_layers=4, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4,
             seq_length=16, vocab_size=96, num_experts=8, moe_first_k_dense=1, moe_router_topk=2,
             moe_ffn_hidden_size=16, moe_shared_expert_intermediate_size=24,
             moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
             attn_res_block_layers=2, micro_batch_size=1, global_batch_size=1)  # fmt: skip
MLA = dict(multi_latent_attention=True, kv_lora_rank=12, qk_head_dim=8, qk_pos_emb_head_dim=4,
           v_head_dim=8, qk_layernorm=True)  # fmt: skip

VARIANTS = {
    "mla_moe_attnres": {**MLA},
    "gqa_attention_attnres": dict(num_query_groups=2, kv_channels=6),
    "mla_qlora_nope_attnres_off": {**MLA, "q_lora_rank": 10, "qk_pos_emb_head_dim": 0,
                                   "enable_attention_residuals": False},
    "tied_full_attnres": dict(untie_embeddings_and_output_weights=False, attn_res_mode="full"),
}  # fmt: skip


def _built_counts(run) -> tuple[int, int]:
    """(total, active) of the model build_model makes for `run`, from its named parameters."""
    tied = not run.untie_embeddings_and_output_weights
    model = build_model(transformer_config(run), layer_pattern(run), run.vocab_size,
                        run.seq_length, share_embeddings_and_output_weights=tied)  # fmt: skip
    total = active = 0
    for name, param in model.named_parameters():
        total += param.numel()
        if name == "embedding.word_embeddings.weight" and not tied:
            continue  # an input lookup; tied, it is also the LM head
        if ".mlp.experts." in name:
            active += param.numel() * run.moe_router_topk // run.num_experts
        else:
            active += param.numel()
    return total, active


@pytest.mark.parametrize("variant", VARIANTS)
def test_counts_equal_the_built_model(variant):
    run = load_run_config(None, {**SMALL, **VARIANTS[variant]})
    counts = model_size(run, gpus=1)["parameters"]
    assert (counts["total"], counts["active"]) == _built_counts(run)
