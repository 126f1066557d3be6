"""Train/valid datasets of a run on megatron.core's datasets, and a resumable micro-batch iterator.

A blend is "WEIGHT PREFIX WEIGHT PREFIX ..." (or one PREFIX), each prefix naming a PREFIX.bin /
PREFIX.idx pair written by attnres-preprocess-data. megatron.core's BlendedMegatronDatasetBuilder
builds a GPTDataset per prefix and split (Megatron's "train,valid,test" split string) and blends
them by weight; every index it builds is cached under `cache_dir` and depends only on the data,
the seed, the split and the sequence length, so a rebuilt or resumed run sees the same order.

Bad input fails here, before any training, with a message that names the file or value: a missing
.bin/.idx, a directory for a prefix, an empty, corrupt or non-integer .idx, a split that leaves a
prefix without tokens (megatron.core would loop forever), weights that are not positive numbers,
an odd number of blend tokens, and a tokenizer larger than the model's vocabulary (`check_vocab`).
`check_data` runs all of them, plus too few tokens for one sample and token ids outside the
tokenizer's vocabulary, before the trainer builds its model.
"""

import math
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType, IndexedDataset
from megatron.core.datasets.utils import Split

_FIX = "write it with attnres-preprocess-data"
# .idx layout (megatron.core.datasets.indexed_dataset._IndexWriter): header, u64 version, u8 dtype
# code, u64 sequence count, u64 document count, then int32 lengths, int64 pointers, int64
# document indices (and int8 modes for multimodal data).
_IDX_FIXED = struct.Struct("<9sQBQQ")


@dataclass(frozen=True)
class IndexInfo:
    """What the .idx of a data prefix says (one sequence per document for GPT data)."""

    path_prefix: str
    documents: int
    tokens: int
    dtype: type
    sequence_lengths: np.ndarray


def inspect_indexed_dataset(path_prefix: str | Path) -> IndexInfo:
    """Check PREFIX.bin/.idx exist, are consistent and non-empty; describe them."""
    prefix = str(path_prefix)
    if prefix.endswith((".bin", ".idx")):
        raise ValueError(f"data prefix {prefix} ends in a suffix; name it without .bin/.idx")
    if Path(prefix).is_dir():
        found = sorted(str(p.with_suffix("")) for p in Path(prefix).glob("*.idx"))[:3]
        raise ValueError(
            f"data prefix {prefix} is a directory; a prefix names a PREFIX.bin + PREFIX.idx pair "
            f"without the suffix, e.g. {', '.join(found) or prefix + '/NAME'}"
        )
    idx_path, bin_path = Path(prefix + ".idx"), Path(prefix + ".bin")
    for path in (idx_path, bin_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"data prefix {prefix}: {path} does not exist; a prefix names a PREFIX.bin + "
                f"PREFIX.idx pair ({_FIX})"
            )
    with idx_path.open("rb") as f:
        raw = f.read(_IDX_FIXED.size)
    if len(raw) < _IDX_FIXED.size:
        raise ValueError(f"index {idx_path} is truncated ({len(raw)} bytes); {_FIX} again")
    header, version, code, n_seq, n_doc_bounds = _IDX_FIXED.unpack(raw)
    if header != _INDEX_HEADER:
        raise ValueError(
            f"index {idx_path} starts with {header!r}, not Megatron's {_INDEX_HEADER!r}: it is "
            f"not a Megatron .idx or is corrupt; {_FIX} again"
        )
    if version != 1 or code not in {d.value for d in DType}:
        raise ValueError(
            f"index {idx_path} has version {version} and dtype code {code} (expected version 1 "
            f"and a code in 1..8): corrupt; {_FIX} again"
        )
    dtype = DType.dtype_from_code(code)
    if not np.issubdtype(dtype, np.integer):
        raise ValueError(
            f"index {idx_path} says its tokens are {np.dtype(dtype).name}; token ids are integers "
            f"(attnres-preprocess-data writes uint16 or int32): {_FIX} again"
        )
    expected = _IDX_FIXED.size + n_seq * (4 + 8) + n_doc_bounds * 8
    size = idx_path.stat().st_size
    if size not in (expected, expected + n_seq):  # + n_seq: multimodal mode bytes
        raise ValueError(
            f"index {idx_path} has {size} bytes but its header ({n_seq} sequences, "
            f"{max(n_doc_bounds - 1, 0)} documents) implies {expected}: truncated or corrupt; "
            f"{_FIX} again"
        )
    lengths = (
        np.memmap(idx_path, dtype=np.int32, mode="r", offset=_IDX_FIXED.size, shape=(n_seq,))
        if n_seq
        else np.zeros(0, dtype=np.int32)
    )
    tokens = int(lengths.sum(dtype=np.int64))
    documents = max(n_doc_bounds - 1, 0)
    if documents == 0 or tokens == 0:
        raise ValueError(
            f"data prefix {prefix} is empty ({documents} documents, {tokens} tokens); "
            f"preprocess non-empty inputs ({_FIX}) or drop it from the blend"
        )
    bin_size, bin_expected = bin_path.stat().st_size, tokens * np.dtype(dtype).itemsize
    if bin_size != bin_expected:
        raise ValueError(
            f"data file {bin_path} has {bin_size} bytes but {idx_path} describes {tokens} "
            f"{np.dtype(dtype).name} tokens ({bin_expected} bytes): the pair does not match; "
            f"{_FIX} again"
        )
    return IndexInfo(prefix, documents, tokens, dtype, lengths)


