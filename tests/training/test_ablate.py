"""attnres-ablate: the report's statistics against hand computations, bad input, and the real
cpu-smoke preset end to end (table, JSON, figures, reuse after an interruption)."""

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_attnres.study import ablate
from megatron_attnres.study.ablate_report import compare, depth_profile, layer_rms
from tests.training.trainer_runs import ROOT, clean_env


def _ablate(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "megatron_attnres.study.ablate", *args],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_compare_matches_a_hand_computed_welch_t_and_paired_difference():
    base = [{"seed": s, "valid_loss": v} for s, v in [(1, 2.0), (2, 2.2), (3, 2.1)]]
    other = [{"seed": s, "valid_loss": v} for s, v in [(1, 1.9), (2, 2.0), (3, 2.05)]]
    out = compare(other, base)
    # means 1.98333 and 2.1; sample variances 0.0058333 and 0.01 (n = 3 each)
    se = math.sqrt(0.0058333333 / 3 + 0.01 / 3)
    assert out["difference"] == pytest.approx(1.9833333 - 2.1, abs=1e-6)
    assert out["welch_t"] == pytest.approx((1.9833333 - 2.1) / se, rel=1e-5)
    assert out["paired_mean"] == pytest.approx((-0.1 - 0.2 - 0.05) / 3)
    assert out["paired_std"] == pytest.approx(statistics.stdev([-0.1, -0.2, -0.05]))


def test_one_seed_has_no_spread_and_no_t():
    out = compare([{"seed": 1, "valid_loss": 1.0}], [{"seed": 1, "valid_loss": 1.5}])
    assert out["welch_t"] is None and out["paired_std"] is None
    assert out["paired_mean"] == pytest.approx(-0.5)


def test_depth_profile_of_a_sawtooth_that_resets_at_every_depth_block():
    # 4 layers (8 sublayers), 2 layers per depth block: layer RMS 1, 2 | 1, 2.
    layer_values = [1.0, 2.0, 1.0, 2.0]
    norms = {}
    for layer, value in enumerate(layer_values):
        norms[str(2 * layer + 1)] = value  # mixer and MLP equal: the layer RMS is the value
        norms[str(2 * layer + 2)] = value
    norms["output"] = 99.0  # the output read is not a layer
    assert layer_rms(norms) == pytest.approx(layer_values)
    profile = depth_profile(norms, block_layers=2)
    assert profile["boundary_ratios"] == pytest.approx([0.5])  # layer 3 / layer 2
    assert profile["within_block_ratio_mean"] == pytest.approx(2.0)  # 2/1 twice
    assert profile["last_over_first"] == pytest.approx(2.0)
    # The layer RMS combines the two sublayers as the RMS of their concatenation.
    assert layer_rms({"1": 3.0, "2": 4.0}) == pytest.approx([math.sqrt(12.5)])


