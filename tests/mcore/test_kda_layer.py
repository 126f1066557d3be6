"""KDA ('G') sublayers: one layer equals the Kimi Linear equations written out here on fla-core's
token-by-token recurrence (forward and every gradient, fp32), and 'G' builds into a full Block
AttnRes model next to MLA and MoE, with its parameters named and shaped as the checkpoint
contract says."""

import pytest
import torch
import torch.nn.functional as F
from fla.ops.kda.naive import naive_recurrent_kda

from megatron_attnres.attnres import tolerance
from megatron_attnres.mcore.config import UNFUSED_KERNELS, AttnResMLATransformerConfig
from megatron_attnres.mcore.model import build_model

pytestmark = pytest.mark.mcore
TOL = tolerance(torch.float32)
VOCAB, SEQ, BATCH, HIDDEN = 64, 11, 2, 32
HEADS, DIM, KERNEL = 2, 8, 4


def kda_config(**overrides):
    fields = dict(
        num_layers=6,
        hidden_size=HIDDEN,
        num_attention_heads=4,
        ffn_hidden_size=48,
        num_moe_experts=4,
        moe_router_topk=2,
        moe_ffn_hidden_size=24,
        moe_token_dispatcher_type="allgather",
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_head_dim=8,
        qk_pos_emb_head_dim=4,
        v_head_dim=8,
        rope_type="rope",
        qk_layernorm=True,
        mla_use_nope=True,
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
        linear_num_key_heads=HEADS,
        linear_key_head_dim=DIM,
        linear_conv_kernel_dim=KERNEL,
        **UNFUSED_KERNELS,
    )
    fields.update(overrides)
    return AttnResMLATransformerConfig(**fields)


def randomise_kda(layer) -> None:
    """Non-trivial values everywhere: strong and varied decays, sharp gates, non-unit norms."""
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if name.endswith("A_log"):
                param.uniform_(-1.0, 2.0)
            elif name.endswith("dt_bias"):
                param.normal_(0.0, 1.0)
            elif "norm" in name:
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.4)


def causal_depthwise_conv(z, weight):
    """z [b, t, c], weight [c, 1, K]: out[t] = sum_j weight[:, j] * z[t - (K - 1) + j]."""
    t, kernel = z.shape[1], weight.shape[-1]
    padded = F.pad(z, (0, 0, kernel - 1, 0))
    return sum(weight[:, 0, j] * padded[:, j : j + t] for j in range(kernel))


def kda_formula(x, w: dict, eps: float):
    """The KDA sublayer (pre-norm included) from the Kimi Linear equations; x [s, b, h]."""
    a = "self_attention."
    n = F.rms_norm(x, (HIDDEN,), w["input_layernorm.weight"], eps).transpose(0, 1)  # [b, s, h]
    b, s = n.shape[:2]

    def heads(z):
        return z.reshape(b, s, HEADS, DIM)

    q, k, v = (
        heads(
            F.silu(
                causal_depthwise_conv(n @ w[f"{a}{p}_proj.weight"].T, w[f"{a}{p}_conv1d.weight"])
            )
        )
        for p in "qkv"
    )
    forget = heads(n @ w[f"{a}f_a_proj.weight"].T @ w[f"{a}f_b_proj.weight"].T + w[f"{a}dt_bias"])
    softplus = torch.where(forget > 20, forget, torch.log1p(torch.exp(forget)))
    g = -torch.exp(w[f"{a}A_log"])[:, None] * softplus
    beta = torch.sigmoid(n @ w[f"{a}b_proj.weight"].T)
    q, k = (z / torch.sqrt((z * z).sum(-1, keepdim=True) + 1e-6) for z in (q, k))  # fla's l2norm
    o, _ = naive_recurrent_kda(q, k, v, g, beta, scale=DIM**-0.5)
    gate = heads(n @ w[f"{a}g_a_proj.weight"].T @ w[f"{a}g_b_proj.weight"].T)
    o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + eps) * w[f"{a}o_norm.weight"]
    o = (o * torch.sigmoid(gate)).reshape(b, s, HEADS * DIM)
    return (o @ w[f"{a}o_proj.weight"].T).transpose(0, 1)


