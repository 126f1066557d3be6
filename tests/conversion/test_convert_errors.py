"""Corrupt or mismatched inputs to both converters fail before writing, with exit code 2 and a
message naming the file or value and the fix, and leave no output folder (not even a partial
one) behind, also when the failure comes in the middle of writing."""

import json
import shutil

import pytest
import yaml

from megatron_attnres.conversion import from_hf, to_hf
from megatron_attnres.conversion.from_hf import convert_from_hf
from megatron_attnres.conversion.hf.modeling_attnres import AttnResForCausalLM
from tests.conversion.helpers import randomise_hf
from tests.conversion.test_convert_from_hf import hf_config

pytestmark = pytest.mark.mcore


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tokenizer_model):
    """A small HF folder (3 shards) and its Megatron import, as read-only originals."""
    root = tmp_path_factory.mktemp("sources")
    model = randomise_hf(AttnResForCausalLM(hf_config()))
    model.save_pretrained(root / "hf", max_shard_size="100KB")
    shutil.copyfile(tokenizer_model, root / "hf" / "tokenizer.model")
    convert_from_hf(root / "hf", root / "megatron", log=lambda _: None)
    return root


def copy_of(sources, name, tmp_path):
    shutil.copytree(sources / name, tmp_path / name)
    return tmp_path / name


