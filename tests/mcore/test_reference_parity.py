"""The Megatron model equals the eager reference (same weights), and mode none equals stock
Megatron-Core; pseudo-queries survive Megatron's initialisation at zero."""

import pytest
import torch
import torch.nn.functional as F

from megatron_attnres.attnres import tolerance
from megatron_attnres.attnres.reference import ReferenceConfig, ReferenceModel
from megatron_attnres.mcore.model import build_model
from megatron_attnres.testing.reference_mapping import (
    megatron_config,
    reference_pattern,
    reference_to_megatron,
)
from tests.reference_helpers import randomise

pytestmark = pytest.mark.mcore
TOL = tolerance(torch.float32)
VOCAB, SEQ, BATCH = 64, 12, 2


def tiny_reference(mode: str, **overrides) -> ReferenceConfig:
    fields = dict(
        vocab_size=VOCAB,
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
        moe_router_topk_scaling_factor=2.5,
        moe_aux_loss_coeff=0.01,
        residual_mode=mode,
        layers_per_block=1,
    )
    fields.update(overrides)
    return ReferenceConfig(**fields)


def randomised_reference(cfg: ReferenceConfig) -> ReferenceModel:
    return randomise(ReferenceModel(cfg), expert_bias_std=0.05)


def megatron_twin(ref: ReferenceModel, stack_spec=None):
    cfg = ref.cfg
    model = build_model(
        megatron_config(cfg), reference_pattern(cfg), VOCAB, SEQ, stack_spec=stack_spec
    )
    mapped = reference_to_megatron(ref.state_dict(), cfg)
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), missing
    return model


def loss_and_grads(model, logits, labels):
    ce = F.cross_entropy(logits.reshape(-1, VOCAB).float(), labels.reshape(-1))
    params = dict(model.named_parameters())
    # The first sublayer's read has one source (bypassed): its w and g get no gradient.
    grads = torch.autograd.grad(ce, list(params.values()), allow_unused=True)
    return ce, {
        k: torch.zeros_like(params[k]) if g is None else g
        for k, g in zip(params, grads, strict=True)
    }


def run_megatron(model, tokens):
    positions = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
    return model(tokens, positions, None)


@pytest.mark.parametrize("mode", ["none", "full", "block"])
def test_megatron_model_matches_reference(mode):
    ref = randomised_reference(tiny_reference(mode))
    model = megatron_twin(ref)
    tokens, labels = torch.randint(0, VOCAB, (2, BATCH, SEQ))

    logits = run_megatron(model, tokens)
    ref_logits, aux = ref(tokens)
    TOL.assert_close(logits, ref_logits)

    # Megatron adds the aux-loss gradient through its autoscaler (scale 1); the reference adds
    # the aux loss to the loss.
    _, grads = loss_and_grads(model, logits, labels)
    ref_ce = F.cross_entropy(ref_logits.reshape(-1, VOCAB), labels.reshape(-1))
    ref_params = dict(ref.named_parameters())
    ref_grads = torch.autograd.grad(ref_ce + aux, list(ref_params.values()), allow_unused=True)
    expected = reference_to_megatron(
        {
            k: g if g is not None else torch.zeros_like(ref_params[k])
            for k, g in zip(ref_params, ref_grads, strict=True)
        },
        ref.cfg,
    )
    assert set(grads) == set(expected) - {k for k in expected if k.endswith("expert_bias")}
    for name, grad in grads.items():
        TOL.assert_close(grad, expected[name], msg=name)


def test_block_mode_really_differs_from_none():
    # Negative control: the parity above would be vacuous if modes computed the same function.
    torch.manual_seed(3)
    block = megatron_twin(randomised_reference(tiny_reference("block")))
    torch.manual_seed(3)
    none = megatron_twin(randomised_reference(tiny_reference("none")))
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ))
    assert not torch.allclose(run_megatron(block, tokens), run_megatron(none, tokens), atol=1e-3)


def test_mode_none_matches_stock_megatron(monkeypatch):
    import megatron.core.models.hybrid.hybrid_block as hybrid_block

    from megatron_attnres.mcore.specs import LocalRMSNorm, stock_local_stack_spec

    # Stock HybridStack hard-codes TransformerEngine's final norm; stand in the same torch norm.
    monkeypatch.setattr(hybrid_block, "TENorm", LocalRMSNorm)
    ref = randomised_reference(tiny_reference("none"))
    ours = megatron_twin(ref)
    stock = megatron_twin(ref, stack_spec=stock_local_stack_spec(megatron_config(ref.cfg)))
    assert type(stock.decoder).__name__ == "HybridStack"
    tokens, labels = torch.randint(0, VOCAB, (2, BATCH, SEQ))
    loss_ours, grads_ours = loss_and_grads(ours, run_megatron(ours, tokens), labels)
    loss_stock, grads_stock = loss_and_grads(stock, run_megatron(stock, tokens), labels)
    tight = dict(rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(loss_ours, loss_stock, **tight)
    assert grads_ours.keys() == grads_stock.keys()
    for name in grads_ours:
        torch.testing.assert_close(grads_ours[name], grads_stock[name], **tight, msg=name)


@pytest.mark.parametrize("mode", ["full", "block"])
def test_pseudo_queries_are_zero_after_megatron_initialisation(mode):
    cfg = tiny_reference(mode)
    model = build_model(megatron_config(cfg), reference_pattern(cfg), VOCAB, SEQ)
    reads = [(n, p) for n, p in model.named_parameters() if n.endswith("pseudo_query")]
    assert len(reads) == 2 * cfg.num_layers + 1
    for name, param in reads:
        assert torch.count_nonzero(param) == 0, name
    gains = [p for n, p in model.named_parameters() if n.endswith("key_norm_weight")]
    assert all(torch.equal(g, torch.ones_like(g)) for g in gains)
    # Megatron's init touched the ordinary weights (so the check above is not vacuous).
    assert model.decoder.layers[0].self_attention.linear_qkv.weight.std() > 0
