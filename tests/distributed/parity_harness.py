"""Train the same tiny Block AttnRes MoE on any parallel layout and gather what it did.

`train_on_layout(rank, world_size, layout, sabotages)` runs on every rank (through
`run_distributed`): it builds the model for `layout` (tp, ep, pp, vp), loads the same full
weights, takes STEPS optimizer steps (SGD with momentum, grad clipping) over the same global
batches through Megatron's DDP, finalize_model_grads, schedules and optimizer, and returns on
rank 0, per run (the plain one and each sabotaged one): the losses, the gathered gradients right
after finalize_model_grads, the gathered weights after every step, the p2p traffic and the
events of the interleaved schedule's summary cache.
The single-rank run of the same function is the oracle.
"""

from dataclasses import dataclass

import torch
from megatron.core import parallel_state as ps

from megatron_attnres.attnres import tolerance
from megatron_attnres.attnres.reference import ReferenceConfig, ReferenceModel
from megatron_attnres.mcore.compat import activate_cpu_compat, model_parallel_manual_seed
from megatron_attnres.mcore.model import build_model_chunks
from megatron_attnres.testing.reference_mapping import (
    megatron_config,
    reference_pattern,
    reference_to_megatron,
)
from megatron_attnres.testing.sharding import gather_full, load_full_state
from megatron_attnres.testing.traffic import P2PTrafficCounter
from megatron_attnres.train.engine import forward_backward, make_optimizer, train_step, wrap_ddp
from tests.reference_helpers import randomise

TOL = tolerance(torch.float32)
VOCAB, SEQ, MICRO_BATCH, STEPS = 64, 16, 2, 3
ATTNRES = ("depth_reads.", "output_read.")


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    ep: int = 1
    pp: int = 1
    vp: int | None = None
    dp: int = 1  # data-parallel replicas of the dense part (EP shares these ranks)
    microbatches: int = 2  # global batch, in micro-batches

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp


def tiny_moe(mode: str = "block", layers_per_block: int = 2) -> ReferenceConfig:
    return ReferenceConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_layers=8,
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
        layers_per_block=layers_per_block,
    )


def is_attnres(name: str) -> bool:
    return name.removeprefix("module.").removeprefix("decoder.").startswith(ATTNRES)


def _attnres_params(chunks):
    return [p for chunk in chunks for name, p in chunk.named_parameters() if is_attnres(name)]


def _drop_sp_mark(chunks, **_):
    for param in _attnres_params(chunks):
        param.sequence_parallel = False


def _mark_as_expert(chunks, **_):
    for param in _attnres_params(chunks):
        param.allreduce = False


def _detach_summaries(chunks, **_):
    """Receiving stages drop the gradient of their incoming summaries (it flows back as zeros,
    so the schedule's messages are unchanged). (Shuffling the summaries is no sabotage: a depth
    read is a softmax over a set of sources, so their order does not change it.)"""
    from megatron_attnres.mcore import stack

    original = stack.unpack_summaries
    stack.unpack_summaries = lambda packed, count: [
        s.detach() + 0.0 * s for s in original(packed, count)
    ]


def _drop_summary(chunks, **_):
    """Receiving stages see the embedding summary b_0 replaced by the next one."""
    from megatron_attnres.mcore import stack

    original = stack.unpack_summaries

    def without_b0(packed, count):
        summaries = original(packed, count)
        return [summaries[1 % count], *summaries[1:]]

    stack.unpack_summaries = without_b0


def _forget_cached_gradients(chunks, **_):
    """Interleaved stages: cache entries are released but the gradients that this rank's later
    chunks put on the cached summaries are not passed on to their producers."""
    from megatron_attnres.mcore import pipeline

    def release_only(ctx, grad):
        ctx.cache._release(*ctx.key)
        return grad, None, None

    pipeline._AddCachedGradients.backward = staticmethod(release_only)


SABOTAGES = {
    "none": lambda chunks, **_: None,
    "no_sp_allreduce": _drop_sp_mark,
    "as_expert_params": _mark_as_expert,
    "detached_summaries": _detach_summaries,
    "dropped_b0": _drop_summary,
    "forgotten_cached_gradients": _forget_cached_gradients,
}


def global_batch(step: int, microbatches: int) -> list[dict]:
    data = torch.randint(
        0,
        VOCAB,
        (microbatches, MICRO_BATCH, SEQ + 1),
        generator=torch.Generator().manual_seed(100 + step),
    )
    return [{"tokens": mb[:, :-1], "labels": mb[:, 1:]} for mb in data]


