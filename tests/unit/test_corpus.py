"""The built-in corpus is committed, deterministic and licensed; the byte tokenizer round-trips."""

import hashlib
from pathlib import Path

from megatron_attnres.data import ByteTokenizer, builtin_corpus_path, builtin_corpus_tokens

DATA = Path(__file__).resolve().parents[2] / "megatron_attnres" / "data"


def test_corpus_is_the_documented_file():
    data = builtin_corpus_path().read_bytes()
    assert len(data) == 493_421  # the size stated in CORPUS.md
    assert "493,421 bytes" in (DATA / "CORPUS.md").read_text()
    assert (
        "PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2" in (DATA / "CORPUS_LICENSE.txt").read_text()
    )
    digest = hashlib.sha256(data).hexdigest()
    assert f"sha256 {digest}" in (DATA / "CORPUS.md").read_text().replace("\n", " ")


def test_tokens_are_the_bytes():
    tokens = builtin_corpus_tokens()
    data = builtin_corpus_path().read_bytes()
    assert tokens.shape == (len(data),)
    assert bytes(tokens[:1000].astype("uint8").tolist()) == data[:1000]
    assert int(tokens.max()) < ByteTokenizer.vocab_size


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "Depth attention über Schichten: λ → softmax"
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids + [tok.eod]) == text
