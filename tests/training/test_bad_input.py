"""attnres-train refuses bad input before training: exit code 2 and one line that names the
file or value and the fix (the data-level checks themselves are tested in tests/data)."""

import pytest

from tests.training.trainer_runs import train

pytestmark = [pytest.mark.slow]


@pytest.mark.parametrize(
    ("overrides", "ranks", "message"),
    [
        (
            ["--data-path", "{tmp}/missing_text_document", "--tokenizer-model", "{tokenizer}"],
            1,
            "missing_text_document.idx does not exist",
        ),
        (["--data-path", "{tmp}/x", "--tokenizer-model", "{tmp}/x.model"], 1, "x.model"),
        (
            ["--vocab-size", "256"],
            1,
            "tokenizer vocab size 1024 is larger than the model's padded vocab size 256",
        ),
        (
            ["--global-batch-size", "12"],
            2,
            "global_batch_size=12 is not divisible by "
            "micro_batch_size x data-parallel size = 4 x 2; use a multiple of 8",
        ),
        (
            ["--hidden-sise", "32"],
            1,
            "unknown config key '--hidden-sise'; did you mean hidden_size",
        ),
        (
            [
                "--pipeline-model-parallel-size",
                "2",
                "--virtual-pipeline-model-parallel-size",
                "2",
                "--attn-res-block-layers",
                "1",
            ],
            2,
            "2 micro-batches per step with interleaved AttnRes stages and pipeline size 2: use at "
            "least 4",
        ),
    ],
    ids=[
        "missing-data",
        "missing-tokenizer",
        "vocab-mismatch",
        "batch-split",
        "unknown-key",
        "interleaved-microbatches",
    ],
)
def test_refused_before_training(tmp_path, overrides, ranks, message):
    from megatron_attnres.data.preprocess import prepare_builtin_data

    tokenizer = prepare_builtin_data(tmp_path / "data", vocab_size=1024).tokenizer_model
    overrides = [
        o.replace("{tmp}", str(tmp_path)).replace("{tokenizer}", str(tokenizer)) for o in overrides
    ]
    done = train(tmp_path / "run", *overrides, ranks=ranks, check=False)
    assert done.returncode != 0
    assert message in done.stderr
    assert "attnres-train: error:" in done.stderr and "step 1/" not in done.stdout
