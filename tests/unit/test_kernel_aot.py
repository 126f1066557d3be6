"""The Triton depth-read kernels compile ahead of time for sm_90 on CPU, without spills, and the
occupancy estimate of `attnres-bench kernels` matches CUDA's occupancy arithmetic by hand."""

import json

import pytest
import torch

from megatron_attnres.bench import kernels as aot
from megatron_attnres.kernels.depth_read_triton import launch_config, register_limit

H100 = aot.TARGETS["sm_90"][1]
UNAVAILABLE = aot.unavailable_reason()  # no triton NVIDIA backend, ptxas or cuobjdump


@pytest.mark.parametrize(
    ("regs", "smem", "warps", "blocks", "fraction"),
    [
        # 90 regs x 32 lanes = 2880, rounded up to 256s: 3072 a warp; 65536 // 3072 = 21 warps,
        # 2 programs of 8 warps (shared memory would allow 233472 // (9216 + 1024) = 22).
        (90, 9216, 8, 2, 16 / 64),
        # 32 regs: 64 warps by registers; shared 233472 // (102400 + 1024) = 2 programs.
        (32, 102400, 4, 2, 8 / 64),
        # 16 regs, no shared memory: the 64-warp limit, 16 programs of 4 warps.
        (16, 0, 4, 16, 1.0),
        # 1-warp programs: the 32-programs-per-SM limit.
        (16, 0, 1, 32, 0.5),
    ],
)
def test_occupancy_matches_hand_computed_cases(regs, smem, warps, blocks, fraction):
    assert aot.occupancy(regs, smem, warps, H100) == (blocks, fraction)


def test_register_limit_is_the_register_file_over_the_threads():
    assert [register_limit(w) for w in (4, 8, 16, 32)] == [255, 255, 128, 64]


@pytest.mark.skipif(UNAVAILABLE is not None, reason=f"cannot compile here: {UNAVAILABLE}")
@pytest.mark.parametrize("hidden", [64, 256])
def test_every_kernel_compiles_for_sm_90_without_spills(hidden):
    cases = aot.cases([hidden])
    launch = launch_config(aot.TRAIN_TOKENS, hidden, torch.device("cpu"))
    by_name = {case.kernel: case for case in cases}
    assert by_name["train fwd"].num_warps == launch.num_warps
    assert by_name["train bwd"].options == {
        "num_warps": launch.backward_warps,
        "maxnreg": register_limit(launch.backward_warps),
    }
    assert set(by_name) == {"train fwd", "train bwd", "phase1 prefill", "phase2 prefill",
                            "phase2 prefill +partial"}  # fmt: skip
    for case in cases:
        result = aot.compile_case(case, 90)
        assert "error" not in result, (case.kernel, result)
        assert 0 < result["regs"] <= 255, (case.kernel, result)
        assert result["stack"] == 0 and result["local"] == 0, (case.kernel, result)


@pytest.mark.skipif(UNAVAILABLE is not None, reason=f"cannot compile here: {UNAVAILABLE}")
def test_the_cli_part_prints_and_writes_the_table_for_both_targets(monkeypatch, capsys, tmp_path):
    from megatron_attnres.bench.cli import main

    threads = torch.get_num_threads()  # the CLI uses one thread on CPU
    monkeypatch.setattr(aot, "sweep", lambda quick: aot.cases([64])[:1])  # train fwd only
    out = tmp_path / "kernels.json"
    try:
        assert main(["kernels", "--quick", "--device", "cpu", "--output", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    assert "### train fwd" in capsys.readouterr().out
    rows = json.loads(out.read_text())["kernels"]["rows"]
    assert [(r["target"], r["hidden"], r["stack"]) for r in rows] == [
        ("sm_90", 64, 0),
        ("sm_100", 64, 0),
    ]
    assert all(0 < r["occupancy"] <= 1 for r in rows)
