"""Pipeline payloads travel in the pipeline dtype: the tiny run with PP=2 sends, at the p2p calls,
exactly half the fp32 bytes in bf16, and both equal (completed summaries) x seq x micro-batch x
hidden x bytes(dtype) per micro-batch and direction (docs/architecture.md section 5)."""

import pytest

from megatron_attnres.testing.launcher import run_distributed
from tests.training.trainer_runs import QUICK, TINY

pytestmark = [pytest.mark.distributed, pytest.mark.mcore, pytest.mark.slow]
VOCAB = 256


def _sent_bytes(rank, world_size):
    from megatron.core import parallel_state as ps

    from megatron_attnres.bench.model_step import random_batch
    from megatron_attnres.config.load import load_run_config, parse_overrides
    from megatron_attnres.config.rules import microbatches_per_step
    from megatron_attnres.mcore.compat import activate_cpu_compat
    from megatron_attnres.testing.traffic import P2PTrafficCounter
    from megatron_attnres.train.build import build_run, initialize_parallel
    from megatron_attnres.train.engine import train_step

    activate_cpu_compat()
    out = {}
    for bf16 in ("false", "true"):
        argv = [*QUICK, "--pipeline-model-parallel-size", "2", "--bf16", bf16]
        run = load_run_config(TINY, parse_overrides(argv))
        initialize_parallel(run)
        try:
            built = build_run(run, VOCAB)
            batch = random_batch(run, VOCAB, microbatches_per_step(run, 1))
            with P2PTrafficCounter() as traffic:
                result = train_step(built.chunks, built.optimizer, batch)
            assert not result.skipped
            out[bf16] = {"sent": dict(traffic.sent), "run": run}
        finally:
            ps.destroy_model_parallel()
    return out


def test_bf16_payloads_are_half_the_fp32_bytes():
    ranks = run_distributed(_sent_bytes, world_size=2)
    run = ranks[0]["false"]["run"]
    micro = run.global_batch_size // run.micro_batch_size
    # tiny.yaml: 4 layers, 2 per depth block; the cut after layer 2 sends b_0 and b_1.
    per_micro = 2 * run.seq_length * run.micro_batch_size * run.hidden_size
    first, second = ranks
    assert first["false"]["sent"]["next"] == [per_micro * 4] * micro  # activations, fp32
    assert second["false"]["sent"]["prev"] == [per_micro * 4] * micro  # their gradients
    for rank in ranks:
        fp32, bf16 = rank["false"]["sent"], rank["true"]["sent"]
        assert fp32.keys() == bf16.keys() and fp32
        for direction, sizes in fp32.items():
            assert bf16[direction] == [size // 2 for size in sizes], direction
            assert all(size % 2 == 0 for size in sizes)
