"""Preprocessing: the indexed dataset holds exactly the tokenizer's encoding of each document."""

import json

import datasets
import numpy as np
import pytest
import sentencepiece as spm
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_attnres.data import builtin_corpus_path
from megatron_attnres.data.preprocess import builtin_documents, main, preprocess

DOCS = {
    "txt": [
        "First paragraph.\nStill the first.",
        "def f(x):\n    return x  # indented",
        "Ünïcødé ✓",
    ],
    "jsonl": ["A json document.", "   ", "Another one\twith a tab.", ""],  # blanks are dropped
    "parquet": ["Parquet row one.", "Parquet row two, with digits 12345."],
}


def _write_inputs(root):
    txt = root / "docs.txt"
    txt.write_text("\n\n".join(DOCS["txt"]), encoding="utf-8")
    jsonl = root / "docs.jsonl"
    jsonl.write_text(
        "".join(json.dumps({"content": d, "id": i}) + "\n" for i, d in enumerate(DOCS["jsonl"]))
    )
    parquet = root / "docs.parquet"
    datasets.Dataset.from_dict({"content": DOCS["parquet"]}).to_parquet(str(parquet))
    return [txt, jsonl, parquet]


def _expected_ids(model_path, docs):
    oracle = spm.SentencePieceProcessor(model_file=str(model_path))
    return [oracle.encode(d) + [oracle.eos_id()] for d in docs if d.strip()]


def _read_back(prefix):
    dataset = IndexedDataset(str(prefix))
    return [dataset[i].tolist() for i in range(len(dataset))], dataset.index.dtype


def test_round_trip_txt_jsonl_parquet(builtin_data, tmp_path):
    inputs = _write_inputs(tmp_path)
    model = builtin_data.tokenizer_model
    summary = preprocess(inputs, tmp_path / "out" / "mixed", model, text_key="content")
    expected = _expected_ids(model, DOCS["txt"] + DOCS["jsonl"] + DOCS["parquet"])
    got, dtype = _read_back(summary.path_prefix)
    assert got == expected
    assert dtype == np.uint16  # Megatron's choice below 65500 pieces
    assert (summary.documents, summary.tokens) == (len(expected), sum(map(len, expected)))
    assert summary.bin_path.is_file() and summary.idx_path.is_file()
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_parallel_map_writes_the_same_files(builtin_data, tmp_path):
    docs = [f"document {i}: " + "word " * (i % 7) for i in range(60)]
    source = tmp_path / "many.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    model = builtin_data.tokenizer_model
    one = preprocess([source], tmp_path / "one", model, batch_size=8)
    two = preprocess([source], tmp_path / "two", model, num_proc=2, batch_size=8)
    assert one.bin_path.read_bytes() == two.bin_path.read_bytes()
    assert one.idx_path.read_bytes() == two.idx_path.read_bytes()
    assert _read_back(one.path_prefix)[0] == _expected_ids(model, docs)


def test_builtin_data_is_the_corpus_cut_into_topics(builtin_data):
    assert "\n\n".join(builtin_documents()) == builtin_corpus_path().read_text().strip("\n")
    got, _ = _read_back(builtin_data.data_prefix)
    assert len(got) == 79
    assert got == _expected_ids(builtin_data.tokenizer_model, builtin_documents())


def test_cli(builtin_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0 and "examples:" in capsys.readouterr().out
    txt = tmp_path / "lines.txt"
    txt.write_text("one line\nanother line\n")
    prefix = tmp_path / "cli"
    argv = [str(txt), "--txt-split", "line", "--output-prefix", str(prefix)]
    assert main([*argv, "--tokenizer-model", str(builtin_data.tokenizer_model)]) == 0
    assert "wrote 2 documents" in capsys.readouterr().out
    assert _read_back(prefix)[0] == _expected_ids(
        builtin_data.tokenizer_model, ["one line", "another line"]
    )
    with pytest.raises(SystemExit):
        main([str(txt)])
