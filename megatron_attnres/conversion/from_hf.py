"""`attnres-convert-from-hf`: a Hugging Face folder (our export, or a Kimi Linear checkpoint
with MLA and KDA layers) -> a Megatron dist checkpoint to continue training from.

    attnres-convert-from-hf --hf hf/tiny --output ckpt/tiny --tp 2 --pp 1 --ep 2
    attnres-train --config ckpt/tiny/config.yaml --load ckpt/tiny --data-path ... \\
        --tokenizer-model ckpt/tiny/tokenizer.model

Writes OUTPUT/iter_0000000 (model weights only, every tensor under its global name, so any
TP/PP/EP layout loads it; the trainer starts a fresh optimizer at step 0), the tracker file, and
OUTPUT/config.yaml: the model's run config with the requested parallel sizes (checked against the
model before anything is written). Memory: the whole model once (tensors are read shard by shard
but Megatron's writer takes them all at once).
"""

import argparse
import dataclasses
import json
import re
import shutil
import sys
from itertools import dropwhile
from pathlib import Path

import torch
import torch.distributed
from safetensors import safe_open

from megatron_attnres.checkpoint.format import model_signature
from megatron_attnres.config.load import check_run_config, dump
from megatron_attnres.config.megatron import layer_pattern, transformer_config
from megatron_attnres.config.run import RunConfig
from megatron_attnres.conversion.config_map import ConversionError, run_fields
from megatron_attnres.conversion.hf.configuration_attnres import AttnResConfig
from megatron_attnres.conversion.key_table import key_table
from megatron_attnres.conversion.megatron_io import CONFIG, one_rank_process_group, write_model_only
from megatron_attnres.conversion.output import human, staged_output
from megatron_attnres.conversion.to_hf import INDEX, expected_hf_shapes
from megatron_attnres.mcore.model import check_pattern, pipeline_pattern

MODEL_TYPES = ("kimi_attnres", "kimi_linear")
# transformers' kimi_linear saves a dense layer's MLP under block_sparse_moe (it renames every
# `.mlp.` back on save); Kimi Linear's released checkpoints and our export use `mlp.`.
DENSE_ALIAS = re.compile(r"\.block_sparse_moe\.(gate|up|down)_proj\.")
NOT_CONFIG = ("model_type", "architectures", "auto_map", "transformers_version")


def read_hf_config(folder: Path) -> AttnResConfig:
    path = folder / "config.json"
    if not path.is_file():
        raise ConversionError(f"{path} does not exist; --hf must be a Hugging Face model folder")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConversionError(f"{path} is not valid JSON: {error}") from None
    model_type = values.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConversionError(
            f"{path}: model_type {model_type!r} is not a supported architecture; this converter "
            f"reads {MODEL_TYPES} (our export, or Kimi Linear)"
        )
    fields = {k: v for k, v in values.items() if k not in NOT_CONFIG}
    if model_type == "kimi_linear":
        fields = kimi_linear_fields(fields, path)
    try:
        return AttnResConfig(**fields)
    except (TypeError, ValueError) as error:
        raise ConversionError(f"{path}: {error}") from None


def kimi_linear_fields(fields: dict, path: Path) -> dict:
    """transformers' KimiLinearConfig states dense-then-MoE as mlp_layer_types and may keep the
    KDA sizes only at the top level (linear_num_heads, ...); AttnRes is off."""
    fields = dict(fields, attn_res_mode="none")
    mlp_types = fields.pop("mlp_layer_types", None)
    if mlp_types is not None and "first_k_dense_replace" not in fields:
        dense = len(mlp_types) - len(list(dropwhile(lambda t: t == "dense", mlp_types)))
        if "dense" in mlp_types[dense:]:
            raise ConversionError(
                f"{path}: mlp_layer_types {mlp_types} has a dense layer after a sparse one; the "
                "converter needs the dense layers first (first_k_dense_replace)"
            )
        fields["first_k_dense_replace"] = dense
    lin = dict(fields.get("linear_attn_config") or {})
    for key, top in (
        ("num_heads", "linear_num_heads"),
        ("head_dim", "linear_head_dim"),
        ("short_conv_kernel_size", "linear_conv_kernel_dim"),
    ):
        if key not in lin and top in fields:
            lin[key] = fields[top]
    if lin:
        fields["linear_attn_config"] = lin
    return fields


