"""Tokenise documents into Megatron indexed datasets (PREFIX.bin + PREFIX.idx).

    attnres-preprocess-data corpus/*.jsonl --tokenizer-model tok/web32k.model \\
        --output-prefix data/web --num-proc 8

One document per record with the end-of-document token appended, written by megatron.core's
IndexedDatasetBuilder with the token dtype Megatron picks from the vocabulary size (uint16 below
65500 pieces, int32 above). Tokenisation runs through `datasets` `.map(num_proc=...)`, which shows
a progress bar; a summary line names the documents, tokens and output files. The prefix is what a
training blend names ("1.0 data/web").
"""

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

from megatron_attnres.data import builtin_corpus_path
from megatron_attnres.data.tokenizer import (
    TXT_SPLITS,
    load_tokenizer,
    open_documents,
    train_tokenizer,
)


@dataclass(frozen=True)
class PreprocessSummary:
    documents: int
    tokens: int  # including one end-of-document token per document
    bin_path: Path
    idx_path: Path
    dtype: type

    @property
    def path_prefix(self) -> Path:
        return self.bin_path.with_suffix("")

    def __str__(self) -> str:
        return (
            f"wrote {self.documents:,} documents, {self.tokens:,} tokens "
            f"({np.dtype(self.dtype).name}) to {self.bin_path} and {self.idx_path}"
        )


@lru_cache(maxsize=4)
def _worker_tokenizer(model_path: str):
    # One load per map worker process; the model travels as a path, not a pickled object.
    return load_tokenizer(model_path)


def _encode_batch(texts: list[str], model_path: str) -> dict[str, list[list[int]]]:
    tokenizer = _worker_tokenizer(model_path)
    return {"input_ids": [tokenizer.tokenize(text) + [tokenizer.eod] for text in texts]}


def preprocess(
    inputs: Sequence[str | Path],
    output_prefix: str | Path,
    tokenizer_model: str | Path,
    *,
    text_key: str = "text",
    txt_split: str = "paragraph",
    num_proc: int = 1,
    batch_size: int = 1000,
) -> PreprocessSummary:
    """Tokenise the non-empty documents of `inputs` into OUTPUT_PREFIX.bin/.idx."""
    model_path = str(Path(tokenizer_model).resolve())
    tokenizer = load_tokenizer(model_path)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    prefix = Path(output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    bin_path, idx_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
    with open_documents(inputs, text_key=text_key, txt_split=txt_split) as docs:
        encoded = docs.map(
            _encode_batch,
            input_columns="text",
            fn_kwargs={"model_path": model_path},
            batched=True,
            batch_size=batch_size,
            remove_columns=["text"],
            num_proc=num_proc if num_proc > 1 else None,
            desc=f"tokenising into {prefix}",
        )
        # Written beside the targets and renamed at the end: a crash leaves no half dataset.
        tmp_bin, tmp_idx = Path(f"{bin_path}.tmp"), Path(f"{idx_path}.tmp")
        builder = IndexedDatasetBuilder(str(tmp_bin), dtype=dtype)
        documents = tokens = 0
        for batch in encoded.iter(batch_size=batch_size):
            for ids in batch["input_ids"]:
                builder.add_document(ids, [len(ids)])
                documents += 1
                tokens += len(ids)
        builder.finalize(str(tmp_idx))
    os.replace(tmp_bin, bin_path)
    os.replace(tmp_idx, idx_path)
    return PreprocessSummary(documents, tokens, bin_path, idx_path, dtype)


# The built-in corpus is pydoc topics, each a title line underlined with '*'.
_TOPIC_START = re.compile(r"\n(?=[^\n]+\n\*+\n)")


def builtin_documents() -> list[str]:
    """The built-in corpus cut into its topics (79 documents)."""
    text = builtin_corpus_path().read_text(encoding="utf-8")
    return [topic.strip("\n") for topic in _TOPIC_START.split(text) if topic.strip()]


@dataclass(frozen=True)
class PreparedData:
    tokenizer_model: Path
    data_prefix: Path
    summary: PreprocessSummary


def prepare_builtin_data(out_dir: str | Path, vocab_size: int = 2048) -> PreparedData:
    """Train a tokenizer on the built-in corpus and preprocess it into OUT_DIR (a few seconds).

    Writes OUT_DIR/builtin_corpus.jsonl (one topic per line), OUT_DIR/tokenizer.model and
    OUT_DIR/builtin_text_document.bin/.idx. Deterministic. In a multi-rank job call it on one
    rank and barrier before the others read the files.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "builtin_corpus.jsonl"
    with corpus.open("w", encoding="utf-8") as f:
        for doc in builtin_documents():
            f.write(json.dumps({"text": doc}) + "\n")
    model = train_tokenizer([corpus], out / "tokenizer", vocab_size)
    summary = preprocess([corpus], out / "builtin_text_document", model)
    return PreparedData(model, summary.path_prefix, summary)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="attnres-preprocess-data",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  attnres-preprocess-data web.jsonl --tokenizer-model tok/web32k.model \\\n"
            "      --output-prefix data/web --num-proc 8\n"
            "  attnres-preprocess-data shard-*.parquet --text-key content \\\n"
            "      --tokenizer-model tok/code.model --output-prefix data/code\n"
            "  attnres-preprocess-data --builtin data/builtin   # built-in corpus + tokenizer\n"
            "then train on a blend of prefixes, e.g. '0.7 data/web 0.3 data/code'"
        ),
    )
    parser.add_argument("inputs", nargs="*", type=Path, help=".txt, .jsonl/.json or .parquet")
    parser.add_argument("--tokenizer-model", type=Path, help="sentencepiece .model file")
    parser.add_argument("--output-prefix", type=Path, help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--text-key", default="text", help="text column of .jsonl/.parquet")
    parser.add_argument(
        "--txt-split",
        choices=TXT_SPLITS,
        default="paragraph",
        help="how .txt files are cut into documents (default: blank lines)",
    )
    parser.add_argument("--num-proc", type=int, default=1, help="tokeniser processes")
    parser.add_argument(
        "--builtin",
        type=Path,
        metavar="OUT_DIR",
        help="instead of INPUTS: train a tokenizer on the built-in corpus and preprocess it",
    )
    parser.add_argument("--vocab-size", type=int, default=2048, help="with --builtin only")
    args = parser.parse_args(argv)
    if args.builtin is not None:
        prepared = prepare_builtin_data(args.builtin, args.vocab_size)
        print(f"tokenizer: {prepared.tokenizer_model}")
        print(prepared.summary)
        return 0
    if not args.inputs or args.tokenizer_model is None or args.output_prefix is None:
        parser.error("INPUTS, --tokenizer-model and --output-prefix are required (or --builtin)")
    summary = preprocess(
        args.inputs,
        args.output_prefix,
        args.tokenizer_model,
        text_key=args.text_key,
        txt_split=args.txt_split,
        num_proc=args.num_proc,
    )
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
