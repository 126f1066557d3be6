"""Blending, determinism and resumption of the run's datasets (megatron.core underneath)."""

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from megatron_attnres.data.datasets import build_gpt_datasets, micro_batches
from megatron_attnres.data.tokenizer import load_tokenizer

EOD = 2
# Two corpora with disjoint token ranges, so each sample's source can be read off its tokens.
RANGES = {"a": (10, 500), "b": (500, 1000)}
SEQ = 16


@pytest.fixture(scope="module")
def tokenizer(builtin_data):
    return load_tokenizer(builtin_data.tokenizer_model)


@pytest.fixture(scope="module")
def disjoint_prefixes(tmp_path_factory):
    root = tmp_path_factory.mktemp("disjoint")
    rng = np.random.default_rng(0)
    prefixes = {}
    for name, (low, high) in RANGES.items():
        builder = IndexedDatasetBuilder(str(root / f"{name}.bin"), dtype=np.uint16)
        for _ in range(200):
            doc = [*rng.integers(low, high, size=rng.integers(5, 60)).tolist(), EOD]
            builder.add_document(doc, [len(doc)])
        builder.finalize(str(root / f"{name}.idx"))
        prefixes[name] = str(root / name)
    return prefixes


def _build(prefixes, tokenizer, cache_dir, seed=1234, train_samples=10_000, split="98,2,0"):
    blend = f"0.3 {prefixes['a']} 0.7 {prefixes['b']}"
    return build_gpt_datasets(
        blend,
        tokenizer,
        seq_length=SEQ,
        train_samples=train_samples,
        valid_samples=100,
        cache_dir=cache_dir,
        split=split,
        seed=seed,
    )


def _tokens(dataset, count):
    return torch.cat([b["tokens"] for b in micro_batches(dataset, 50)][: count // 50])


def test_blend_gives_the_requested_mix(gloo_rank, disjoint_prefixes, tokenizer, tmp_path):
    train, valid = _build(disjoint_prefixes, tokenizer, tmp_path / "cache")
    assert len(train) == 10_000 and len(valid) == 100
    tokens = _tokens(train, 10_000)
    content = tokens >= RANGES["a"][0]  # everything but EOD
    from_a = ((tokens < RANGES["b"][0]) | ~content).all(dim=1)
    from_b = ((tokens >= RANGES["b"][0]) | ~content).all(dim=1)
    assert (from_a ^ from_b).all(), "a sample mixes both corpora"
    assert abs(from_a.float().mean().item() - 0.3) < 0.02
    assert abs(from_b.float().mean().item() - 0.7) < 0.02


def test_rebuilding_gives_the_same_order(gloo_rank, disjoint_prefixes, tokenizer, tmp_path):
    first, _ = _build(disjoint_prefixes, tokenizer, tmp_path / "one", train_samples=2000)
    again, _ = _build(disjoint_prefixes, tokenizer, tmp_path / "two", train_samples=2000)
    assert torch.equal(_tokens(first, 2000), _tokens(again, 2000))
    other_seed, _ = _build(disjoint_prefixes, tokenizer, tmp_path / "3", seed=7, train_samples=2000)
    assert not torch.equal(_tokens(first, 2000), _tokens(other_seed, 2000))


@pytest.mark.parametrize("consumed", [0, 80, 6])
def test_resuming_continues_the_straight_run(
    gloo_rank, builtin_data, tokenizer, tmp_path, consumed
):
    train, _ = build_gpt_datasets(
        str(builtin_data.data_prefix),
        tokenizer,
        seq_length=32,
        train_samples=400,
        valid_samples=8,
        cache_dir=tmp_path / "cache",
    )
    straight = torch.stack([train[i]["tokens"] for i in range(200)])
    resumed = [b["tokens"] for b in micro_batches(train, 4, consumed)]
    assert len(resumed) == (len(train) - consumed) // 4
    steps = (len(straight) - consumed) // 4
    expected = straight[consumed : consumed + 4 * steps].reshape(steps, 4, 32)
    assert torch.equal(torch.stack(resumed[:steps]), expected)
