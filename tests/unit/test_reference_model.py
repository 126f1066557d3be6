"""The eager reference model against loops written independently here (docs/architecture.md
section 3)."""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_attnres.attnres import tolerance
from megatron_attnres.attnres.reference import MoE, ReferenceConfig, ReferenceModel, apply_rope
from tests.reference_helpers import randomise

TOL = tolerance(torch.float32)


def small_config(mode, **overrides):
    base = dict(
        vocab_size=50,
        hidden_size=32,
        num_layers=3,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=48,
        first_k_dense=1,
        num_experts=4,
        moe_router_topk=2,
        moe_ffn_hidden_size=24,
        moe_shared_expert_intermediate_size=16,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_aux_loss_coeff=0.01,
        residual_mode=mode,
        layers_per_block=2,
    )
    base.update(overrides)
    return ReferenceConfig(**base)


def build(cfg):
    return randomise(ReferenceModel(cfg))


def oracle_read(sources, read):
    """Eq. 2-4 by hand: softmax over depth of w . RMSNorm_g(v_i), weights applied to raw v_i."""
    if len(sources) == 1:
        return sources[0]
    w, g, eps = read.pseudo_query, read.key_norm_weight, read.eps
    scores = [
        (w * g * v / torch.sqrt((v * v).mean(-1, keepdim=True) + eps)).sum(-1) for v in sources
    ]
    top = torch.stack(scores).amax(0)
    exps = [torch.exp(s - top) for s in scores]
    total = sum(exps)
    return sum(e.unsqueeze(-1) * v for e, v in zip(exps, sources, strict=True)) / total.unsqueeze(
        -1
    )


def head(model, x):
    return model.final_norm(x) @ model.output_layer.weight.T


def full_mode_loop(model, tokens):
    """Full AttnRes: sources = embedding + every earlier raw sublayer output."""
    outputs = [model.embedding(tokens)]
    for j, sublayer in enumerate(model.sublayers):
        outputs.append(sublayer(oracle_read(outputs, model.depth_reads[j]))[0])
    return head(model, oracle_read(outputs, model.output_read))


def block_mode_loop(model, tokens, S):
    """Block AttnRes, paper Eq. 6: summaries rebuilt from the raw outputs at every step."""
    emb, raw = model.embedding(tokens), []
    for l, sublayer in enumerate(model.sublayers):  # noqa: E741 - the paper's index
        n, i = divmod(l, S)  # depth block n (0-based), position i inside it
        summaries = [emb] + [sum(raw[b * S : (b + 1) * S]) for b in range(n)]
        sources = summaries + ([sum(raw[n * S : l])] if i > 0 else [])
        raw.append(sublayer(oracle_read(sources, model.depth_reads[l]))[0])
    blocks = math.ceil(len(raw) / S)
    final = [emb] + [sum(raw[b * S : (b + 1) * S]) for b in range(blocks)]
    return head(model, oracle_read(final, model.output_read))


def prenorm_residual_loop(model, tokens):
    x = model.embedding(tokens)
    for sublayer in model.sublayers:
        x = x + sublayer(x)[0]
    return head(model, x)


def check_logits_and_grads(model, tokens, oracle):
    logits, _ = model(tokens)
    expected = oracle(model, tokens)
    TOL.assert_close(logits, expected)
    params = [p for p in model.parameters()]
    target = torch.randn_like(logits)
    got = torch.autograd.grad((logits * target).sum(), params, allow_unused=True)
    want = torch.autograd.grad((expected * target).sum(), params, allow_unused=True)
    for (name, _), a, b in zip(model.named_parameters(), got, want, strict=True):
        assert (a is None) == (b is None), name
        if a is not None:
            TOL.assert_close(a, b, msg=name)


def test_full_mode_equals_independent_loop():
    model, tokens = build(small_config("full")), torch.randint(0, 50, (2, 12))
    check_logits_and_grads(model, tokens, full_mode_loop)


@pytest.mark.parametrize("layers_per_block", [1, 2, 3])
def test_block_mode_equals_eq6_loop(layers_per_block):
    model = build(small_config("block", layers_per_block=layers_per_block))
    tokens = torch.randint(0, 50, (2, 12))
    check_logits_and_grads(model, tokens, lambda m, t: block_mode_loop(m, t, 2 * layers_per_block))


