"""Kimi Linear's MLA ('+' with mla_use_nope=True): the qk_pos_emb_head_dim channels of q (per
head) and of k (one per token, shared by the heads, straight from the KV down projection, not
normalised) are kept and never rotated. One layer equals that attention written out here; the
same weights with Megatron's RoPE (mla_use_nope=False) do not."""

import pytest
import torch
import torch.nn.functional as F

from megatron_attnres.attnres import tolerance
from megatron_attnres.mcore.config import UNFUSED_KERNELS, AttnResMLATransformerConfig
from megatron_attnres.mcore.model import build_model

pytestmark = pytest.mark.mcore
TOL = tolerance(torch.float32)
VOCAB, SEQ, BATCH, HIDDEN, HEADS = 64, 9, 2, 32, 4
NOPE, ROPE, V_DIM, KV_RANK = 8, 4, 6, 16


def nope_config(use_nope: bool, **overrides):
    fields = dict(
        num_layers=2,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        ffn_hidden_size=48,
        q_lora_rank=None,
        kv_lora_rank=KV_RANK,
        qk_head_dim=NOPE,
        qk_pos_emb_head_dim=ROPE,
        v_head_dim=V_DIM,
        rope_type="rope",
        qk_layernorm=True,
        mla_use_nope=use_nope,
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="RMSNorm",
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        is_hybrid_model=True,
        enable_attention_residuals=True,
        attn_res_mode="block",
        attn_res_block_layers=1,
        **UNFUSED_KERNELS,
    )
    fields.update(overrides)
    return AttnResMLATransformerConfig(**fields)


def nope_mla_formula(x, w: dict, eps: float, latent_eps: float):
    """MLA without q-LoRA whose positional channels are plain (unrotated) channels."""
    s, b, _ = x.shape
    n = F.rms_norm(x, (HIDDEN,), w["input_layernorm.weight"], eps)
    q = (n @ w["self_attention.linear_q_proj.weight"].T).view(s, b, HEADS, NOPE + ROPE)
    down = n @ w["self_attention.linear_kv_down_proj.weight"].T
    latent, k_shared = down[..., :KV_RANK], down[..., KV_RANK:]
    latent = F.rms_norm(latent, (KV_RANK,), w["self_attention.kv_layernorm.weight"], latent_eps)
    kv = (latent @ w["self_attention.linear_kv_up_proj.weight"].T).view(s, b, HEADS, -1)
    k_own, v = kv[..., :NOPE], kv[..., NOPE:]
    k = torch.cat([k_own, k_shared[:, :, None].expand(s, b, HEADS, ROPE)], dim=-1)
    scores = torch.einsum("qbhd,kbhd->bhqk", q, k) / (NOPE + ROPE) ** 0.5
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    out = torch.einsum("bhqk,kbhd->qbhd", weights, v).reshape(s, b, HEADS * V_DIM)
    return out @ w["self_attention.linear_proj.weight"].T


def layer_and_weights(use_nope: bool):
    torch.manual_seed(7)
    layer = build_model(nope_config(use_nope), "+-", VOCAB, SEQ).decoder.layers[0]
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.5)  # sharp attention, so positions would matter
    weights = {k: v.detach().clone().requires_grad_() for k, v in layer.named_parameters()}
    return layer, weights


def test_nope_mla_layer_matches_the_unrotated_formula():
    layer, weights = layer_and_weights(use_nope=True)
    eps = layer.config.layernorm_epsilon, layer.config.mla_latent_norm_epsilon
    x = torch.randn(SEQ, BATCH, HIDDEN, requires_grad=True)
    out = layer(hidden_states=x, attention_mask=None)[0]
    x_ref = x.detach().clone().requires_grad_()
    expected = nope_mla_formula(x_ref, weights, *eps)
    TOL.assert_close(out, expected)
    probe = torch.randn_like(out)
    (out * probe).sum().backward()
    (expected * probe).sum().backward()
    TOL.assert_close(x.grad, x_ref.grad, "input gradient")
    for name, param in layer.named_parameters():
        TOL.assert_close(param.grad, weights[name].grad, f"gradient of {name}")


def test_rotary_mla_differs_from_the_unrotated_formula():
    """Negative control: the same weights with Megatron's RoPE give another output."""
    layer, weights = layer_and_weights(use_nope=False)
    x = torch.randn(SEQ, BATCH, HIDDEN)
    with torch.no_grad():
        out = layer(hidden_states=x, attention_mask=None)[0]
        eps = layer.config.layernorm_epsilon, layer.config.mla_latent_norm_epsilon
        expected = nope_mla_formula(x, weights, *eps)
    with pytest.raises(AssertionError):
        TOL.assert_close(out, expected)


def test_nope_refuses_yarn():
    with pytest.raises(ValueError, match="mla_use_nope=True with rope_type='yarn'"):
        nope_config(True, rope_type="yarn")
