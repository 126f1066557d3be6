"""The gloo launcher runs a function on every rank and returns each rank's result."""

import pytest
import torch
import torch.distributed as dist

from megatron_attnres.testing.launcher import run_distributed

pytestmark = pytest.mark.distributed


def _sum_of_ranks(rank, world_size, scale):
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    return {"rank": rank, "world": dist.get_world_size(), "sum": value * scale}


def _fails_on_rank_one(rank, world_size):
    if rank == 1:
        raise RuntimeError("rank 1 failed on purpose")
    return rank


def test_every_rank_runs_and_reports():
    results = run_distributed(_sum_of_ranks, world_size=3, args=(2.0,))
    assert [r["rank"] for r in results] == [0, 1, 2]
    assert all(r["world"] == 3 for r in results)
    assert all(torch.equal(r["sum"], torch.tensor([12.0])) for r in results)  # (1+2+3) * 2


def test_a_failing_rank_fails_the_call():
    with pytest.raises(Exception, match="rank 1 failed on purpose"):
        run_distributed(_fails_on_rank_one, world_size=2)
