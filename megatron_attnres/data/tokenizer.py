"""Train a sentencepiece tokenizer from local files and wrap it for megatron.core's datasets.

    attnres-train-tokenizer corpus/*.jsonl --model-prefix out/tok --vocab-size 32000

Documents are read with the `datasets` library from local .txt, .jsonl/.json and .parquet files
(no downloads). The trained model always has unk=0, bos=1, eos=2 (the end-of-document token) and
pad=3, byte fallback (no unknown characters) and identity normalisation (code indentation and
newlines survive a round trip). Training is deterministic for given inputs and options; the result
depends on `num_threads`, so keep it fixed for reproducible tokenizers.
"""

import argparse
import contextlib
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import datasets
import sentencepiece as spm
from megatron.core.tokenizers.text.models.gpt_tokenizer import GPTTokenizer

# File suffix -> the `datasets` packaged loader that reads it.
LOADERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# How a .txt file is cut into documents (the `datasets` text loader's `sample_by`).
TXT_SPLITS = ("paragraph", "line", "document")
SPECIAL_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3}


class SentencePieceGPTTokenizer(GPTTokenizer):
    """megatron.core's GPT tokenizer on the sentencepiece library, built from a .model file.

    Exposes what GPTDataset and the trainer use: `vocab_size`, `eod` (the eos piece), `pad`,
    `tokenize(text) -> list[int]`, `detokenize(ids) -> str` and `unique_identifiers` (which
    keys megatron's dataset index cache).
    """

    def __init__(self, model_path: str | Path) -> None:
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer model {path} does not exist; train one with "
                f"`attnres-train-tokenizer FILES --model-prefix {path.with_suffix('')}`"
            )
        try:
            super().__init__(str(path), {"library": "sentencepiece"})
        except (RuntimeError, OSError) as err:  # sentencepiece: "could not parse ModelProto"
            raise ValueError(
                f"tokenizer model {path} is not a readable sentencepiece model ({err}); give the "
                "tokenizer.model written by attnres-train-tokenizer"
            ) from err
        if self.eod < 0:
            raise ValueError(
                f"tokenizer model {path} has no eos piece, which marks the end of a document; "
                "retrain it with attnres-train-tokenizer (eos_id=2)"
            )


def load_tokenizer(model_path: str | Path) -> SentencePieceGPTTokenizer:
    """The tokenizer of a sentencepiece .model file."""
    return SentencePieceGPTTokenizer(model_path)


def _loader_of(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} does not exist; pass existing files")
    loader = LOADERS.get(path.suffix.lower())
    if loader is None:
        raise ValueError(
            f"input file {path} has suffix {path.suffix!r}; supported suffixes are "
            f"{', '.join(LOADERS)} (convert the file or rename it)"
        )
    return loader


def _load_run(
    loader: str, files: list[Path], text_key: str, txt_split: str, cache_dir: str
) -> datasets.Dataset:
    options = {"sample_by": txt_split} if loader == "text" else {}
    ds = datasets.load_dataset(
        loader, data_files=[str(f) for f in files], split="train", cache_dir=cache_dir, **options
    )
    key = "text" if loader == "text" else text_key
    if key not in ds.column_names:
        raise ValueError(
            f"input {', '.join(map(str, files))} has no column {key!r} (columns: "
            f"{', '.join(ds.column_names)}); pass the column holding the text as --text-key"
        )
    if ds.features[key].dtype not in ("string", "large_string"):
        raise ValueError(
            f"column {key!r} of {', '.join(map(str, files))} holds {ds.features[key]}, not text; "
            "pass the column holding the text as --text-key"
        )
    ds = ds.select_columns([key])
    return ds.rename_column(key, "text") if key != "text" else ds


@contextlib.contextmanager
def open_documents(
    inputs: Sequence[str | Path], *, text_key: str = "text", txt_split: str = "paragraph"
) -> Iterator[datasets.Dataset]:
    """The non-empty documents of `inputs`, in input order, as a Dataset with one "text" column.

    .txt files are cut by `txt_split` ("paragraph": blank-line separated, "line", or "document":
    the whole file); .jsonl/.json/.parquet rows are documents, their text in column `text_key`.
    The Arrow cache lives in a temporary directory removed on exit.
    """
    if txt_split not in TXT_SPLITS:
        raise ValueError(f"txt_split={txt_split!r} is not one of {', '.join(TXT_SPLITS)}")
    if not inputs:
        raise ValueError("no input files given; pass at least one .txt/.jsonl/.parquet file")
    paths = [Path(p) for p in inputs]
    runs: list[tuple[str, list[Path]]] = []  # consecutive files of one loader, order kept
    for path in paths:
        loader = _loader_of(path)
        if runs and runs[-1][0] == loader:
            runs[-1][1].append(path)
        else:
            runs.append((loader, [path]))
    with tempfile.TemporaryDirectory(prefix="attnres-documents-") as cache_dir:
        parts = [_load_run(loader, files, text_key, txt_split, cache_dir) for loader, files in runs]
        ds = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
        ds = ds.filter(_is_not_blank, input_columns="text", desc="dropping empty documents")
        if len(ds) == 0:
            raise ValueError(
                f"the inputs {', '.join(map(str, paths))} contain no non-empty document; check "
                "the files and --text-key"
            )
        yield ds