def test_kda_layer_matches_the_formula():
    config = kda_config()
    model = build_model(config, "G-GE+E", VOCAB, SEQ)
    layer = model.decoder.layers[0]
    randomise_kda(layer)
    x = torch.randn(SEQ, BATCH, HIDDEN, requires_grad=True)
    out = layer(hidden_states=x, attention_mask=None)[0]  # raw output: no residual added
    weights = {k: v.detach().clone().requires_grad_() for k, v in layer.named_parameters()}
    x_ref = x.detach().clone().requires_grad_()
    expected = kda_formula(x_ref, weights, config.layernorm_epsilon)
    TOL.assert_close(out, expected)
    assert (out - x).abs().max() > 0.1 * x.abs().max()  # not the identity (raw output)
    probe = torch.randn_like(out)
    (out * probe).sum().backward()
    (expected * probe).sum().backward()
    TOL.assert_close(x.grad, x_ref.grad, "input gradient")
    for name, param in layer.named_parameters():
        assert param.grad is not None and param.grad.abs().max() > 0, name
        TOL.assert_close(param.grad, weights[name].grad, f"gradient of {name}")


def test_formula_is_sensitive_to_the_decay():
    """Negative control: the comparison above can fail. Halving A (a wrong decay) or dropping
    the short convolution changes the layer output by far more than the tolerance."""
    config = kda_config()
    layer = build_model(config, "G-GE+E", VOCAB, SEQ).decoder.layers[0]
    randomise_kda(layer)
    x = torch.randn(SEQ, BATCH, HIDDEN)
    weights = {k: v.detach().clone() for k, v in layer.named_parameters()}
    with torch.no_grad():
        out = layer(hidden_states=x, attention_mask=None)[0]
        wrong = dict(weights)
        wrong["self_attention.A_log"] = weights["self_attention.A_log"] - 0.7
        with pytest.raises(AssertionError):
            TOL.assert_close(out, kda_formula(x, wrong, config.layernorm_epsilon))
        wrong = dict(weights)
        conv = torch.zeros_like(weights["self_attention.v_conv1d.weight"])
        conv[..., -1] = 1.0  # identity convolution
        wrong["self_attention.v_conv1d.weight"] = conv
        with pytest.raises(AssertionError):
            TOL.assert_close(out, kda_formula(x, wrong, config.layernorm_epsilon))


CONTRACT = {  # global names and shapes of one KDA sublayer (the checkpoint contract)
    "input_layernorm.weight": (HIDDEN,),
    **{f"self_attention.{p}_proj.weight": (HEADS * DIM, HIDDEN) for p in "qkv"},
    **{f"self_attention.{p}_conv1d.weight": (HEADS * DIM, 1, KERNEL) for p in "qkv"},
    "self_attention.f_a_proj.weight": (DIM, HIDDEN),
    "self_attention.f_b_proj.weight": (HEADS * DIM, DIM),
    "self_attention.b_proj.weight": (HEADS, HIDDEN),
    "self_attention.A_log": (HEADS,),
    "self_attention.dt_bias": (HEADS * DIM,),
    "self_attention.g_a_proj.weight": (DIM, HIDDEN),
    "self_attention.g_b_proj.weight": (HEADS * DIM, DIM),
    "self_attention.o_norm.weight": (DIM,),
    "self_attention.o_proj.weight": (HIDDEN, HEADS * DIM),
}


def test_kimi_pattern_builds_trains_and_checkpoints_the_contract_names():
    model = build_model(kda_config(), "G-GE+E", VOCAB, SEQ)
    for i in (0, 2):
        prefix = f"decoder.layers.{i}."
        params = {
            k[len(prefix) :]: tuple(v.shape)
            for k, v in model.named_parameters()
            if k.startswith(prefix)
        }
        assert params == CONTRACT
        sharded = model.sharded_state_dict()
        for name, shape in CONTRACT.items():
            tensor = sharded[prefix + name]
            assert (tensor.key, tuple(tensor.global_shape)) == (prefix + name, shape)
    a_log = model.decoder.layers[0].self_attention.A_log
    assert ((a_log.exp() >= 1.0) & (a_log.exp() <= 16.0)).all()
    dt = F.softplus(model.decoder.layers[0].self_attention.dt_bias)
    assert ((dt > 0.99e-3) & (dt < 1.01e-1)).all()
    queries = [p for n, p in model.named_parameters() if n.endswith("pseudo_query")]
    assert queries and all((q == 0).all() for q in queries)  # AttnRes starts as a mean
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ))
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    logits = model(tokens, positions, None)
    assert logits.shape == (BATCH, SEQ, VOCAB) and torch.isfinite(logits).all()
    F.cross_entropy(logits.reshape(-1, VOCAB), tokens.reshape(-1)).backward()
    kda = model.decoder.layers[0].self_attention
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in kda.parameters())


def test_kda_refuses_a_tp_size_that_splits_a_head():
    with pytest.raises(ValueError, match="linear_num_key_heads=3"):
        from megatron_attnres.mcore.kda import _check_kda_shape

        _check_kda_shape(kda_config(), heads=3, dim=8, tp=2)
