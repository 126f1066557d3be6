"""The built-in corpus (see CORPUS.md) and a byte-level tokenizer for it."""

from importlib import resources
from pathlib import Path

import numpy as np

BUILTIN_CORPUS = "builtin_corpus.txt"


def builtin_corpus_path() -> Path:
    """Path of the committed built-in corpus file."""
    return Path(str(resources.files(__name__).joinpath(BUILTIN_CORPUS)))


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255; id 256 marks end of document. Lossless and stateless."""

    vocab_size = 257
    eod = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def builtin_corpus_tokens() -> np.ndarray:
    """The built-in corpus as a uint16 array of byte-token ids."""
    data = builtin_corpus_path().read_bytes()
    return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)
