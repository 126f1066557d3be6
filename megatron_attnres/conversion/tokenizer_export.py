"""The run's sentencepiece model as a Hugging Face fast tokenizer (tokenizer.json), so that
`AutoTokenizer.from_pretrained(export)` encodes and decodes exactly as sentencepiece does.

Our tokenizers (attnres-train-tokenizer) are sentencepiece BPE with byte fallback, identity
normalisation and the dummy prefix: the same BPE (vocabulary and score-ordered merges, which
transformers' own converter extracts), "▁" for spaces, a "▁" prefix, byte-fallback pieces, and
the reverse on decoding. The .model file is copied too, for sentencepiece users.
"""

import shutil
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2
from tokenizers import Tokenizer, decoders, models, normalizers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import SentencePieceExtractor

from megatron_attnres.conversion.config_map import ConversionError, TokenIds

BPE_MODEL_TYPE = 2  # sentencepiece TrainerSpec.ModelType.BPE


def token_ids(model_path: Path) -> TokenIds:
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    ids = (sp.bos_id(), sp.eos_id(), sp.pad_id())
    return TokenIds(*(i if i >= 0 else None for i in ids))


def _fast_tokenizer(model_path: Path) -> Tokenizer:
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_path.read_bytes())
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    if spec.model_type != BPE_MODEL_TYPE or norm.name != "identity" or norm.precompiled_charsmap:
        raise ConversionError(
            f"tokenizer {model_path}: only sentencepiece BPE models with identity normalisation "
            "(what attnres-train-tokenizer trains) are exported as tokenizer.json; pass "
            "--tokenizer with such a model, or convert yours with transformers' own tools"
        )
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    merges = SentencePieceExtractor(str(model_path)).extract(models.BPE)["merges"]
    bpe = models.BPE(vocab, merges, unk_token=spec.unk_piece, fuse_unk=True, byte_fallback=True)
    tokenizer = Tokenizer(bpe)
    steps = [normalizers.Replace(" ", "▁")]
    strip = []
    if norm.add_dummy_prefix:
        steps.insert(0, normalizers.Prepend("▁"))
        strip = [decoders.Strip(" ", 1, 0)]
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip]
    )
    return tokenizer


def export_tokenizer(model_path: Path, out: Path, max_length: int) -> None:
    """Write tokenizer.json, tokenizer_config.json (and special tokens) and tokenizer.model."""
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    piece = {i: sp.id_to_piece(i) for i in (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id())}
    special = dict(
        unk_token=sp.unk_id(), bos_token=sp.bos_id(), eos_token=sp.eos_id(), pad_token=sp.pad_id()
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=_fast_tokenizer(model_path),
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
        **{name: piece[i] for name, i in special.items() if i >= 0},
    )
    hf.save_pretrained(out)
    shutil.copyfile(model_path, out / "tokenizer.model")
