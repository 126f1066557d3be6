"""TP=2 with sequence parallelism, EP=2 and TP=2 x EP=2 train exactly like one rank.

A tiny Block AttnRes MoE (8 transformer layers, 2 per depth block, 4 experts top-2, sigmoid router
with expert-bias updates, aux loss, shared expert, dense first layer) starts from the same full
weights on every layout and takes 3 optimizer steps (SGD with momentum, grad clipping) over the
same global batch of 2 micro-batches, through Megatron's DDP, finalize_model_grads, schedule and
optimizer. The oracle is the single-rank run: losses, the gathered gradients after
finalize_model_grads, and the gathered weights and expert biases after every step must match at
rtol 1e-5.

Each layout also runs a negative control, a sabotage a real bug could cause, that must break
parity on the AttnRes gradients at the first step:
- `no_sp_allreduce`: the AttnRes parameters lose their `sequence_parallel` mark, so their
  gradients are no longer summed over the tensor-parallel ranks' sequence shards;
- `as_expert_params`: the AttnRes parameters are marked as expert parameters (allreduce=False),
  so DDP reduces them over the expert-data-parallel group instead of the data-parallel group.
"""

import pytest
import torch
from megatron.core import parallel_state as ps

from megatron_attnres.attnres import tolerance
from megatron_attnres.attnres.reference import ReferenceConfig, ReferenceModel
from megatron_attnres.mcore.compat import activate_cpu_compat, model_parallel_manual_seed
from megatron_attnres.mcore.model import build_model
from megatron_attnres.mcore.reference_mapping import (
    megatron_config,
    reference_pattern,
    reference_to_megatron,
)
from megatron_attnres.mcore.sharding import gather_full, load_full_state
from megatron_attnres.training.engine import make_optimizer, train_step, wrap_ddp
from tests.distributed.launcher import run_distributed
from tests.reference_helpers import randomise

pytestmark = [pytest.mark.distributed, pytest.mark.mcore]
TOL = tolerance(torch.float32)
VOCAB, SEQ, MICRO_BATCH, MICROBATCHES, STEPS = 64, 16, 2, 2, 3
ATTNRES = ("depth_reads.", "output_read.")


def tiny_moe() -> ReferenceConfig:
    return ReferenceConfig(vocab_size=VOCAB, hidden_size=32, num_layers=8, num_attention_heads=4,
                           num_query_groups=2, ffn_hidden_size=48, first_k_dense=1, num_experts=4,
                           moe_router_topk=2, moe_ffn_hidden_size=24,
                           moe_shared_expert_intermediate_size=16,
                           moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                           moe_router_topk_scaling_factor=2.5, moe_aux_loss_coeff=0.01,
                           residual_mode="block", layers_per_block=2)  # fmt: skip


def _attnres_params(model):
    return [p for name, p in model.named_parameters() if name.startswith("decoder.")
            and name.removeprefix("decoder.").startswith(ATTNRES)]  # fmt: skip


def _drop_sp_mark(model):
    for param in _attnres_params(model):
        param.sequence_parallel = False


def _mark_as_expert(model):
    for param in _attnres_params(model):
        param.allreduce = False


SABOTAGES = {"none": lambda model: None, "no_sp_allreduce": _drop_sp_mark,
             "as_expert_params": _mark_as_expert}  # fmt: skip


def _global_batch(step: int) -> list[dict]:
    data = torch.randint(0, VOCAB, (MICROBATCHES, MICRO_BATCH, SEQ + 1),
                         generator=torch.Generator().manual_seed(100 + step))  # fmt: skip
    return [{"tokens": mb[:, :-1], "labels": mb[:, 1:]} for mb in data]


