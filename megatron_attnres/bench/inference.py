"""Inference: prefill and per-token decode latency of the exported Hugging Face model, AttnRes
(block, two-phase reads; and one-shot reads) vs the standard residual at the same size.

Each model is built from random weights with the exporter's own config mapping
(conversion/config_map.hf_config), saved with `save_pretrained` next to the shipped modeling files
(as an export is) and loaded back with `AutoModelForCausalLM.from_pretrained(...,
trust_remote_code=True)`: what is timed is the folder's own code, no network. Variants are timed
in turn (A B C A B C ...). Decode: greedy, one token per forward with the KV cache.
"""

import shutil
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import torch
import transformers
from transformers import AutoModelForCausalLM

from megatron_attnres.bench.common import (
    device_info,
    header_line,
    interleaved_medians,
    sync,
    table,
)
from megatron_attnres.bench.model_step import TINY, mode_config
from megatron_attnres.config.load import load_run_config
from megatron_attnres.config.megatron import padded_vocab_size
from megatron_attnres.config.run import RunConfig
from megatron_attnres.conversion.config_map import hf_config
from megatron_attnres.conversion.hf import AUTO_MAP, MODELING_FILES
from megatron_attnres.conversion.hf.modeling_attnres import AttnResForCausalLM

VARIANTS = {
    "block two-phase": ("block", True),
    "block one-shot": ("block", False),
    "none": ("none", False),
}


@contextmanager
def exported_models(run: RunConfig, device: str, dtype: torch.dtype):
    """{variant: model loaded through trust_remote_code}, in a temporary folder."""
    vocab = padded_vocab_size(run, run.tokenizer_vocab_size)
    with (
        tempfile.TemporaryDirectory() as tmp,
        mock.patch.object(
            transformers.dynamic_module_utils, "HF_MODULES_CACHE", str(Path(tmp) / "modules")
        ),
    ):  # keep the dynamic-module copies out of $HF_HOME
        models = {}
        for variant, (mode, two_phase) in VARIANTS.items():
            folder = Path(tmp) / variant.replace(" ", "_")
            torch.manual_seed(run.seed)
            config = hf_config(mode_config(run, mode), vocab)
            config.attn_res_two_phase = two_phase
            config.auto_map = dict(AUTO_MAP)
            AttnResForCausalLM(config).save_pretrained(folder)
            for source in MODELING_FILES:
                if source.exists():
                    shutil.copy(source, folder / source.name)
            model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
            models[variant] = model.to(device, dtype).eval()
        yield models, vocab


def _prefill(model, prompt):
    def run():
        with torch.no_grad():
            model(prompt, use_cache=True)

    return run


def _decode(model, prompt, new_tokens: int, device: str, per_token: list):
    """Prefill, then time `new_tokens` greedy steps; appends seconds per token to `per_token`."""

    def run():
        with torch.no_grad():
            out = model(prompt, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            sync(device)
            start = time.perf_counter()
            for _ in range(new_tokens):
                out = model(token, past_key_values=cache, use_cache=True)
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            sync(device)
            per_token.append((time.perf_counter() - start) / new_tokens)

    return run


def run_inference(
    device: str = "cpu",
    quick: bool = False,
    config: str | None = None,
    overrides: dict | None = None,
) -> dict:
    info = device_info(device)
    run = load_run_config(config or TINY, overrides or {})
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    prompt_len, new_tokens = (64, 8) if quick else (run.seq_length, 32)
    reps = 3 if quick else 7
    with exported_models(run, device, dtype) as (models, vocab):
        prompt = torch.randint(0, vocab, (1, prompt_len), device=device)
        prefill = interleaved_medians(
            {v: _prefill(m, prompt) for v, m in models.items()}, device, warmup=1, reps=reps
        )
        steps = {variant: [] for variant in models}
        interleaved_medians(
            {v: _decode(m, prompt, new_tokens, device, steps[v]) for v, m in models.items()},
            device,
            warmup=1,
            reps=reps,
        )
    decode = {v: statistics.median(times[1:]) for v, times in steps.items()}  # after warm-up
    rows, records = [], []
    for variant in models:
        per_token = decode[variant]
        record = dict(
            variant=variant,
            prefill_ms=1e3 * prefill[variant],
            decode_ms_per_token=1e3 * per_token,
            prefill_vs_none=prefill[variant] / prefill["none"],
            decode_vs_none=per_token / decode["none"],
        )
        records.append(record)
        rows.append(
            [
                variant,
                record["prefill_ms"],
                record["prefill_vs_none"],
                record["decode_ms_per_token"],
                record["decode_vs_none"],
            ]
        )
    text = table(
        f"inference: exported HF model (hidden {run.hidden_size}, {run.num_layers} layers), "
        f"prompt {prompt_len}, {new_tokens} decoded tokens, batch 1",
        ["variant", "prefill ms", "prefill / none", "decode ms/token", "decode / none"],
        rows,
    )
    print(header_line(info) + "\n" + text, flush=True)
    return {"info": info, "prompt": prompt_len, "new_tokens": new_tokens, "results": records}
