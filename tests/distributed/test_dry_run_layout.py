"""`attnres-train --dry-run`: the printed layout is what Megatron really builds, and it is
computed without a process group.

Oracle: 4 gloo ranks run megatron.core's initialize_model_parallel for the same plan and report
their tensor / pipeline / data / expert coordinates and their pipeline chunk's first sublayer.
"""

import json
from pathlib import Path

import pytest
import torch.distributed as dist

from megatron_attnres.testing.launcher import run_distributed

pytestmark = [pytest.mark.distributed, pytest.mark.mcore]
TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
PLANS = {
    # MoE with TP trains only with sequence parallelism (megatron.core's MoE layer refuses it).
    "tp2xpp2": {
        "tensor_model_parallel_size": 2,
        "pipeline_model_parallel_size": 2,
        "sequence_parallel": True,
    },
    "pp2xep2": {"pipeline_model_parallel_size": 2, "expert_model_parallel_size": 2},
}


def _report(rank, world_size, overrides):
    from megatron.core import parallel_state as ps

    from megatron_attnres.config.load import load_run_config
    from megatron_attnres.mcore.compat import activate_cpu_compat
    from megatron_attnres.train.build import initialize_parallel

    activate_cpu_compat()
    run = load_run_config(TINY, overrides)
    initialize_parallel(run)
    try:
        return dict(
            tp=ps.get_tensor_model_parallel_rank(),
            pp=ps.get_pipeline_model_parallel_rank(),
            dp=ps.get_data_parallel_rank(),
            ep=ps.get_expert_model_parallel_rank(),
        )
    finally:
        ps.destroy_model_parallel()


@pytest.mark.parametrize("plan", sorted(PLANS))
def test_dry_run_matches_megatrons_process_groups(plan, capsys):
    from megatron_attnres.train.trainer import main

    overrides = [f"--{k}={v}" for k, v in PLANS[plan].items()]
    assert (
        main(
            [
                "--config",
                str(TINY),
                "--dry-run",
                "--json",
                "--world-size",
                "4",
                "--gpus-per-node",
                "2",
                *overrides,
            ]
        )
        == 0
    )
    assert not dist.is_initialized()  # nothing was started
    layout = json.loads(capsys.readouterr().out)["layout"]
    assert all(layout["checks"].values()), layout["checks"]

    real = run_distributed(_report, 4, args=(PLANS[plan],))
    table = [{k: r[k] for k in ("tp", "pp", "dp", "ep")} for r in layout["ranks"]]
    assert table == real
    assert [r["host"] for r in layout["ranks"]] == [0, 0, 1, 1]
    # Each rank's chunks are its pipeline stage's; stage cuts start depth blocks (4 sublayers).
    for r in layout["ranks"]:
        assert [layout["chunks"][c]["pp_rank"] for c in r["chunks"]] == [r["pp"]]
    assert [c["sublayers"] for c in layout["chunks"]] == [[1, 4], [5, 8]]


def test_dry_run_refuses_a_world_the_plan_does_not_divide(capsys):
    from megatron_attnres.train.trainer import main

    code = main(
        [
            "--config",
            str(TINY),
            "--dry-run",
            "--world-size",
            "6",
            "--tensor-model-parallel-size",
            "4",
            "--sequence-parallel",
            "true",
        ]
    )
    assert code == 2
    assert "world size 6 is not divisible by tensor x pipeline parallel = 4 x 1" in (
        capsys.readouterr().err
    )


def test_48b_plan_on_64_gpus_without_a_process_group(capsys):
    from megatron_attnres.train.trainer import main

    config = TINY.parent / "kimi_linear_48b_attnres.yaml"
    assert main(["--config", str(config), "--dry-run", "--json", "--world-size", "64"]) == 0
    assert not dist.is_initialized()
    layout = json.loads(capsys.readouterr().out)["layout"]
    assert layout["tp"] * layout["pp"] * layout["dp"] == 64 == len(layout["ranks"])
    assert layout["etp"] * layout["ep"] * layout["edp"] * layout["pp"] == 64
    assert all(layout["checks"].values()), layout["checks"]
    covered = [i for c in layout["chunks"] for i in range(c["sublayers"][0], c["sublayers"][1] + 1)]
    assert covered == list(range(1, 55))  # 27 layers = 54 sublayers, each once
    assert all((c["sublayers"][0] - 1) % 6 == 0 for c in layout["chunks"])  # 3-layer depth blocks
    assert {r["host"] for r in layout["ranks"]} == set(range(8))  # 8 GPUs per node
