"""attnres-convert-to-hf on a checkpoint that attnres-train saved in bf16: the export keeps bf16
weights (the safetensors files and config.json say so; the router's expert-bias buffers stay
fp32), and its logits equal the Megatron
model's (loaded from the checkpoint by Megatron's dist_checkpointing, also in bf16) within the
bf16 tolerance of attnres.tolerances."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from megatron_attnres.attnres.tolerances import tolerance
from megatron_attnres.conversion.megatron_io import MegatronCheckpoint, resolve_checkpoint
from megatron_attnres.conversion.to_hf import convert_to_hf
from tests.conversion.helpers import load_megatron_model, megatron_logits
from tests.training.trainer_runs import train

pytestmark = [pytest.mark.slow]
STEPS = ["--train-iters", "3", "--lr-warmup-iters", "1", "--lr-wsd-decay-iters", "1"]


def test_bf16_export_keeps_bf16_and_matches_megatron(tmp_path, megatron_one_rank, hf_modules_cache):
    run_dir, out = tmp_path / "run", tmp_path / "hf"
    train(run_dir, *STEPS, "--bf16", "true")
    checkpoint = resolve_checkpoint(run_dir / "checkpoints")
    stored = MegatronCheckpoint(checkpoint)
    assert stored.dtype("decoder.depth_reads.5.pseudo_query") == torch.bfloat16
    convert_to_hf(run_dir / "checkpoints", out, log=print)

    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    dtypes, f32 = set(), []
    for shard in out.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            stored_as = {name: f.get_slice(name).get_dtype() for name in f.keys()}  # noqa: SIM118
        dtypes |= set(stored_as.values())
        f32 += [name for name, dtype in stored_as.items() if dtype == "F32"]
    # Every weight is bf16; the router's expert-bias buffers stay fp32, as megatron-core keeps
    # them (their small per-step updates) and as Kimi Linear / DeepSeek-V3 checkpoints store them.
    assert dtypes == {"BF16", "F32"}
    assert f32 and all(k.endswith("gate.e_score_correction_bias") for k in f32), f32

    vocab = stored.shape("embedding.word_embeddings.weight")[0]
    megatron = load_megatron_model(checkpoint, run_dir / "checkpoints" / "config.yaml", vocab)
    assert next(megatron.parameters()).dtype == torch.bfloat16
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert {p.dtype for p in hf.parameters()} == {torch.bfloat16}
    tokens = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    expected = megatron_logits(megatron, tokens).float()
    with torch.no_grad():
        actual = hf(tokens).logits.float()
    assert expected.abs().max() > 1e-2
    tolerance(torch.bfloat16).assert_close(actual, expected, "HF export vs Megatron, bf16")
