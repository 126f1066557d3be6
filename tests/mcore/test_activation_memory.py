"""Saved-activation bytes of one forward (bench/model_step.py's count): AttnRes minus the
standard residual equals the documented analytic overhead
(DepthBlockSchedule.saved_activation_overhead_bytes), with the read results recomputed in
backward (the default) and kept; recomputing changes no gradient."""

import pytest
import torch

from megatron_attnres.attnres.module import DepthAttention
from megatron_attnres.attnres.reference import ReferenceConfig
from megatron_attnres.bench.model_step import saved_activation_bytes
from megatron_attnres.mcore.model import build_model
from megatron_attnres.testing.reference_mapping import megatron_config, reference_pattern

pytestmark = pytest.mark.mcore
VOCAB, SEQ, BATCH = 128, 64, 2


def model_for(mode: str, layers_per_block: int, recompute_read: bool = True):
    ref = ReferenceConfig(
        vocab_size=VOCAB,
        hidden_size=512,
        num_layers=4,
        num_attention_heads=8,
        num_query_groups=4,
        ffn_hidden_size=1024,
        first_k_dense=1,
        num_experts=4,
        moe_router_topk=2,
        moe_ffn_hidden_size=512,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        residual_mode=mode,
        layers_per_block=layers_per_block,
    )
    config = megatron_config(ref, attn_res_recompute_read=recompute_read)
    return config, build_model(config, reference_pattern(ref), VOCAB, SEQ)


@pytest.mark.parametrize("recompute_read", [True, False])
@pytest.mark.parametrize(("mode", "layers_per_block"), [("block", 2), ("full", 1)])
def test_saved_bytes_overhead_matches_the_analytic_formula(mode, layers_per_block, recompute_read):
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ))
    _, baseline = model_for("none", layers_per_block)
    config, attnres = model_for(mode, layers_per_block, recompute_read)
    attnres.load_state_dict(baseline.state_dict(), strict=False)  # same weights
    # Routing differs between the modes, but dropless MoE keeps s * b * top-k routed tokens
    # whatever the routing, so only the residual path changes the total.
    base_bytes = saved_activation_bytes(baseline, tokens)
    measured = saved_activation_bytes(attnres, tokens) - base_bytes
    predicted = config.depth_block_schedule().saved_activation_overhead_bytes(
        tokens=SEQ * BATCH, hidden=512, act_bytes=4, recompute_read=recompute_read
    )
    print(
        f"{mode}: overhead measured {measured} B, predicted {predicted} B, "
        f"{measured / base_bytes:.1%} of mode none's {base_bytes} B"
    )
    assert measured == predicted


@pytest.mark.parametrize(("mode", "layers_per_block"), [("block", 2), ("full", 1)])
def test_recomputed_read_results_give_bitwise_the_same_gradients(
    mode, layers_per_block, monkeypatch
):
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ))
    positions = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
    grads, counts, rebuilt = {}, {}, {}
    rebuilds = []
    recompute_fn = DepthAttention.recompute_fn

    def counted(self, sources, result):
        rebuild = recompute_fn(self, sources, result)
        return lambda: rebuilds.append(1) or rebuild()

    monkeypatch.setattr(DepthAttention, "recompute_fn", counted)
    for recompute in (False, True):
        rebuilds.clear()
        torch.manual_seed(0)
        _, model = model_for(mode, layers_per_block, recompute)
        with torch.no_grad():  # non-trivial depth attention, so every read matters
            for name, param in model.named_parameters():
                if "pseudo_query" in name:
                    param.normal_(0.0, 0.5)
        calls = []
        for read in model.decoder.depth_reads:  # counts every read, first pass or rebuilt
            read.read_fn = lambda *a, _f=read.read_fn, _c=calls, **k: _c.append(1) or _f(*a, **k)
        model(tokens, positions, None).float().square().mean().backward()
        grads[recompute] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        counts[recompute], rebuilt[recompute] = len(calls), len(rebuilds)
    assert grads[True].keys() == grads[False].keys()
    for name in grads[True]:
        assert torch.equal(grads[True][name], grads[False][name]), name
    # Every sublayer read with 2+ sources ran once, and its result was rebuilt once more in
    # backward from the read's weights (the first sublayer's read is the identity), as was the
    # output read's in front of the final norm.
    reads = len(model.decoder.depth_reads) - 1
    assert counts[False] == counts[True] == reads
    assert rebuilt[False] == 0 and rebuilt[True] == reads + 1
