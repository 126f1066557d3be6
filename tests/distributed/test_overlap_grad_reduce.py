"""overlap_grad_reduce (the reduce started by the schedule through no_sync / grad_sync hooks,
as on GPUs) trains like the synchronous reduce: two data-parallel gloo ranks, 3 steps of 2
micro-batches each, the same losses and weights as overlap_grad_reduce: false. It needs every
trainable parameter in each backward, the bypassed first read's included (mcore/stack.py)."""

import pytest
import torch

from megatron_attnres.attnres.tolerances import tolerance
from megatron_attnres.testing.launcher import run_distributed
from tests.training.trainer_runs import QUICK, TINY

pytestmark = [pytest.mark.distributed, pytest.mark.mcore, pytest.mark.slow]
VOCAB = 256


def _train(rank, world_size, overlap: str, bypassed_read_grads: bool = True):
    from megatron.core import parallel_state as ps

    from megatron_attnres.bench.model_step import random_batch
    from megatron_attnres.config.load import load_run_config, parse_overrides
    from megatron_attnres.config.rules import microbatches_per_step
    from megatron_attnres.mcore.compat import activate_cpu_compat
    from megatron_attnres.train.build import build_run, initialize_parallel
    from megatron_attnres.train.engine import train_step

    activate_cpu_compat()
    if not bypassed_read_grads:  # negative control: the bypassed first read reports nothing
        from megatron_attnres.mcore import stack

        stack._ZeroGradients.apply = staticmethod(lambda x, *params: x)
    run = load_run_config(TINY, parse_overrides([*QUICK, "--overlap-grad-reduce", overlap]))
    initialize_parallel(run)
    try:
        built = build_run(run, VOCAB)
        micro = microbatches_per_step(run, world_size)
        losses = []
        for step in range(3):
            batch = random_batch(run, VOCAB, micro * world_size, seed=step)[rank::world_size]
            losses.append(train_step(built.chunks, built.optimizer, batch).loss)
        weights = {n: p.detach().clone() for n, p in built.chunks[0].module.named_parameters()}
        return {"losses": losses, "weights": weights}
    finally:
        ps.destroy_model_parallel()


def test_overlapped_grad_reduce_trains_like_the_synchronous_one():
    plain = run_distributed(_train, world_size=2, args=("false",))
    overlapped = run_distributed(_train, world_size=2, args=("true",))
    tol = tolerance(torch.float32)
    for a, b in zip(plain, overlapped, strict=True):
        tol.assert_close(torch.tensor(b["losses"]), torch.tensor(a["losses"]), "losses")
        for name, weight in a["weights"].items():
            tol.assert_close(b["weights"][name], weight, name)
    assert plain[0]["losses"][0] != plain[0]["losses"][2]  # it trained


def test_overlap_needs_every_parameter_in_each_backward():
    # Negative control: megatron-core counts one gradient per parameter before it reduces a
    # bucket; the first sublayer's bypassed read must report its (zero) gradients.
    with pytest.raises(Exception, match="per_param_grad_ready_counts"):
        run_distributed(_train, world_size=2, args=("true", False))