class HFWeights:
    """Names and shapes of a folder's safetensors files (headers only until read)."""

    def __init__(self, folder: Path):
        index = folder / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (folder / "model.safetensors").is_file():
            weight_map = None
        else:
            raise ConversionError(
                f"{folder} has neither {INDEX} nor model.safetensors; it holds "
                "no safetensors weights (export with safe_serialization)"
            )
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        for name in files:
            if not (folder / name).is_file():
                raise ConversionError(
                    f"weight file {folder / name} named by {index} is missing; "
                    "download or copy the complete folder"
                )
        self.file_of, self.shape, self.stored = {}, {}, {}
        for name in files:
            try:
                with safe_open(folder / name, framework="pt") as f:
                    for stored in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                        key = DENSE_ALIAS.sub(r".mlp.\1_proj.", stored)
                        self.stored[key], self.file_of[key] = stored, folder / name
                        self.shape[key] = torch.Size(f.get_slice(stored).get_shape())
            except Exception as error:  # a truncated or foreign file
                raise ConversionError(f"cannot read {folder / name}: {error}") from None
        if weight_map and set(weight_map) != set(self.stored.values()):
            raise ConversionError(
                f"{index} and the safetensors files list different tensors: "
                f"{sorted(set(weight_map) ^ set(self.stored.values()))[:5]}"
            )

    def read(self, key: str) -> torch.Tensor:
        with safe_open(self.file_of[key], framework="pt") as f:
            return f.get_tensor(self.stored[key])


def check_weights(weights: HFWeights, cfg: AttnResConfig, folder: Path) -> None:
    expected = expected_hf_shapes(cfg)
    missing = sorted(set(expected) - set(weights.shape))
    extra = sorted(set(weights.shape) - set(expected))
    wrong = [
        (k, list(weights.shape[k]), list(v))
        for k, v in expected.items()
        if k in weights.shape and weights.shape[k] != v
    ]
    if missing or extra or wrong:
        raise ConversionError(
            f"{folder}: the weights do not match config.json: missing {missing[:5]}, unexpected "
            f"{extra[:5]}, wrong shapes (name, found, config) {wrong[:3]}"
        )


def megatron_run_config(cfg: AttnResConfig, tp: int, pp: int, ep: int) -> RunConfig:
    """The run config of the model, with the layout checked as the trainer would."""
    run = RunConfig(
        **run_fields(cfg),
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        sequence_parallel=tp > 1,
    )
    try:
        check_run_config(run)
        config = transformer_config(run)
        check_pattern(config, pipeline_pattern(config, layer_pattern(run)))
    except ValueError as error:
        raise ConversionError(f"layout TP={tp} PP={pp} EP={ep}: {error}") from None
    if cfg.vocab_size % tp:
        raise ConversionError(
            f"vocab_size={cfg.vocab_size} is not divisible by TP={tp}; choose "
            "a tensor-parallel size that divides it"
        )
    return run


def signature(run: RunConfig) -> dict:
    """The model fields the trainer records in its checkpoints and checks on load."""
    return model_signature(
        transformer_config(run),
        layer_pattern(run),
        run.vocab_size,
        tied_embeddings=not run.untie_embeddings_and_output_weights,
    )


def convert_from_hf(
    hf, output, *, tp: int = 1, pp: int = 1, ep: int = 1, overwrite: bool = False, log=print
) -> Path:
    folder, out = Path(hf), Path(output).absolute()
    cfg = read_hf_config(folder)
    run = megatron_run_config(cfg, tp, pp, ep)
    weights = HFWeights(folder)
    check_weights(weights, cfg, folder)
    rows = key_table(cfg)
    total = 0
    log(f"converting {folder} ({len(rows)} Megatron tensors) -> {out} (TP={tp} PP={pp} EP={ep})")
    tensors = {}
    for i, row in enumerate(rows, start=1):
        tensors[row.megatron] = row.to_megatron([weights.read(name) for name in row.hf])
        total += tensors[row.megatron].nbytes
        if i % 200 == 0 or i == len(rows):
            log(f"  read {i}/{len(rows)} tensors ({human(total)})")
    tokenizer = folder / "tokenizer.model"
    with staged_output(out, overwrite) as staging:
        started = one_rank_process_group()
        try:
            write_model_only(tensors, staging, common={"model_config": signature(run)})
        finally:
            if started:  # leave no global state behind when used as a library
                torch.distributed.destroy_process_group()
        if tokenizer.is_file():
            shutil.copyfile(tokenizer, staging / "tokenizer.model")
            run = dataclasses.replace(run, tokenizer_model=str(out / "tokenizer.model"))
        (staging / CONFIG).write_text(dump(run))
    log(
        f"wrote {out}; continue training with:\n  attnres-train --config {out / CONFIG} --load "
        f"{out} --data-path PREFIX [--tokenizer-model MODEL]"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="attnres-convert-from-hf",
        description="Import a Hugging Face folder (an attnres export, or Kimi Linear) as a "
        "Megatron dist checkpoint to continue training.",
    )
    parser.add_argument("--hf", required=True, help="Hugging Face model folder")
    parser.add_argument("--output", required=True, help="new directory for the checkpoint")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size to train with")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to train with")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size to train with")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    args = parser.parse_args(argv)
    try:
        convert_from_hf(
            args.hf, args.output, tp=args.tp, pp=args.pp, ep=args.ep, overwrite=args.overwrite
        )
    except ConversionError as error:
        print(f"attnres-convert-from-hf: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