def error_line(stderr: str, prog: str) -> str:
    """The one `PROG: error: ...` line (library warnings may come before it)."""
    lines = [line for line in stderr.splitlines() if line.startswith(f"{prog}: error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


def no_output_left(tmp_path) -> bool:
    return not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def _edit_json(path, **changes):
    values = json.loads(path.read_text())
    values.update(changes)
    path.write_text(json.dumps(values))


def _edit_yaml(path, **changes):
    values = yaml.safe_load(path.read_text())
    values.update(changes)
    path.write_text(yaml.safe_dump(values))


def _distcp(folder):
    return next((folder / "iter_0000000").glob("*.distcp"))


# (damage to a copy of the HF folder, words the message must contain)
FROM_HF_CASES = {
    "missing_shard": (
        lambda d: next(d.glob("model-00002-*")).unlink(),
        ["model-00002-of-", "is missing", "complete folder"],
    ),
    "truncated_shard": (
        lambda d: next(d.glob("model-00001-*")).write_bytes(b"\0" * 7),
        ["cannot read", "model-00001-of-"],
    ),
    "unknown_architecture": (
        lambda d: _edit_json(d / "config.json", model_type="llama"),
        ["model_type 'llama'", "not a supported architecture", "kimi_attnres"],
    ),
    "wrong_config": (
        lambda d: _edit_json(d / "config.json", hidden_size=96),
        ["do not match config.json", "wrong shapes"],
    ),
    "config_refused": (
        lambda d: _edit_json(d / "config.json", attn_res_mode="diagonal"),
        ["attn_res_mode='diagonal'", "use one of"],
    ),
    "kda_without_sizes": (
        lambda d: _edit_json(
            d / "config.json", mixer_types=["kda", "full_attention", "full_attention"]
        ),
        ["linear_attn_config", "num_heads", "short_conv_kernel_size"],
    ),
    "no_weights": (
        lambda d: [p.unlink() for p in d.glob("model*")],
        ["neither model.safetensors.index.json nor model.safetensors"],
    ),
    "no_config": (lambda d: (d / "config.json").unlink(), ["config.json does not exist"]),
}


@pytest.mark.parametrize("case", list(FROM_HF_CASES))
def test_from_hf_refuses_bad_input(case, sources, tmp_path, capsys):
    damage, words = FROM_HF_CASES[case]
    folder = copy_of(sources, "hf", tmp_path)
    damage(folder)
    assert from_hf.main(["--hf", str(folder), "--output", str(tmp_path / "out")]) == 2
    message = error_line(capsys.readouterr().err, "attnres-convert-from-hf")
    for word in words:
        assert word in message, message
    assert no_output_left(tmp_path)


def test_from_hf_refuses_a_layout_the_model_cannot_take(sources, tmp_path, capsys):
    args = ["--hf", str(sources / "hf"), "--output", str(tmp_path / "out"), "--tp", "3"]
    assert from_hf.main(args) == 2
    assert "layout TP=3 PP=1 EP=1" in capsys.readouterr().err
    assert no_output_left(tmp_path)


# Damage to a copy of the import's save directory (the converter is pointed at the save
# directory; the "iter:" cases point it at the iter_0000000 directory itself).
TO_HF_CASES = {
    "iter:missing_rank_file": (
        lambda d: _distcp(d).unlink(),
        ["__0_0.distcp is missing", "earlier checkpoint"],
    ),
    "iter:truncated_rank_file": (
        lambda d: _distcp(d).write_bytes(b"\0" * 100),
        ["__0_0.distcp has 100 bytes", "truncated"],
    ),
    "missing_rank_file": (
        lambda d: _distcp(d).unlink(),
        ["no usable checkpoint", "__0_0.distcp is missing"],
    ),
    "wrong_config": (
        lambda d: _edit_yaml(d / "config.yaml", num_layers=2),
        ["does not belong to this checkpoint", "--config"],
    ),
    "shape_mismatch": (
        lambda d: _edit_yaml(d / "config.yaml", ffn_hidden_size=64),
        ["linear_fc1.weight", "does not belong to this checkpoint"],
    ),
    "no_run_config": (lambda d: (d / "config.yaml").unlink(), ["pass --config"]),
    "no_tokenizer": (
        lambda d: [
            (d / "tokenizer.model").unlink(),
            _edit_yaml(d / "config.yaml", tokenizer_model="/gone/tok.model"),
        ],
        ["tokenizer model not found", "/gone/tok.model", "--tokenizer"],
    ),
    "torn_tracker": (lambda d: shutil.rmtree(d / "iter_0000000"), ["no usable checkpoint"]),
    "not_a_checkpoint": (
        lambda d: [
            shutil.rmtree(d / "iter_0000000"),
            (d / "latest_checkpointed_iteration.txt").unlink(),
        ],
        ["holds no dist checkpoint"],
    ),
}


@pytest.mark.parametrize("case", list(TO_HF_CASES))
def test_to_hf_refuses_bad_input(case, sources, tmp_path, capsys):
    damage, words = TO_HF_CASES[case]
    folder = copy_of(sources, "megatron", tmp_path)
    damage(folder)
    target = folder / "iter_0000000" if case.startswith("iter:") else folder
    assert to_hf.main(["--checkpoint", str(target), "--output", str(tmp_path / "out")]) == 2
    message = error_line(capsys.readouterr().err, "attnres-convert-to-hf")
    for word in words:
        assert word in message, message
    assert no_output_left(tmp_path)


def test_to_hf_keeps_an_existing_output_unless_overwrite(sources, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    args = ["--checkpoint", str(sources / "megatron"), "--output", str(tmp_path / "out")]
    assert to_hf.main(args) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    assert to_hf.main([*args, "--overwrite", "--max-shard-size", "100KB"]) == 0
    assert not (tmp_path / "out" / "keep.txt").exists()
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()


def test_a_failure_while_writing_leaves_no_partial_folder(sources, tmp_path, monkeypatch):
    """The disk fills up at the third shard: the staging folder goes, nothing is published."""
    written = []

    def save_file(tensors, path, metadata):
        written.append(path)
        if len(written) == 3:
            raise OSError(28, "No space left on device")
        path.write_bytes(b"")

    monkeypatch.setattr(to_hf, "save_file", save_file)
    with pytest.raises(OSError, match="No space left"):
        to_hf.convert_to_hf(
            sources / "megatron", tmp_path / "out", max_shard_size="50KB", log=lambda _: None
        )
    assert len(written) == 3 and written[0].parent.name.startswith(".out.partial-")
    assert no_output_left(tmp_path)
