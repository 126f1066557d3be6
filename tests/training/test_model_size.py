"""attnres-model-size on the 48B configs: parameter totals against DESIGN section 7's independent
figures, and the per-GPU split of a parallel layout covering the model exactly once.
(tests/mcore/test_model_size_exact.py checks the counts against built models.)"""

import json
from pathlib import Path

import pytest

from megatron_attnres.training.model_setup import transformer_config
from megatron_attnres.training.model_size import attnres_stage_bytes, main, model_size
from megatron_attnres.training.run_config import load_run_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
ATTNRES, BASELINE = (
    CONFIGS / "kimi_linear_48b_attnres.yaml",
    CONFIGS / "kimi_linear_48b_baseline.yaml",
)
CUT_FREE = "+-" + "+E" * 26  # the 48B pattern without its pipeline cut (any PP may split it)


def _json(capsys, *argv: str) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_48b_totals_match_the_kimi_linear_shape(capsys):
    report = _json(capsys, "--config", str(ATTNRES), "--gpus", "64")
    total, active = report["parameters"]["total"], report["parameters"]["active"]
    assert 47e9 <= total <= 50e9
    # MLA stands in for KDA at 20 positions, so the active count sits below DESIGN's ~3.1B.
    assert 2.8e9 <= active <= 3.4e9
    # DESIGN's independent figures (49.1B / 3.1B) count, per public config, KDA at those 20
    # positions (q/k/v/o 4 x 2304 x 4096, short convs 3 x 4096 x 4, gate low-ranks
    # 2 x (2304 + 4096) x 128, beta 2304 x 32, A_log 32, dt_bias 4096, o_norm 128) where this
    # config has MLA (with the public config's 64 rope channels).
    kda = 4 * 2304 * 4096 + 3 * 4096 * 4 + 2 * (2304 + 4096) * 128 + 2304 * 32 + 32 + 4096 + 128
    mla_ours = report["parameters"]["breakdown"]["attention"]["total"] // 27
    design = 20 * (kda - mla_ours)
    assert abs(total + design - 49.1e9) < 0.05e9
    assert abs(active + design - 3.1e9) < 0.05e9
    plan = report["parallelism"]
    assert (plan["tp"], plan["pp"], plan["ep"], plan["dp"], plan["edp"]) == (2, 2, 8, 16, 4)


def test_baseline_differs_only_by_the_attnres_parameters(capsys):
    attnres = _json(capsys, "--config", str(ATTNRES), "--gpus", "64")
    baseline = _json(capsys, "--config", str(BASELINE), "--gpus", "64")
    reads = 54 + 1  # one read per sublayer and the output read, 2 x hidden each
    assert attnres["parameters"]["total"] - baseline["parameters"]["total"] == reads * 2 * 2304
    assert baseline["parameters"]["breakdown"]["attnres"]["total"] == 0
    assert baseline["pattern"] == attnres["pattern"]


@pytest.mark.parametrize(
    "layout",
    [
        dict(),  # the config's own plan: TP 2, PP 2, EP 8
        dict(hybrid_layer_pattern=CUT_FREE, tensor_model_parallel_size=1, sequence_parallel=False,
             pipeline_model_parallel_size=4, expert_model_parallel_size=16),
        dict(hybrid_layer_pattern=CUT_FREE, pipeline_model_parallel_size=2,
             virtual_pipeline_model_parallel_size=2, untie_embeddings_and_output_weights=False),
        dict(hybrid_layer_pattern=CUT_FREE, tensor_model_parallel_size=4, sequence_parallel=True,
             pipeline_model_parallel_size=1, expert_model_parallel_size=32,
             use_distributed_optimizer=True, optimizer="adam"),
    ],
)  # fmt: skip
def test_per_gpu_shards_cover_the_model_once(layout):
    run = load_run_config(ATTNRES, layout)
    report = model_size(run, gpus=64)
    s, total = report["parallelism"], report["parameters"]["total"]
    covered = 0
    for rank in report["memory_per_gpu"]:
        split = rank["params_by_sharding"]
        covered += split["replicated"] + split["tensor"] * s["tp"]
        covered += split["expert"] * s["ep"] * s["etp"]
        assert rank["weights_bytes"] == pytest.approx(2 * rank["params"])  # bf16
        assert rank["grads_bytes"] == pytest.approx(4 * rank["params"])  # fp32 main grads
    tied_copy = 0 if run.untie_embeddings_and_output_weights else report["vocab_size"] * 2304
    assert covered == pytest.approx(total + tied_copy, abs=1)
    assert sum(len(r["chunks"]) for r in report["memory_per_gpu"]) == s["pp"] * s["vp"]


def test_attnres_stage_bytes_split_the_schedules_overhead():
    run = load_run_config(ATTNRES, {"hybrid_layer_pattern": CUT_FREE})
    schedule = transformer_config(run).depth_block_schedule()
    tokens, hidden = 4096, 2304
    whole = schedule.saved_activation_overhead_bytes(tokens, hidden, 2)
    assert attnres_stage_bytes(schedule, 1, 54, True, tokens, hidden, 2) == whole
    stages = [(1, 18), (19, 30), (31, 42), (43, 54)]
    parts = sum(attnres_stage_bytes(schedule, a, b, b == 54, tokens, hidden, 2) for a, b in stages)
    received = sum(schedule.summaries_entering(a) for a, _ in stages[1:]) * tokens * hidden * 2
    assert parts - received == whole


def test_a_plan_that_does_not_fit_the_gpus_is_refused(capsys):
    assert main(["--config", str(ATTNRES), "--gpus", "40"]) == 2  # 20 per stage, EP 8
    err = capsys.readouterr().err
    assert "--gpus 40" in err and "EP=8" in err
    assert main(["--config", str(ATTNRES), "--gpus", "48"]) == 2  # DP 12 does not divide 2048
    assert "global_batch_size=2048" in capsys.readouterr().err
    inside_a_block = "+-+E+E+E+E+E+E+E+E+E+E+E+E+E|+E+E+E+E+E+E+E+E+E+E+E+E+E"  # cut after 28
    assert main(["--config", str(ATTNRES), "--hybrid-layer-pattern", inside_a_block]) == 2
    assert "inside a depth block" in capsys.readouterr().err
