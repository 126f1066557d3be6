"""`attnres-bench cost` and `attnres-bench op --quick` run and print ratios measured in the run."""

import json

import pytest
import torch

from megatron_attnres.bench.cli import main
from megatron_attnres.bench.common import paired_ratio
from megatron_attnres.kernels import depth_read_cpu


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()  # the CLI uses one thread on CPU
    yield
    torch.set_num_threads(threads)


def test_cost_prints_the_paper_figures_and_predicted_times(capsys, tmp_path):
    out = tmp_path / "cost.json"
    assert main(["cost", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "ms at H100 SXM" in text and "ms at H200" in text
    result = json.loads(out.read_text())["cost"]
    assert result["paper_d_per_sublayer"]["block N=8, S=16"] == 5.5
    assert result["paper_d_per_sublayer"]["full N=8, S=16"] == 24
    inference = result["inference"]
    # The fused two-phase read moves less than our eager PyTorch code, more than the plain sum.
    fused, ours = (
        inference["block, paper fused (N/S+5)d"],
        inference["block, our PyTorch two-phase"],
    )
    assert inference["none (3d per sublayer)"] < fused < ours


def test_op_quick_times_every_cpu_implementation_against_the_reference(capsys, tmp_path):
    out = tmp_path / "op.json"
    assert main(["op", "--device", "cpu", "--quick", "--no-compile", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "speed-up vs reference" in text and "CPU ratios" in text
    records = json.loads(out.read_text())["op"]["results"]
    # The C kernel is timed wherever it builds (a C compiler; see kernels/depth_read_cpu.py).
    kernel = {"cpu_kernel"} if depth_read_cpu.unavailable_reason() is None else set()
    assert {r["impl"] for r in records} == {"lean", "reference", *kernel}
    assert {r["pass_"] for r in records} == {"fwd", "fwd+bwd"}
    for r in records:
        assert r["ms"] > 0 and r["vs_reference"] > 0
    assert all(r["vs_reference"] == 1.0 for r in records if r["impl"] == "reference")


def test_paired_ratio_is_the_median_of_per_round_ratios():
    # Rounds where the machine ran slow (round 3) move both modes; the per-round ratios are
    # 2, 1.5 and 2.5, their median 2, while the ratio of the medians would be 3 / 2 = 1.5.
    times = {"block": [2.0, 3.0, 10.0], "none": [1.0, 2.0, 4.0]}
    assert paired_ratio(times, "block", "none") == 2.0
    assert paired_ratio(times, "none", "none") == 1.0
