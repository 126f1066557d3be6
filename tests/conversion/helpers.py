"""Helpers of the conversion tests.

The Megatron side: a one-rank HybridModel built from a checkpoint's run config and loaded from
the checkpoint through megatron.core.dist_checkpointing (the trainer's own path, so a checkpoint
saved with any TP/PP/EP layout is resharded by Megatron itself, independently of the converter's
own reader)."""

import dataclasses
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_attnres.config.load import load_run_config
from megatron_attnres.config.megatron import layer_pattern, transformer_config
from megatron_attnres.config.run import RunConfig
from megatron_attnres.mcore.model import build_model_chunks


def one_rank(run: RunConfig) -> RunConfig:
    return dataclasses.replace(
        run,
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None,
        expert_model_parallel_size=1,
        sequence_parallel=False,
        use_distributed_optimizer=False,
    )


def build_one_rank_model(run: RunConfig, vocab_size: int):
    run = one_rank(run)
    (model,) = build_model_chunks(
        transformer_config(run),
        layer_pattern(run),
        vocab_size,
        run.seq_length,
        share_embeddings_and_output_weights=not run.untie_embeddings_and_output_weights,
    )
    return model.eval()


def model_template(model) -> dict:
    """The model's sharded state dict without its (empty, local-spec) `_extra_state` objects."""
    return {
        k: v
        for k, v in model.sharded_state_dict().items()
        if not (isinstance(v, ShardedObject) and v.key.endswith("_extra_state"))
    }


def load_megatron_model(iter_dir: Path, config: Path, vocab_size: int):
    model = build_one_rank_model(load_run_config(config), vocab_size)
    state = dist_checkpointing.load({"model": model_template(model)}, str(iter_dir))
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), missing
    return model


def megatron_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, None)


def randomise_hf(model: torch.nn.Module) -> torch.nn.Module:
    """Non-zero pseudo-queries, non-trivial norm gains and expert biases (in place); also for
    transformers' own Kimi Linear models (which have no pseudo-queries)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "res_proj" in name:
                param.normal_(0.0, 0.5)
            elif "norm" in name:
                param.uniform_(0.5, 1.5)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0.0, 0.1)
    return model
