"""The run config: Megatron-LM names, typed overrides, and bad values refused with the fix."""

from pathlib import Path

import pytest

from megatron_attnres.config.load import load_run_config, parse_overrides

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def test_tiny_config_loads_and_overrides_take_either_spelling():
    argv = [
        "--train-iters",
        "70",
        "--lr=1e-4",
        "--min-lr",
        "1e-5",
        "--bf16",
        "false",
        "--data_path",
        "0.3 a 0.7 b",
    ]
    run = load_run_config(TINY, parse_overrides(argv))
    assert run.train_iters == 70 and run.lr == 1e-4 and run.bf16 is False
    assert run.data_path == ["0.3", "a", "0.7", "b"]
    assert run.attn_res_block_layers == 2 and run.num_experts == 4  # from the YAML


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lerning-rate", "1"], r"unknown config key '--lerning-rate'"),
        (["--micro-batch-sise", "1"], r"did you mean micro_batch_size"),
        (["--train-iters", "ten"], r"'train_iters': 'ten' is not a int"),
        (["--bf16", "maybe"], r"'bf16': 'maybe' is not a bool"),
        (["--lr"], r"override --lr has no value"),
        (["train_iters", "3"], r"unexpected argument 'train_iters'"),
    ],
)
def test_bad_overrides_are_refused(argv, message):
    with pytest.raises(ValueError, match=message):
        load_run_config(TINY, parse_overrides(argv))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"global_batch_size": 12, "micro_batch_size": 8},
            r"global_batch_size=12 is not a "
            r"multiple of micro_batch_size=8",
        ),
        ({"lr_warmup_iters": 300}, r"lr_warmup_iters=300 must be below"),
        ({"optimizer": "muon", "use_distributed_optimizer": True}, r"drift apart"),
        ({"optimizer": "lamb"}, r"optimizer='lamb' is not supported; use adam, sgd or muon"),
        ({"micro_batch_size": 0}, r"micro_batch_size=0 must be >= 1"),
    ],
)
def test_inconsistent_values_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_run_config(TINY, overrides)


def test_unknown_yaml_key_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_layers: 2\nhiden_size: 32\n")
    with pytest.raises(
        ValueError, match=r"unknown config key 'hiden_size'; did you mean hidden_size"
    ):
        load_run_config(bad)
    with pytest.raises(FileNotFoundError, match=r"nope.yaml does not exist"):
        load_run_config(tmp_path / "nope.yaml")
