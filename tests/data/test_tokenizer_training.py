"""Tokenizer training: deterministic, lossless on the built-in corpus, clear errors."""

import json

import pytest
import sentencepiece as spm
from megatron.core.tokenizers import MegatronTokenizerBase

from megatron_attnres.data.preprocess import builtin_documents
from megatron_attnres.data.tokenizer import load_tokenizer, main, train_tokenizer


@pytest.fixture(scope="module")
def corpus_jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"body": d}) + "\n" for d in builtin_documents()))
    return path


def test_training_is_deterministic(corpus_jsonl, tmp_path):
    first = train_tokenizer([corpus_jsonl], tmp_path / "a", 1024, text_key="body")
    second = train_tokenizer([corpus_jsonl], tmp_path / "b", 1024, text_key="body")
    assert _pieces(first) == _pieces(second)  # the files differ only in the recorded prefix


def _pieces(model_path):
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    return [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]


def test_wrapper_is_a_lossless_megatron_tokenizer(builtin_data):
    tokenizer = load_tokenizer(builtin_data.tokenizer_model)
    oracle = spm.SentencePieceProcessor(model_file=str(builtin_data.tokenizer_model))
    assert isinstance(tokenizer, MegatronTokenizerBase)
    assert tokenizer.vocab_size == oracle.get_piece_size() == 2048
    assert (tokenizer.eod, tokenizer.pad) == (oracle.eos_id(), oracle.pad_id()) == (2, 3)
    for doc in builtin_documents()[:20]:
        ids = tokenizer.tokenize(doc)
        assert ids == oracle.encode(doc)
        assert tokenizer.detokenize(ids) == doc


def test_too_large_vocab_names_the_limit(corpus_jsonl, tmp_path):
    with pytest.raises(ValueError, match=r"vocab_size=100000 is too large") as error:
        train_tokenizer([corpus_jsonl], tmp_path / "tok", 100_000, text_key="body")
    assert str(corpus_jsonl) in str(error.value)
    assert "at most" in str(error.value)


def test_bad_inputs_name_the_file_and_the_fix(corpus_jsonl, tmp_path):
    with pytest.raises(ValueError, match=r"no column 'text'.*--text-key") as error:
        train_tokenizer([corpus_jsonl], tmp_path / "tok", 512)
    assert str(corpus_jsonl) in str(error.value) and "body" in str(error.value)
    odd = tmp_path / "notes.docx"
    odd.write_text("x")
    with pytest.raises(ValueError, match=r"notes\.docx.*suffix"):
        train_tokenizer([odd], tmp_path / "tok", 512)
    with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
        train_tokenizer([tmp_path / "missing.txt"], tmp_path / "tok", 512)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n  \n\n")
    with pytest.raises(ValueError, match=r"blank\.txt contain no non-empty document"):
        train_tokenizer([blank], tmp_path / "tok", 512)
    with pytest.raises(FileNotFoundError, match=r"nope\.model"):
        load_tokenizer(tmp_path / "nope.model")


def test_cli(corpus_jsonl, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0 and "examples:" in capsys.readouterr().out
    prefix = tmp_path / "cli" / "tok"
    argv = [str(corpus_jsonl), "--text-key", "body", "--model-prefix", str(prefix)]
    assert main([*argv, "--vocab-size", "700", "--model-type", "unigram"]) == 0
    assert "vocab_size 700" in capsys.readouterr().out
    assert load_tokenizer(prefix.with_suffix(".model")).vocab_size == 700
