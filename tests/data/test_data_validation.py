"""Bad data inputs fail before training, naming the file or value, the constraint and the fix."""

import shutil

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from megatron_attnres.data.datasets import (
    build_gpt_datasets,
    check_vocab,
    inspect_indexed_dataset,
    parse_blend,
    pretraining_sampler,
)
from megatron_attnres.data.tokenizer import load_tokenizer


@pytest.fixture
def copy(builtin_data, tmp_path):
    """A private copy of the built-in indexed dataset, to damage."""
    prefix = tmp_path / "copy"
    for suffix in (".bin", ".idx"):
        shutil.copy(f"{builtin_data.data_prefix}{suffix}", f"{prefix}{suffix}")
    return prefix


def _build(blend, builtin_data, tmp_path, **options):
    options = {"seq_length": 32, "train_samples": 64, "valid_samples": 8, **options}
    tokenizer = load_tokenizer(builtin_data.tokenizer_model)
    return build_gpt_datasets(blend, tokenizer, cache_dir=tmp_path / "cache", **options)


def _write(prefix, documents):
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for doc in documents:
        builder.add_document(doc, [len(doc)])
    builder.finalize(f"{prefix}.idx")


def test_a_good_prefix_is_described(builtin_data):
    info = inspect_indexed_dataset(builtin_data.data_prefix)
    assert (info.documents, info.tokens) == (79, builtin_data.summary.tokens)
    assert info.dtype == np.uint16


@pytest.mark.parametrize("missing", [".bin", ".idx"])
def test_missing_file(copy, builtin_data, tmp_path, missing):
    (copy.parent / f"copy{missing}").unlink()
    with pytest.raises(FileNotFoundError, match="attnres-preprocess-data") as error:
        _build(f"0.5 {builtin_data.data_prefix} 0.5 {copy}", builtin_data, tmp_path)
    assert f"{copy}{missing} does not exist" in str(error.value)
    assert not (tmp_path / "cache").exists()  # failed before megatron.core built anything


def test_prefix_with_suffix(copy):
    with pytest.raises(ValueError, match=r"copy\.bin ends in a suffix"):
        inspect_indexed_dataset(f"{copy}.bin")


@pytest.mark.parametrize("documents", [[], [[]]], ids=["no-documents", "no-tokens"])
def test_empty_dataset(builtin_data, tmp_path, documents):
    _write(tmp_path / "empty", documents)
    with pytest.raises(ValueError, match=rf"{tmp_path / 'empty'} is empty"):
        _build(str(tmp_path / "empty"), builtin_data, tmp_path)


def test_wrong_magic(copy, builtin_data, tmp_path):
    idx = copy.parent / "copy.idx"
    idx.write_bytes(b"NOTANIDX!" + idx.read_bytes()[9:])
    with pytest.raises(ValueError, match=rf"{idx} starts with b'NOTANIDX!', not Megatron's"):
        _build(str(copy), builtin_data, tmp_path)


@pytest.mark.parametrize("keep", [5, -10], ids=["header", "body"])
def test_truncated_index(copy, builtin_data, tmp_path, keep):
    idx = copy.parent / "copy.idx"
    idx.write_bytes(idx.read_bytes()[:keep])
    with pytest.raises(ValueError, match=rf"{idx} .*truncated"):
        _build(str(copy), builtin_data, tmp_path)


def test_bin_does_not_match_index(copy, builtin_data, tmp_path):
    data = copy.parent / "copy.bin"
    data.write_bytes(data.read_bytes()[:-2])
    with pytest.raises(ValueError, match=rf"{data} has .* bytes but .*does not match"):
        _build(str(copy), builtin_data, tmp_path)


def test_tokenizer_larger_than_model_vocab(builtin_data, tmp_path):
    check_vocab(2048, 2048)
    with pytest.raises(ValueError, match=r"vocab size 2048 is larger .* padded vocab size 1024"):
        check_vocab(2048, 1024)
    with pytest.raises(ValueError, match=r"--vocab-size 1000 or less"):
        _build(str(builtin_data.data_prefix), builtin_data, tmp_path, model_vocab_size=1000)


@pytest.mark.parametrize("weight", ["-0.3", "0", "abc", "nan", "inf"])
def test_weights_must_be_positive_numbers(weight):
    with pytest.raises(ValueError, match=rf"blend weight '{weight}' \(before 'x'\).*positive"):
        parse_blend(f"{weight} x 0.7 y")


def test_odd_number_of_blend_tokens(builtin_data, tmp_path):
    with pytest.raises(ValueError, match=r"'0.3 a 0.7' has an odd number of tokens \(3\)"):
        _build("0.3 a 0.7", builtin_data, tmp_path)
    assert parse_blend(["0.3", "a", "0.7", "b"]) == (["a", "b"], [0.3, 0.7])
    assert parse_blend("only") == (["only"], None)


@pytest.mark.parametrize("split", ["98,x,0", "0,0,0", "1,2,3,4", "-1,2"])
def test_bad_split_string(builtin_data, tmp_path, split):
    with pytest.raises(ValueError, match=rf"split '{split}'"):
        _build(str(builtin_data.data_prefix), builtin_data, tmp_path, split=split)


def test_split_leaving_a_prefix_without_tokens(builtin_data, tmp_path):
    _write(tmp_path / "one", [[5, 6, 7, 2]])  # megatron.core would loop forever on its valid split
    with pytest.raises(ValueError, match=r"valid split of data prefix .*one 0 of its 1 documents"):
        _build(str(tmp_path / "one"), builtin_data, tmp_path, split="98,2,0")


def test_sampler_refuses_consumed_samples_past_the_end():
    with pytest.raises(ValueError, match=r"consumed_samples=101 is outside .* 100 samples"):
        pretraining_sampler(100, 101, 4)