def _train(ref_cfg, tp, ep, sabotage):
    model_parallel_manual_seed(1234)
    full = reference_to_megatron(randomise(ReferenceModel(ref_cfg)).state_dict(), ref_cfg)
    config = megatron_config(ref_cfg, tensor_model_parallel_size=tp, sequence_parallel=tp > 1,
                             expert_model_parallel_size=ep,
                             expert_tensor_parallel_size=1 if ep > 1 else tp)  # fmt: skip
    model = build_model(config, reference_pattern(ref_cfg), VOCAB, SEQ)
    local_experts = ref_cfg.num_experts // ep
    load_full_state(model, full, local_experts)
    SABOTAGES[sabotage](model)
    ddp = wrap_ddp(model)
    # SGD keeps the comparison well conditioned: Adam's first step, g / (|g| + eps), turns
    # rounding-level differences in near-zero gradient elements into O(lr) weight differences.
    optimizer = make_optimizer(ddp, optimizer="sgd", lr=0.2, sgd_momentum=0.9, clip_grad=0.5)
    grads = []
    finalize = config.finalize_model_grads_func

    def finalize_and_capture(*args, **kwargs):
        finalize(*args, **kwargs)
        grads.append(
            gather_full(model, local_experts, lambda name, p: getattr(p, "main_grad", None))
        )

    config.finalize_model_grads_func = finalize_and_capture
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    losses, weights, initial = [], [], gather_full(model, local_experts)
    for step in range(STEPS):
        result = train_step(ddp, optimizer, _global_batch(step)[dp_rank::dp_size])
        assert not result.skipped
        losses.append(result.loss)
        weights.append(gather_full(model, local_experts))
    return {"losses": losses, "grads": grads, "weights": weights, "initial": initial}


def _train_layouts(rank, world_size, tp, ep, sabotages):
    activate_cpu_compat()
    ps.initialize_model_parallel(tp, 1, expert_model_parallel_size=ep,
                                 expert_tensor_parallel_size=1 if ep > 1 else tp)  # fmt: skip
    try:
        runs = {name: _train(tiny_moe(), tp, ep, name) for name in ("none", *sabotages)}
    finally:
        ps.destroy_model_parallel()
    return runs if rank == 0 else None


@pytest.fixture(scope="module")
def single_rank():
    return run_distributed(_train_layouts, world_size=1, args=(1, 1, ()))[0]["none"]


def _mismatched(actual: dict, expected: dict) -> list[str]:
    assert actual.keys() == expected.keys()
    bad = []
    for key, value in expected.items():
        try:
            TOL.assert_close(actual[key], value)
        except AssertionError:
            bad.append(key)
    return bad


@pytest.mark.slow
@pytest.mark.parametrize(
    ("tp", "ep", "sabotage"),
    [(2, 1, "no_sp_allreduce"), (1, 2, "as_expert_params"), (2, 2, "no_sp_allreduce")],
    ids=["tp2-sp", "ep2", "tp2xep2"],
)
def test_parallel_layout_trains_like_one_rank(single_rank, tp, ep, sabotage):
    runs = run_distributed(_train_layouts, world_size=tp * ep, args=(tp, ep, (sabotage,)))[0]
    run = runs["none"]
    assert len(single_rank["grads"]) == STEPS
    for step in range(STEPS):
        TOL.assert_close(
            torch.tensor(run["losses"][step]), torch.tensor(single_rank["losses"][step])
        )
        assert _mismatched(run["grads"][step], single_rank["grads"][step]) == [], step
        assert _mismatched(run["weights"][step], single_rank["weights"][step]) == [], step
    # The expert biases really moved (the same way on both layouts, compared just above).
    bias = [k for k in single_rank["initial"] if k.endswith("expert_bias")]
    assert bias and all(not torch.equal(single_rank["weights"][-1][k], single_rank["initial"][k])
                        for k in bias)  # fmt: skip

    # Negative control: the sabotage breaks parity on AttnRes gradients, and only there at step 1.
    broken = _mismatched(runs[sabotage]["grads"][0], single_rank["grads"][0])
    assert broken, f"sabotage {sabotage!r} went unnoticed"
    assert all(key.removeprefix("decoder.").startswith(ATTNRES) for key in broken), broken
