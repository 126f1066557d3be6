"""attnres-model-size's arithmetic against built models: the total equals the parameter count of
the HybridModel this codebase builds, and the active count equals one taken from its named
parameters (all but the input embedding, top-k / num_experts of each routed expert). With KDA
('G', mcore/kda.py) the per-tensor shapes and the KDA / MLA sums are checked too."""

import pytest
import torch

from megatron_attnres.config.flops import kda_parameter_shapes
from megatron_attnres.config.load import load_run_config
from megatron_attnres.config.megatron import layer_pattern, transformer_config
from megatron_attnres.mcore.model import build_model
from megatron_attnres.study.model_size import model_size

pytestmark = [pytest.mark.mcore]

# Scaled-down copies of the 48B pattern style: 4 layers, the first dense, MoE with a shared expert.
SMALL = dict(
    num_layers=4,
    hidden_size=32,
    ffn_hidden_size=48,
    num_attention_heads=4,
    seq_length=16,
    vocab_size=96,
    num_experts=8,
    moe_first_k_dense=1,
    moe_router_topk=2,
    moe_ffn_hidden_size=16,
    moe_shared_expert_intermediate_size=24,
    moe_router_score_function="sigmoid",
    moe_router_enable_expert_bias=True,
    attn_res_block_layers=2,
    micro_batch_size=1,
    global_batch_size=1,
)
MLA = dict(
    multi_latent_attention=True,
    kv_lora_rank=12,
    qk_head_dim=8,
    qk_pos_emb_head_dim=4,
    v_head_dim=8,
    qk_layernorm=True,
)

VARIANTS = {
    "mla_moe_attnres": {**MLA},
    "gqa_attention_attnres": dict(num_query_groups=2, kv_channels=6),
    "mla_qlora_nope_attnres_off": {
        **MLA,
        "q_lora_rank": 10,
        "qk_pos_emb_head_dim": 0,
        "enable_attention_residuals": False,
    },
    "tied_full_attnres": dict(untie_embeddings_and_output_weights=False, attn_res_mode="full"),
    # Kimi Linear's layer rule at 4 layers: KDA, then MLA (NoPE) at layer 4; the first dense
    "kda_mla_nope_attnres": {
        **MLA,
        "hybrid_layer_pattern": "G-GEGE+E",
        "mla_use_nope": True,
        "linear_num_key_heads": 2,
        "linear_key_head_dim": 8,
        "linear_conv_kernel_dim": 3,
    },
    "kda_only_attnres_off": dict(
        hybrid_layer_pattern="G-GEGEGE",
        linear_num_key_heads=4,
        linear_key_head_dim=6,
        enable_attention_residuals=False,
    ),
}


def _build(run):
    tied = not run.untie_embeddings_and_output_weights
    return build_model(
        transformer_config(run),
        layer_pattern(run),
        run.vocab_size,
        run.seq_length,
        share_embeddings_and_output_weights=tied,
    )


def _built_counts(run) -> tuple[int, int]:
    """(total, active) of the model build_model makes for `run`, from its named parameters."""
    tied = not run.untie_embeddings_and_output_weights
    model = _build(run)
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


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v.startswith("kda")])
def test_kda_and_mla_parts_equal_the_built_model(variant):
    """Every KDA mixer of the built model has exactly the contract's tensors and shapes
    (config.flops.kda_parameter_shapes), and the calculator's KDA and MLA sums equal the built
    mixers' parameters (the MLA sum with its latent norm)."""
    run = load_run_config(None, {**SMALL, **VARIANTS[variant]})
    pattern = layer_pattern(run)
    expected = {name: torch.Size(shape) for name, shape in kda_parameter_shapes(run).items()}
    built = dict(_build(run).named_parameters())
    mixers = {"G": 0, "+": 0}
    for i, symbol in enumerate(pattern):
        if symbol not in mixers:
            continue
        prefix = f"decoder.layers.{i}.self_attention."
        params = {n.removeprefix(prefix): p for n, p in built.items() if n.startswith(prefix)}
        if symbol == "G":
            assert {n: p.shape for n, p in params.items()} == expected
        mixers[symbol] += sum(p.numel() for p in params.values())
    breakdown = model_size(run, gpus=1)["parameters"]["breakdown"]
    assert breakdown["kda"]["total"] == mixers["G"] > 0
    assert breakdown["mla"]["total"] == mixers["+"]


class _OperatorStandIn(torch.autograd.Function):
    """Stands in for the KDA operator: saves nothing, so only the module's own saves are seen
    (the operator's are fla-core chunk_kda's save_for_backward list, counted apart)."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta):
        return v.clone()

    @staticmethod
    def backward(ctx, grad):
        return None, None, grad, None, None


def test_kda_activation_estimate_outside_the_operator(monkeypatch):
    """model_size's KDA activation estimate, less its operator terms (the kernel's normalised
    q and k, g and its cumsum, Aqk and Akk, beta and the rsqrt), against the bytes autograd saves
    in the built KimiDeltaAttention (fp32, parameters and the input excluded, each storage
    once): within 15%, while counting the operator terms too would be far above."""
    from megatron_attnres.mcore import kda
    from megatron_attnres.study.model_size import KDA_CHUNK, kda_activation_bytes

    heads, dim, hidden, seq, batch = 4, 32, 96, 64, 2
    sizes = dict(
        hybrid_layer_pattern="G-",
        num_layers=1,
        hidden_size=hidden,
        linear_num_key_heads=heads,
        linear_key_head_dim=dim,
    )
    run = load_run_config(None, sizes)
    layer = kda.KimiDeltaAttention(transformer_config(run), layer_number=1)
    monkeypatch.setattr(kda, "kda_operator", _OperatorStandIn.apply)
    x = torch.randn(seq, batch, hidden, requires_grad=True)
    skip = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    skip.add(x.untyped_storage().data_ptr())
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        layer(x)
    tokens, inner = seq * batch, heads * dim
    operator = tokens * (2 * 4 * inner + 8 * inner + 8 * heads * KDA_CHUNK + 12 * heads)
    estimate = kda_activation_bytes(run, tokens, 4) - operator
    assert sum(saved.values()) == pytest.approx(estimate, rel=0.15)
    assert sum(saved.values()) != pytest.approx(estimate + operator, rel=0.15)