def parse_blend(blend: str | Sequence[str]) -> tuple[list[str], list[float] | None]:
    """'0.3 a 0.7 b' (or its tokens) -> (['a', 'b'], [0.3, 0.7]); one 'a' -> (['a'], None)."""
    tokens = blend.split() if isinstance(blend, str) else [str(t) for t in blend]
    form = "a blend is 'WEIGHT PREFIX [WEIGHT PREFIX ...]' or a single PREFIX"
    if not tokens:
        raise ValueError(f"the data blend is empty; {form}")
    if len(tokens) == 1:
        return tokens, None
    if len(tokens) % 2:
        raise ValueError(
            f"the data blend {' '.join(tokens)!r} has an odd number of tokens ({len(tokens)}); "
            f"{form}"
        )
    weights, prefixes = [], []
    for weight_text, prefix in zip(tokens[::2], tokens[1::2], strict=True):
        try:
            weight = float(weight_text)
        except ValueError:
            weight = math.nan
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(
                f"blend weight {weight_text!r} (before {prefix!r}) is not a positive number; "
                f"{form}, weights > 0"
            )
        weights.append(weight)
        prefixes.append(prefix)
    return prefixes, weights


def parse_split(split: str) -> list[float]:
    """Megatron's 'train,valid,test' weights, e.g. '98,2,0' -> [0.98, 0.02, 0.0]."""
    parts = [p.strip() for p in split.split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if not 1 <= len(values) <= 3 or not all(math.isfinite(v) and v >= 0 for v in values):
        raise ValueError(
            f"split {split!r} is not 1 to 3 comma-separated non-negative numbers; use e.g. "
            "'98,2,0' (train, valid, test)"
        )
    if sum(values) <= 0:
        raise ValueError(f"split {split!r} sums to 0; give the train split a positive weight")
    values += [0.0] * (3 - len(values))
    return [v / sum(values) for v in values]


def check_vocab(tokenizer_vocab: int, model_vocab: int) -> None:
    """Refuse a tokenizer whose ids would index past the model's (padded) embedding table."""
    if tokenizer_vocab > model_vocab:
        raise ValueError(
            f"tokenizer vocab size {tokenizer_vocab} is larger than the model's padded vocab "
            f"size {model_vocab}: token ids >= {model_vocab} have no embedding row; set the "
            f"model's vocab_size to at least {tokenizer_vocab} or train a tokenizer with "
            f"--vocab-size {model_vocab} or less"
        )


def _check_split_has_tokens(
    info: IndexInfo, split: str, split_matrix: list, seq_length: int | None = None
) -> None:
    # megatron.core's GPTDataset loops forever on a split without tokens: refuse it here, cutting
    # the documents with the same bookends and rounding as BlendedMegatronDatasetBuilder. With
    # fewer tokens than one sample it would fill every sample with the same text, repeated.
    n = len(info.sequence_lengths)
    for which, bookends in zip(Split, split_matrix, strict=True):
        if bookends is None:
            continue
        beg, end = (int(round(b * float(n))) for b in bookends)
        tokens = int(info.sequence_lengths[beg:end].sum(dtype=np.int64))
        if tokens == 0:
            raise ValueError(
                f"split {split!r} gives the {which.name} split of data prefix {info.path_prefix} "
                f"{end - beg} of its {info.documents} documents and no tokens; add documents "
                f"or change the split (e.g. '100,0,0' for no validation)"
            )
        if seq_length is not None and tokens < seq_length + 1:
            raise ValueError(
                f"the {which.name} split of data prefix {info.path_prefix} has {tokens} tokens, "
                f"fewer than one sample of seq_length + 1 = {seq_length + 1}; add data, give "
                f"that split more of it (split {split!r}) or use a smaller seq_length"
            )


def _check_token_ids(
    info: IndexInfo, vocab_size: int, documents: int = 64, tokens_per_document: int = 1 << 16
) -> None:
    """Token ids of up to `documents` evenly spaced documents (a cheap sample) fit the tokenizer:
    larger ids mean the data was made with another tokenizer (and would index past the
    embedding when the model's vocabulary is the tokenizer's)."""
    try:
        dataset = IndexedDataset(info.path_prefix, mmap=True)
    except (AssertionError, ValueError, OSError) as err:
        raise ValueError(
            f"data prefix {info.path_prefix} cannot be read by megatron.core ({err}); {_FIX} again"
        ) from err
    n = len(info.sequence_lengths)
    for i in np.unique(np.linspace(0, n - 1, num=min(documents, n)).astype(np.int64)).tolist():
        length = min(int(info.sequence_lengths[i]), tokens_per_document)
        ids = dataset.get(i, 0, length) if length else np.zeros(0, dtype=np.int64)
        bad = ids[(ids < 0) | (ids >= vocab_size)]
        if bad.size:
            raise ValueError(
                f"data prefix {info.path_prefix}: document {i} holds token id {int(bad[0])}, "
                f"outside the tokenizer's ids 0..{vocab_size - 1}: the data was preprocessed with "
                "another tokenizer; set tokenizer_model to that tokenizer, or preprocess the data "
                "again with this one (attnres-preprocess-data --tokenizer-model)"
            )


def check_data(
    blend: str | Sequence[str], tokenizer, *, model_vocab_size: int, seq_length: int, split: str
) -> list[IndexInfo]:
    """Every check of the data inputs, before anything is built (cheap: headers, sizes and a
    sample of token ids): the blend and split strings, the tokenizer against the model's vocab,
    and for each prefix its files, its dtype, every split having at least one sample's tokens
    and token ids inside the tokenizer's vocabulary. Raises ValueError / FileNotFoundError."""
    prefixes, _ = parse_blend(blend)
    fractions = parse_split(split)
    check_vocab(tokenizer.vocab_size, model_vocab_size)
    split_matrix = convert_split_vector_to_split_matrix(fractions)
    infos = []
    for prefix in prefixes:
        info = inspect_indexed_dataset(prefix)
        _check_split_has_tokens(info, split, split_matrix, seq_length)
        _check_token_ids(info, tokenizer.vocab_size)
        infos.append(info)
    return infos


def build_gpt_datasets(
    blend: str | Sequence[str],
    tokenizer,
    *,
    seq_length: int,
    train_samples: int,
    valid_samples: int,
    cache_dir: str | Path,
    split: str = "98,2,0",
    seed: int = 1234,
    model_vocab_size: int | None = None,
    is_built_on_rank: Callable[[], bool] | None = None,
) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset | None]:
    """(train, valid) datasets of at least `train_samples` / `valid_samples` sequences.

    Samples are dicts of `tokens`, `labels`, `loss_mask`, `position_ids` (seq_length each) and,
    for a blend of several prefixes, `dataset_id`. Call on every rank after
    torch.distributed is initialised: rank 0 builds the index cache under `cache_dir`, the
    others wait at a barrier and load it. `valid` is None when the split gives validation 0.
    """
    prefixes, weights = parse_blend(blend)
    fractions = parse_split(split)
    if model_vocab_size is not None:
        check_vocab(tokenizer.vocab_size, model_vocab_size)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(prefixes, weights),
        split=",".join(f"{f:.12f}" for f in fractions),
        path_to_cache=str(cache_dir),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    for prefix in prefixes:
        _check_split_has_tokens(inspect_indexed_dataset(prefix), split, config.split_matrix)
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    sizes = [train_samples, valid_samples, 0]
    builder = BlendedMegatronDatasetBuilder(
        GPTDataset, sizes, is_built_on_rank or (lambda: True), config
    )
    train, valid, _ = builder.build()
    return train, valid


