"""MLA ('+') mixers in the AttnRes model: one layer equals an independent MLA formula (with
the KV-latent RMSNorm and different K/V head sizes), and qk_pos_emb_head_dim=0 is NoPE."""

import pytest
import torch
import torch.nn.functional as F

from megatron_attnres.attnres import tolerance
from megatron_attnres.mcore.config import (
    UNFUSED_KERNELS,
    AttnResMLATransformerConfig,
    AttnResTransformerConfig,
)
from megatron_attnres.mcore.model import build_model, hybrid_pattern
from tests.reference_helpers import randomise_depth_and_norm_params

pytestmark = pytest.mark.mcore
TOL = tolerance(torch.float32)
VOCAB, SEQ, BATCH, HIDDEN, HEADS = 64, 10, 2, 32, 4
QK_DIM, V_DIM, KV_RANK = 8, 6, 16


def mla_config(rope_dim: int = 0, mode: str = "block", **overrides):
    fields = dict(
        num_layers=4,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        ffn_hidden_size=48,
        num_moe_experts=4,
        moe_router_topk=2,
        moe_ffn_hidden_size=24,
        moe_token_dispatcher_type="allgather",
        q_lora_rank=None,
        kv_lora_rank=KV_RANK,
        qk_head_dim=QK_DIM,
        qk_pos_emb_head_dim=rope_dim,
        v_head_dim=V_DIM,
        rope_type="rope",
        qk_layernorm=True,
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="RMSNorm",
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        is_hybrid_model=True,
        enable_attention_residuals=mode != "none",
        attn_res_mode=mode,
        attn_res_block_layers=1,
        **UNFUSED_KERNELS,
    )
    fields.update(overrides)
    return AttnResMLATransformerConfig(**fields)


def mla_model(config):
    layers = config.num_layers // 2
    model = build_model(config, hybrid_pattern(layers, moe=True, mixer="+"), VOCAB, SEQ)
    randomise_depth_and_norm_params(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "linear_q_proj" in name or "linear_kv_" in name:
                param.mul_(10.0)  # sharper attention than at init, so positions can matter
    return model


def logits(model, tokens):
    return model(tokens, torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ), None)


def mla_formula(x, w: dict, eps: float, latent_eps: float):
    """Multi-head latent attention without q-LoRA and without RoPE, written out."""
    s, b, _ = x.shape
    n = F.rms_norm(x, (HIDDEN,), w["input_layernorm.weight"], eps)
    q = (n @ w["self_attention.linear_q_proj.weight"].T).view(s, b, HEADS, QK_DIM)
    latent = n @ w["self_attention.linear_kv_down_proj.weight"].T
    latent = F.rms_norm(latent, (KV_RANK,), w["self_attention.kv_layernorm.weight"], latent_eps)
    kv = (latent @ w["self_attention.linear_kv_up_proj.weight"].T).view(s, b, HEADS, -1)
    k, v = kv[..., :QK_DIM], kv[..., QK_DIM:]
    scores = torch.einsum("qbhd,kbhd->bhqk", q, k) / QK_DIM**0.5
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    out = torch.einsum("bhqk,kbhd->qbhd", weights, v).reshape(s, b, HEADS * V_DIM)
    return out @ w["self_attention.linear_proj.weight"].T


def test_mla_layer_matches_the_formula():
    config = mla_config()
    model = mla_model(config)
    layer = model.decoder.layers[0]
    assert layer.self_attention.kv_layernorm.weight.shape == (KV_RANK,)
    x = torch.randn(SEQ, BATCH, HIDDEN, requires_grad=True)
    out = layer(hidden_states=x, attention_mask=None)[0]  # raw output: no residual added
    weights = {
        k: v.detach().requires_grad_()
        for k, v in layer.state_dict().items()
        if not k.endswith("_extra_state")
    }
    x_ref = x.detach().clone().requires_grad_()
    expected = mla_formula(x_ref, weights, config.layernorm_epsilon, config.mla_latent_norm_epsilon)
    TOL.assert_close(out, expected)

    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    TOL.assert_close(x.grad, x_ref.grad)
    for name, param in layer.named_parameters():
        TOL.assert_close(param.grad, weights[name].grad, msg=name)


def _permute_prefix(tokens):
    perm = torch.randperm(SEQ - 1)
    return torch.cat([tokens[:, perm], tokens[:, -1:]], dim=1)


def test_mla_without_rope_is_nope():
    # One MLA layer (then MoE, depth reads and the head, all per token) and no position signal:
    # the last token's logits ignore the order of the tokens before it. (With more layers the
    # causal mask makes earlier tokens' states order-dependent, so one layer is the clean case.)
    model = mla_model(mla_config(rope_dim=0, num_layers=2))
    assert model.decoder.depth_reads[1].pseudo_query.abs().sum() > 0  # a real AttnRes model
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ))
    TOL.assert_close(logits(model, _permute_prefix(tokens))[:, -1], logits(model, tokens)[:, -1])


def test_mla_with_rope_sees_positions():
    # Negative control for the NoPE test: with a rotary part the order matters, by orders of
    # magnitude more than the rounding-level change the NoPE model shows.
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ))
    permuted = _permute_prefix(tokens)
    change = {}
    for rope_dim in (0, 4):
        torch.manual_seed(0)
        model = mla_model(mla_config(rope_dim=rope_dim, num_layers=2))
        change[rope_dim] = (logits(model, tokens) - logits(model, permuted))[:, -1].abs().max()
    assert change[4] > 100 * change[0], change


def test_mla_needs_the_mla_config():
    config = AttnResTransformerConfig(
        num_layers=4,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        num_moe_experts=4,
        use_cpu_initialization=True,
    )
    with pytest.raises(ValueError, match="use AttnResMLATransformerConfig"):
        build_model(config, hybrid_pattern(2, moe=True, mixer="+"), VOCAB, SEQ)