def _train(ref_cfg: ReferenceConfig, layout: Layout, sabotage: str) -> dict:
    from megatron_attnres.mcore import pipeline, stack

    unpack, add_cached = stack.unpack_summaries, pipeline._AddCachedGradients.backward
    model_parallel_manual_seed(1234)
    full = reference_to_megatron(randomise(ReferenceModel(ref_cfg)).state_dict(), ref_cfg)
    config = megatron_config(
        ref_cfg,
        tensor_model_parallel_size=layout.tp,
        sequence_parallel=layout.tp > 1,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=1 if layout.ep > 1 else layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vp,
        pipeline_dtype=torch.float32,
        batch_p2p_comm=False,
    )
    chunks = build_model_chunks(config, reference_pattern(ref_cfg), VOCAB, SEQ)
    local_experts = ref_cfg.num_experts // layout.ep
    load_full_state(chunks, full, local_experts)
    SABOTAGES[sabotage](chunks)
    try:
        return _steps(config, chunks, local_experts, layout)
    finally:
        stack.unpack_summaries = unpack
        pipeline._AddCachedGradients.backward = staticmethod(add_cached)


def _steps(config, chunks, local_experts, layout) -> dict:
    ddp = wrap_ddp(chunks)
    optimizer = make_optimizer(ddp, optimizer="sgd", lr=0.2, sgd_momentum=0.9, clip_grad=0.5)
    grads, finalize = [], config.finalize_model_grads_func

    def finalize_and_capture(*args, **kwargs):
        finalize(*args, **kwargs)
        grads.append(
            gather_full(chunks, local_experts, lambda name, p: getattr(p, "main_grad", None))
        )

    config.finalize_model_grads_func = finalize_and_capture
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    losses, weights, initial = [], [], gather_full(chunks, local_experts)
    caches = {
        id(m.summary_cache): m.summary_cache
        for chunk in chunks
        for m in chunk.modules()
        if getattr(m, "summary_cache", None) is not None
    }
    cache_log = []  # per step: (events, live bytes after the step) of this rank's summary cache
    with P2PTrafficCounter() as traffic:
        for step in range(STEPS):
            batch = global_batch(step, layout.microbatches)[dp_rank::dp_size]
            result = train_step(ddp, optimizer, batch)
            assert not result.skipped
            losses.append(result.loss)
            weights.append(gather_full(chunks, local_experts))
            cache_log += [(list(c.events), c.live_bytes) for c in caches.values()]
    counted = {
        "sent": dict(traffic.sent),
        "received": dict(traffic.received),
        "shape_messages": traffic.shape_messages,
    }
    # A validation-style forward-only pass (no backward releases the cache there).
    eval_batch = global_batch(STEPS, layout.microbatches)[dp_rank::dp_size]
    eval_loss = forward_backward(ddp, eval_batch, forward_only=True)
    assert all(c.live_bytes == 0 for c in caches.values())
    return {
        "losses": losses,
        "grads": grads,
        "weights": weights,
        "initial": initial,
        "traffic": counted,
        "cache": cache_log,
        "eval_loss": eval_loss,
    }


def train_on_layout(
    rank, world_size, layout: Layout, sabotages=(), mode="block", layers_per_block=2
):
    activate_cpu_compat()
    ps.initialize_model_parallel(
        layout.tp,
        layout.pp,
        virtual_pipeline_model_parallel_size=layout.vp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=1 if layout.ep > 1 else layout.tp,
    )
    try:
        ref_cfg = tiny_moe(mode, layers_per_block)
        runs = {name: _train(ref_cfg, layout, name) for name in ("none", *sabotages)}
        # Traffic is per rank: collect every rank's counters on rank 0.
        for key in ("traffic", "cache"):
            per_rank = [None] * world_size
            torch.distributed.all_gather_object(per_rank, {n: r[key] for n, r in runs.items()})
            for name, run in runs.items():
                run[key] = [rank_runs[name] for rank_runs in per_rank]
    finally:
        ps.destroy_model_parallel()
    return runs if rank == 0 else None


def mismatched(actual: dict, expected: dict) -> list[str]:
    assert actual.keys() == expected.keys(), set(actual) ^ set(expected)
    bad = []
    for key, value in expected.items():
        try:
            TOL.assert_close(actual[key], value)
        except AssertionError:
            bad.append(key)
    return bad


def assert_trains_like(run: dict, oracle: dict) -> None:
    assert len(oracle["grads"]) == STEPS == len(run["grads"])
    for step in range(STEPS):
        TOL.assert_close(torch.tensor(run["losses"][step]), torch.tensor(oracle["losses"][step]))
        assert mismatched(run["grads"][step], oracle["grads"][step]) == [], step
        assert mismatched(run["weights"][step], oracle["weights"][step]) == [], step
    TOL.assert_close(torch.tensor(run["eval_loss"]), torch.tensor(oracle["eval_loss"]))
