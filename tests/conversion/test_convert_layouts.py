"""attnres-convert-to-hf on checkpoints that attnres-train saved with (TP, PP, EP) = (1,1,1),
(2,1,1), (1,2,1), (1,1,2) and (1,2,2) after a few steps (non-zero pseudo-queries):
`AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)` gives the Megatron model's
logits (the oracle: Megatron's own one-rank model, loaded from the checkpoint by Megatron's
dist_checkpointing, not by the converter), its tokenizer encodes as sentencepiece does, greedy
generation with the KV cache equals generation without it, and Megatron -> HF -> Megatron is
bitwise."""

from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron_attnres.conversion.from_hf import convert_from_hf
from megatron_attnres.conversion.megatron_io import MegatronCheckpoint, resolve_checkpoint
from megatron_attnres.conversion.to_hf import convert_to_hf, model_tensor_keys
from megatron_attnres.data import builtin_corpus_path
from tests.conversion.helpers import load_megatron_model, megatron_logits
from tests.training.trainer_runs import train

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

# (TP, PP, EP) -> the trainer's overrides (MoE with TP needs sequence parallelism).
LAYOUTS = {
    (1, 1, 1): [],
    (2, 1, 1): ["--tensor-model-parallel-size", "2", "--sequence-parallel", "true"],
    (1, 2, 1): ["--pipeline-model-parallel-size", "2"],
    (1, 1, 2): ["--expert-model-parallel-size", "2"],
    (1, 2, 2): ["--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "2"],
}
MAX_ABS_DIFF = 1e-4  # the bound, fp32 on CPU


def ranks(layout) -> int:
    tp, pp, ep = layout
    return tp * pp * ep  # data-parallel size ep: the experts are split across it


@pytest.fixture(scope="module")
def exported_run(tmp_path_factory):
    """layout -> (run directory after 3 optimizer steps in that layout, its HF export); each
    layout is trained and exported once per module."""
    done = {}

    def get(layout):
        if layout not in done:
            run_dir = tmp_path_factory.mktemp("run")
            steps = ["--train-iters", "3", "--lr-warmup-iters", "1", "--lr-wsd-decay-iters", "1"]
            train(run_dir, *steps, *LAYOUTS[layout], ranks=ranks(layout))
            out = tmp_path_factory.mktemp("hf") / "export"
            convert_to_hf(run_dir / "checkpoints", out, max_shard_size="200KB", log=print)
            done[layout] = run_dir, out
        return done[layout]

    return get


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=lambda x: "tp{}_pp{}_ep{}".format(*x))
def test_export_matches_the_megatron_model(
    layout, exported_run, megatron_one_rank, hf_modules_cache
):
    run_dir, exported = exported_run(layout)
    checkpoint = resolve_checkpoint(run_dir / "checkpoints")
    pseudo_queries = MegatronCheckpoint(checkpoint).read(["decoder.depth_reads.5.pseudo_query"])
    assert pseudo_queries["decoder.depth_reads.5.pseudo_query"].abs().max() > 0  # trained
    vocab = MegatronCheckpoint(checkpoint).shape("embedding.word_embeddings.weight")[0]
    megatron = load_megatron_model(checkpoint, run_dir / "checkpoints" / "config.yaml", vocab)
    hf = AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True).eval()
    assert type(hf).__module__.startswith("transformers_modules")  # the folder's own code
    assert len(list(exported.glob("model-*-of-*.safetensors"))) > 1  # sharded, with the index
    tokens = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(layout[0]))
    expected = megatron_logits(megatron, tokens)
    with torch.no_grad():
        actual = hf(tokens).logits
    assert actual.shape == expected.shape
    diff = (actual - expected).abs().max().item()
    assert diff < MAX_ABS_DIFF, f"layout {layout}: max |HF - Megatron| = {diff}"
    assert expected.abs().max() > 1e-2  # not two zero outputs


def test_tokenizer_and_cached_generation(exported_run, hf_modules_cache):
    """One layout: the tokenizer and generation do not depend on it."""
    run_dir, exported = exported_run((1, 1, 1))
    sp = spm.SentencePieceProcessor(model_file=str(run_dir / "data" / "tokenizer.model"))
    tokenizer = AutoTokenizer.from_pretrained(exported, trust_remote_code=True)
    text = builtin_corpus_path().read_text(encoding="utf-8")[:20000]
    pieces = [text[i : i + 1000] for i in range(0, len(text), 1000)]
    pieces += ["  two leading spaces", "tabs\tand\nnewlines\n\n", "Ünïcödé → 世界 🙂", "x = 12345"]
    for piece in pieces:
        ids = sp.encode(piece)
        assert tokenizer(piece, add_special_tokens=False)["input_ids"] == ids, repr(piece[:40])
        assert tokenizer.decode(ids) == sp.decode(ids) == piece
    assert tokenizer.eos_token_id == sp.eos_id() and tokenizer.bos_token_id == sp.bos_id()

    model = AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True).eval()
    prompt = tokenizer("The assert statement", return_tensors="pt")["input_ids"]
    outputs = [
        model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=cache)
        for cache in (True, False)
    ]
    assert outputs[0].shape[1] > prompt.shape[1]
    assert torch.equal(outputs[0], outputs[1])


def test_megatron_to_hf_to_megatron_is_bitwise(exported_run, tmp_path):
    """The most sharded layout (4 ranks' files): the reader is layout-independent."""
    run_dir, exported = exported_run((1, 2, 2))
    back = convert_from_hf(exported, tmp_path / "megatron", log=lambda _: None)
    original = MegatronCheckpoint(resolve_checkpoint(run_dir / "checkpoints"))
    again = MegatronCheckpoint(resolve_checkpoint(back))
    keys = sorted(model_tensor_keys(original))
    assert keys == sorted(model_tensor_keys(again))
    for key in keys:  # one tensor at a time
        a, b = original.read([key])[key], again.read([key])[key]
        assert a.dtype == b.dtype and torch.equal(a, b), key
    assert (
        Path(back / "tokenizer.model").read_bytes() == (exported / "tokenizer.model").read_bytes()
    )


def test_training_continues_from_an_import(exported_run, tmp_path):
    """attnres-train --load on attnres-convert-from-hf's output: a frozen step (lr 0, no
    expert-bias update) must leave exactly the imported weights in the run's checkpoint."""
    _, exported = exported_run((1, 1, 1))
    imported = convert_from_hf(exported, tmp_path / "imported", log=lambda _: None)
    frozen = [
        "--lr",
        "0",
        "--min-lr",
        "0",
        "--lr-warmup-iters",
        "0",
        "--lr-wsd-decay-iters",
        "1",
        "--moe-router-bias-update-rate",
        "0",
        "--vocab-size",
        "1024",
    ]
    run_dir = tmp_path / "run"
    done = train(run_dir, *frozen, "--train-iters", "1", "--load", str(imported))
    assert "a model-only checkpoint" in done.stdout and "model config" not in done.stdout
    source = MegatronCheckpoint(resolve_checkpoint(imported))
    trained = MegatronCheckpoint(resolve_checkpoint(run_dir / "checkpoints"))
    keys = sorted(model_tensor_keys(source))
    assert keys == sorted(model_tensor_keys(trained))
    changed = [k for k in keys if not torch.equal(source.read([k])[k], trained.read([k])[k])]
    assert changed == []