def test_variants_differ_only_in_their_attnres_keys(tmp_path):
    data = {"data_path": ["d"], "tokenizer_model": "t.model"}
    base = ablate.PRESETS["cpu-study"].config
    configs = {v: ablate.run_config(base, v, 7, data, tmp_path) for v in ablate.VARIANTS}
    differing = {
        key
        for a in configs.values()
        for b in configs.values()
        for key in a.keys() | b.keys()
        if a.get(key) != b.get(key)
    }
    assert differing == {"enable_attention_residuals", "attn_res_mode"}
    assert all(c["seed"] == 7 and c["train_iters"] == base["train_iters"] for c in configs.values())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seeds", "0"], "--seeds 0: give at least 1"),
        (["--data", "/nonexistent/corpus.jsonl"], "--data /nonexistent/corpus.jsonl: no such file"),
        (["--set", "train_iters"], "is not KEY=VALUE"),
        (["--set", "no_such_key=1"], "unknown config key"),
        (["--set", "attn_res_block_layers=0"], "attn_res_block_layers"),
    ],
)
def test_bad_input_is_refused_before_anything_runs(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert ablate.main(["--preset", "cpu-smoke", "--output", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_foreign_or_changed_output_is_refused(tmp_path, capsys):
    (tmp_path / "stray.txt").write_text("not an ablation")
    assert ablate.main(["--preset", "cpu-smoke", "--output", str(tmp_path)]) == 2
    assert "is not an attnres-ablate output" in capsys.readouterr().err
    out = tmp_path / "abl"
    out.mkdir()
    (out / "ablation.json").write_text(json.dumps({"preset": "cpu-study"}))
    assert ablate.main(["--preset", "cpu-smoke", "--output", str(out)]) == 2
    assert "preset: 'cpu-study' -> 'cpu-smoke'" in capsys.readouterr().err


@pytest.mark.slow
def test_cpu_smoke_preset_writes_the_table_json_and_figures(tmp_path):
    out = tmp_path / "smoke"
    result = _ablate("--preset", "cpu-smoke", "--output", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    # The oracle: each run's own final record, read here without the report code.
    for variant in ablate.VARIANTS:
        run_dir = out / "runs" / f"{variant}-s1234"
        final = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        final = [r for r in final if r["kind"] == "final"][-1]
        assert final["step"] == ablate.PRESETS["cpu-smoke"].config["train_iters"]
        summary = results["variants"][variant]
        assert summary["valid_loss_mean"] == pytest.approx(final["valid_loss"])
        assert summary["runs"] == [{"seed": 1234, "valid_loss": final["valid_loss"], "steps": 40}]
        assert yaml.safe_load((run_dir / "ablation.yaml").read_text())["seed"] == 1234
    for variant in ("block", "full"):
        expected = (
            results["variants"][variant]["valid_loss_mean"]
            - results["variants"]["none"]["valid_loss_mean"]
        )
        assert results["variants"][variant]["vs_none"]["difference"] == pytest.approx(expected)
    table = (out / "results.md").read_text()
    for variant in ablate.VARIANTS:
        row = f"| {variant} | 1 | {results['variants'][variant]['valid_loss_mean']:.4f} |"
        assert row in table
    for name in ("valid_loss", "layer_norms", "depth_attention_block", "depth_attention_full"):
        png = out / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert not (out / "plots" / "depth_attention_none.png").exists()  # no depth reads

    # Interrupted and started again: finished runs are reused, not retrained.
    (out / "results.md").unlink()
    again = _ablate("--preset", "cpu-smoke", "--output", str(out), timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("already finished, reused") == 3
    assert (out / "results.md").read_text() == table  # durations kept with the runs


@pytest.mark.gpu
def test_gpu_preset_takes_a_few_steps_on_cuda(tmp_path):
    out = tmp_path / "gpu"
    result = _ablate(
        "--preset",
        "gpu-25min",
        "--output",
        str(out),
        "--set",
        "train_iters=6",
        "--set",
        "eval_interval=3",
        "--set",
        "eval_iters=1",
        "--set",
        "diagnostics_interval=3",
        "--set",
        "lr_warmup_iters=2",
        "--set",
        "lr_wsd_decay_iters=2",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["variants"]) == set(ablate.VARIANTS)
    assert all(math.isfinite(v["valid_loss_mean"]) for v in results["variants"].values())
    assert Path(out / "plots" / "layer_norms.png").is_file()


def test_data_option_builds_tokenizer_and_documents_from_local_files(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_attnres.data.tokenizer import load_tokenizer

    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa", "lambda"]
    docs = [" ".join(words[(i * 7 + j) % len(words)] for j in range(40 + i)) for i in range(30)]
    corpus = tmp_path / "texts.jsonl"
    corpus.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    keys = ablate.prepare_data(tmp_path / "out", 300, [str(corpus)], text_key="body")
    tokenizer = load_tokenizer(keys["tokenizer_model"])
    dataset = IndexedDataset(keys["data_path"][0])
    assert len(dataset) == len(docs)
    for i, doc in enumerate(docs):
        assert tokenizer.detokenize(dataset[i].tolist()) == doc
    # Built once: a second call reuses the files it wrote.
    before = Path(keys["tokenizer_model"]).stat().st_mtime_ns
    assert ablate.prepare_data(tmp_path / "out", 300, [str(corpus)], text_key="body") == keys
    assert Path(keys["tokenizer_model"]).stat().st_mtime_ns == before
