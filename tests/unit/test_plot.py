"""attnres-plot: the three PNGs from a synthetic metrics.jsonl, the heatmap layout, clear errors."""

import json

import pytest

from megatron_attnres.train.plots import depth_attention_grid, main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOTS = ("loss.png", "depth_attention.png", "layer_norms.png")
# Block AttnRes, 6 sublayers, 4 per depth block (the format of train/diagnostics.py).
DEPTH = {
    "1": {"completed": [1.0], "partial": None},
    "2": {"completed": [0.7], "partial": 0.3},
    "3": {"completed": [0.5], "partial": 0.5},
    "4": {"completed": [0.2], "partial": 0.8},
    "5": {"completed": [0.4, 0.6], "partial": None},
    "6": {"completed": [0.1, 0.3], "partial": 0.6},
    "output": {"completed": [0.2, 0.5], "partial": 0.3},
}


def diagnostics(step: int) -> dict:
    norms = {str(n): 0.5 * n for n in range(1, 7)}
    return {
        "kind": "diagnostics",
        "step": step,
        "depth_attention": DEPTH,
        "output_norm": norms,
        "grad_norm": {k: 1e-3 / v for k, v in norms.items()},
        "moe": {
            "2": {"expert_load": [0.5, 0.5], "router_entropy": 0.6, "expert_bias_abs_mean": None}
        },
    }


def write_run(run_dir, diagnostics_records=True, train=True):
    lines = []
    for step in range(1, 21):
        if train:
            lines.append(
                {
                    "kind": "train",
                    "step": step,
                    "loss": 5.0 / step,
                    "lr": 1e-3,
                    "grad_norm": 0.5,
                    "tokens_per_s": 1000.0,
                    "mfu": None,
                }
            )
        if step % 10 == 0:
            lines.append({"kind": "valid", "step": step, "loss": 6.0 / step})
            if diagnostics_records:
                lines.append(diagnostics(step))
    lines.append({"kind": "final", "step": 20})  # other kinds are ignored
    run_dir.mkdir(exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return run_dir


def assert_png(path):
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    image = imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100, (path, image.shape)
    assert image.std() > 0.01, path  # not a blank canvas


def test_writes_three_valid_pngs(tmp_path, capsys):
    run_dir = write_run(tmp_path / "run")
    assert main([str(run_dir), "--log-y"]) == 0
    for name in PLOTS:
        assert_png(run_dir / "plots" / name)
    assert "wrote" in capsys.readouterr().out


def test_heatmap_rows_and_columns_are_unambiguous():
    rows, columns, grid = depth_attention_grid(dict(reversed(list(DEPTH.items()))))
    assert rows == ["1", "2", "3", "4", "5", "6", "output"]
    assert columns == ["b_0", "b_1", "partial"]
    assert grid[0] == [1.0, None, None]
    assert grid[1] == [0.7, None, 0.3]  # the partial goes to its own column, never to b_1
    assert grid[4] == [0.4, 0.6, None]
    assert grid[6] == [0.2, 0.5, 0.3]


def test_without_diagnostics_only_the_loss_is_plotted(tmp_path, capsys):
    run_dir = write_run(tmp_path / "run", diagnostics_records=False)
    assert main([str(run_dir)]) == 0
    assert_png(run_dir / "plots" / "loss.png")
    assert not (run_dir / "plots" / "depth_attention.png").exists()
    assert not (run_dir / "plots" / "layer_norms.png").exists()
    assert "no diagnostics records" in capsys.readouterr().out


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: d, "does not exist; a run directory is written by attnres-train"),
        (lambda d: d.mkdir(), "metrics.jsonl not found; attnres-train writes it"),
        (lambda d: write_run(d, train=False), "has no train records"),
        (
            lambda d: (d.mkdir(), (d / "metrics.jsonl").write_text('{"kind": "train"\n')),
            "metrics.jsonl, line 1: not valid JSON",
        ),
    ],
    ids=["missing-run-dir", "missing-metrics", "no-train-records", "bad-json"],
)
def test_clear_errors(tmp_path, capsys, setup, message):
    run_dir = tmp_path / "run"
    setup(run_dir)
    with pytest.raises(SystemExit) as exit_info:
        main([str(run_dir)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and str(run_dir) in err, err


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "RUN_DIR" in capsys.readouterr().out