def _is_not_blank(text: str | None) -> bool:
    return text is not None and text.strip() != ""


def _training_sentences(ds: datasets.Dataset) -> Iterator[str]:
    # sentencepiece learns from lines; newlines themselves are encoded through byte fallback.
    for batch in ds.iter(batch_size=1000):
        for text in batch["text"]:
            yield from (line for line in text.split("\n") if line.strip())


def train_tokenizer(
    inputs: Sequence[str | Path],
    model_prefix: str | Path,
    vocab_size: int,
    *,
    text_key: str = "text",
    txt_split: str = "paragraph",
    model_type: str = "bpe",
    character_coverage: float = 0.9995,
    num_threads: int = 1,
    seed: int = 1234,
) -> Path:
    """Train a sentencepiece model on `inputs`; write MODEL_PREFIX.model/.vocab; return the .model.

    Raises ValueError naming the largest possible value when `vocab_size` is too large for the
    corpus.
    """
    if vocab_size < len(SPECIAL_IDS) + 1:
        raise ValueError(f"vocab_size={vocab_size} is too small; use at least a few hundred")
    prefix = Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(seed)
    with open_documents(inputs, text_key=text_key, txt_split=txt_split) as ds:
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_training_sentences(ds),
                model_prefix=str(prefix),
                vocab_size=vocab_size,
                model_type=model_type,
                character_coverage=character_coverage,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                allow_whitespace_only_pieces=True,
                split_digits=True,
                byte_fallback=True,
                input_sentence_size=0,
                shuffle_input_sentence=False,
                num_threads=num_threads,
                minloglevel=2,
                **SPECIAL_IDS,
            )
        except RuntimeError as error:
            raise _explain(error, inputs, vocab_size) from error
    return Path(f"{prefix}.model")


def _explain(error: RuntimeError, inputs: Sequence[str | Path], vocab_size: int) -> Exception:
    limit = re.search(
        r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", str(error)
    )
    if limit is None:
        return error
    return ValueError(
        f"vocab_size={vocab_size} is too large for the corpus {', '.join(map(str, inputs))}: "
        f"sentencepiece can learn at most {limit.group(1)} pieces from it; pass "
        f"--vocab-size {limit.group(1)} or less, or add more text"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="attnres-train-tokenizer",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  attnres-train-tokenizer web.jsonl --model-prefix tok/web32k --vocab-size 32000\n"
            "  attnres-train-tokenizer shard-*.parquet --text-key content \\\n"
            "      --model-prefix tok/code --vocab-size 64000 --num-threads 16\n"
            "  attnres-train-tokenizer notes.txt --txt-split line --model-prefix tok/small "
            "--vocab-size 2048"
        ),
    )
    parser.add_argument("inputs", nargs="+", type=Path, help=".txt, .jsonl/.json or .parquet")
    parser.add_argument("--model-prefix", type=Path, required=True, help="writes PREFIX.model")
    parser.add_argument("--vocab-size", type=int, default=32000, help="pieces (default 32000)")
    parser.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    parser.add_argument("--text-key", default="text", help="text column of .jsonl/.parquet")
    parser.add_argument(
        "--txt-split",
        choices=TXT_SPLITS,
        default="paragraph",
        help="how .txt files are cut into documents (default: blank lines)",
    )
    parser.add_argument("--character-coverage", type=float, default=0.9995)
    parser.add_argument(
        "--num-threads",
        type=int,
        default=1,
        help="sentencepiece threads; the model depends on it (default 1)",
    )
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    model = train_tokenizer(
        args.inputs,
        args.model_prefix,
        args.vocab_size,
        text_key=args.text_key,
        txt_split=args.txt_split,
        model_type=args.model_type,
        character_coverage=args.character_coverage,
        num_threads=args.num_threads,
        seed=args.seed,
    )
    tokenizer = load_tokenizer(model)
    print(f"tokenizer: {model} (vocab_size {tokenizer.vocab_size}, eod {tokenizer.eod})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