def pretraining_sampler(
    total_samples: int,
    consumed_samples: int,
    micro_batch_size: int,
    data_parallel_rank: int = 0,
    data_parallel_size: int = 1,
):
    """Megatron-LM's MegatronPretrainingSampler (micro-batches of sample indices in order: global
    sample i of the remaining run is `consumed_samples + i`, each step cut into one contiguous
    micro-batch per data-parallel rank), after checking its arguments with clear messages."""
    from megatron.training.datasets.data_samplers import MegatronPretrainingSampler

    if micro_batch_size < 1 or not 0 <= data_parallel_rank < data_parallel_size:
        raise ValueError(
            f"micro_batch_size={micro_batch_size}, data_parallel_rank={data_parallel_rank}, "
            f"data_parallel_size={data_parallel_size}: need micro_batch_size >= 1 and "
            "0 <= rank < size"
        )
    if not 0 <= consumed_samples < total_samples:
        raise ValueError(
            f"consumed_samples={consumed_samples} is outside the dataset's {total_samples} "
            "samples; build the datasets with train_samples covering the whole run"
        )
    return MegatronPretrainingSampler(
        total_samples, consumed_samples, micro_batch_size, data_parallel_rank, data_parallel_size
    )


def micro_batches(
    dataset: torch.utils.data.Dataset,
    micro_batch_size: int,
    consumed_samples: int = 0,
    *,
    data_parallel_rank: int = 0,
    data_parallel_size: int = 1,
    num_workers: int = 0,
    seed: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's micro-batches (dicts of stacked tensors), from `consumed_samples` on.

    Creating the iterator draws nothing from torch's global RNG: the loader draws its workers'
    base seed from its own generator (seeded with `seed`), so a resumed run, which restores the
    global RNG before it asks for its data, continues the uninterrupted run's stream."""
    sampler = pretraining_sampler(
        len(dataset), consumed_samples, micro_batch_size, data_parallel_rank, data_parallel_size
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )
    return iter(loader)