def test_block_mode_with_uneven_last_block():
    model = build(small_config("block", num_layers=5, layers_per_block=2))  # blocks of 4,4,2
    tokens = torch.randint(0, 50, (1, 9))
    check_logits_and_grads(model, tokens, lambda m, t: block_mode_loop(m, t, 4))


def test_none_mode_equals_prenorm_residual():
    model, tokens = build(small_config("none")), torch.randint(0, 50, (2, 12))
    assert not hasattr(model, "depth_reads")
    check_logits_and_grads(model, tokens, prenorm_residual_loop)


def test_block_with_zero_queries_differs_from_none_mode():
    # Negative control for the oracles above: the residual path really changes the function.
    torch.manual_seed(1)
    block = ReferenceModel(small_config("block"))
    torch.manual_seed(1)
    none = ReferenceModel(small_config("none"))
    tokens = torch.randint(0, 50, (2, 12))
    assert not torch.allclose(block(tokens)[0], none(tokens)[0], rtol=1e-3, atol=1e-3)


def test_expert_bias_selects_but_never_weights():
    cfg = small_config("none")
    moe = MoE(cfg)
    logits = torch.randn(64, 4)
    moe.expert_bias[:] = torch.tensor([5.0, 5.0, 0.0, 0.0])  # forces experts 0 and 1
    idx, weights = moe.route(logits)
    assert set(idx.flatten().tolist()) == {0, 1}
    scores = torch.sigmoid(logits)[:, :2]
    TOL.assert_close(
        weights.sort(-1).values, (scores / scores.sum(-1, keepdim=True)).sort(-1).values
    )


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_aux_loss_is_e_times_sum_f_p(score):
    cfg = small_config(
        "none",
        moe_router_score_function=score,
        moe_router_enable_expert_bias=False,
        moe_aux_loss_coeff=0.3,
    )
    logits = torch.randn(40, 4)
    probs = logits.softmax(-1) if score == "softmax" else torch.sigmoid(logits)
    probs = probs / probs.sum(-1, keepdim=True)
    chosen = probs.topk(2, dim=-1).indices
    f = torch.stack([(chosen == e).sum() for e in range(4)]).float() / (40 * 2)
    p = probs.mean(0)
    TOL.assert_close(MoE(cfg).aux_loss(logits), 0.3 * 4 * (f * p).sum())


def test_softmax_router_variants():
    logits = torch.randn(16, 4)
    renorm = MoE(
        small_config(
            "none", moe_router_score_function="softmax", moe_router_enable_expert_bias=False
        )
    )
    idx, weights = renorm.route(logits)
    TOL.assert_close(weights.sum(-1), torch.ones(16))
    renorm.cfg.moe_router_pre_softmax = True
    idx2, weights2 = renorm.route(logits)
    assert torch.equal(idx, idx2)
    TOL.assert_close(weights2, logits.softmax(-1).gather(1, idx))


def test_rope_scores_depend_only_on_relative_position():
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m, n):
        qs = apply_rope(q.expand(1, 10, 1, 16).contiguous(), 10000.0)[0, m, 0]
        ks = apply_rope(k.expand(1, 10, 1, 16).contiguous(), 10000.0)[0, n, 0]
        return (qs * ks).sum()

    TOL.assert_close(score(5, 2), score(7, 4))
    assert not torch.allclose(score(5, 2), score(5, 4))


def test_attention_is_causal():
    model = build(small_config("block"))
    tokens = torch.randint(0, 50, (1, 10))
    changed = tokens.clone()
    changed[0, 7] = (tokens[0, 7] + 1) % 50
    a, b = model(tokens)[0], model(changed)[0]
    TOL.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_loss_is_cross_entropy_plus_aux():
    model = build(small_config("block"))
    tokens = torch.randint(0, 50, (2, 12))
    total, ce = model.loss(tokens[:, :-1], tokens[:, 1:])
    logits, aux = model(tokens[:, :-1])
    TOL.assert_close(ce, F.cross_entropy(logits.reshape(-1, 50), tokens[:, 1:].reshape(-1)))
    assert aux.item() > 0
    TOL.assert_close(total, ce + aux)


def test_invalid_config_names_the_rule():
    with pytest.raises(ValueError, match="expert bias needs moe_router_score_function='sigmoid'"):
        small_config("none", moe_router_score_function="softmax")
    with pytest.raises(ValueError, match="layers_per_block=7 exceeds num_layers=3"):
        small_config("block", layers_per_block=7)
