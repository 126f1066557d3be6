"""`attnres-convert-to-hf`: a Megatron dist checkpoint (any TP/PP/EP layout) -> a Hugging Face
folder that `AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)` loads.

    attnres-convert-to-hf --checkpoint runs/tiny/checkpoints --output hf/tiny

Writes config.json (Kimi Linear's keys, the AttnRes keys, auto_map), configuration_attnres.py and
modeling_attnres.py, model-0000k-of-0000n.safetensors with model.safetensors.index.json,
generation_config.json and the tokenizer (tokenizer.json for AutoTokenizer, tokenizer.model).
Streaming: one shard's tensors are in memory at a time. Everything is checked (files, config
against tensor shapes, tokenizer) before the first byte is written, and the output folder
appears only when complete.
"""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import GenerationConfig

from megatron_attnres.conversion.config_map import ConversionError, hf_config
from megatron_attnres.conversion.hf import AUTO_MAP, MODELING_FILES
from megatron_attnres.conversion.hf.configuration_attnres import AttnResConfig
from megatron_attnres.conversion.hf.modeling_attnres import AttnResForCausalLM
from megatron_attnres.conversion.key_table import Row, key_table
from megatron_attnres.conversion.megatron_io import (
    MegatronCheckpoint,
    checkpoint_run_config,
    resolve_checkpoint,
)
from megatron_attnres.conversion.output import human, parse_size, staged_output
from megatron_attnres.conversion.tokenizer_export import export_tokenizer, token_ids

INDEX = "model.safetensors.index.json"
MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")
UMASK = os.umask(0o022)
os.umask(UMASK)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def expected_hf_shapes(cfg: AttnResConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = AttnResForCausalLM(cfg)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def model_tensor_keys(checkpoint: MegatronCheckpoint) -> set[str]:
    """The model's tensors in a checkpoint: HybridModel's top-level modules (the optimizer's
    state is stored as optimizer.* or, with expert parallelism, chained_N.optimizer.*)."""
    return {k for k in checkpoint.tensors if k.startswith(MODEL_PREFIXES)}


def check_against_config(rows: list[Row], checkpoint: MegatronCheckpoint, cfg, source) -> None:
    """Every row's tensor exists with the shape the config implies; nothing is left over."""
    expected, produced = expected_hf_shapes(cfg), set()
    for row in rows:
        if row.megatron not in checkpoint.tensors:
            raise ConversionError(
                f"checkpoint {checkpoint.path} has no tensor {row.megatron}, which {source} "
                "implies; the config does not belong to this checkpoint (pass --config with the "
                "run's config.yaml)"
            )
        meta = torch.empty(checkpoint.shape(row.megatron), device="meta")
        for name, tensor in zip(row.hf, row.to_hf(meta), strict=True):
            if name not in expected or tensor.shape != expected[name]:
                raise ConversionError(
                    f"checkpoint tensor {row.megatron} {list(meta.shape)} gives {name} "
                    f"{list(tensor.shape)}, but {source} implies {list(expected.get(name, []))}; "
                    "the config does not belong to this checkpoint (pass --config)"
                )
            produced.add(name)
    extra = sorted(model_tensor_keys(checkpoint) - {row.megatron for row in rows})
    if extra or produced != set(expected):
        raise ConversionError(
            f"checkpoint {checkpoint.path} and {source} disagree: tensors the config does not "
            f"describe {extra[:5]}, weights never produced {sorted(set(expected) - produced)[:5]}; "
            "the config does not belong to this checkpoint (pass --config)"
        )


def plan_shards(rows: list[Row], nbytes: dict[str, int], max_bytes: int) -> list[list[Row]]:
    """Rows packed in order into shards of at most max_bytes (a bigger row gets its own)."""
    shards, size = [[]], 0
    for row in rows:
        if shards[-1] and size + nbytes[row.megatron] > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(row)
        size += nbytes[row.megatron]
    return shards


def find_tokenizer(run, checkpoint: Path, explicit: str | None) -> Path:
    """--tokenizer; else tokenizer.model beside the checkpoints (attnres-convert-from-hf puts it
    there), the run's tokenizer_model, or the built-in corpus's (RUN_DIR/data)."""
    candidates = (
        [explicit] if explicit else [checkpoint.parent / "tokenizer.model", run.tokenizer_model]
    )
    if not explicit and run.data_path == ["builtin"]:
        candidates.append(Path(run.run_dir) / "data" / "tokenizer.model")
    for candidate in filter(None, candidates):
        if Path(candidate).is_file():
            return Path(candidate)
    raise ConversionError(
        f"tokenizer model not found (looked for {[str(c) for c in candidates if c]}); pass "
        "--tokenizer with the sentencepiece .model the run trained on"
    )


def convert_to_hf(
    checkpoint,
    output,
    *,
    config=None,
    tokenizer=None,
    dtype: str = "auto",
    max_shard_size: str = "5GB",
    overwrite: bool = False,
    log=print,
) -> Path:
    path = resolve_checkpoint(checkpoint)
    run = checkpoint_run_config(path, config)
    source = f"run config {config or path.parent / 'config.yaml'}"
    megatron = MegatronCheckpoint(path)
    if "embedding.word_embeddings.weight" not in megatron.tensors:
        raise ConversionError(
            f"{path} has no embedding.word_embeddings.weight; it is not a "
            "checkpoint of an attnres-train model"
        )
    tokenizer_model = find_tokenizer(run, path, tokenizer)
    vocab = megatron.shape("embedding.word_embeddings.weight")[0]
    cfg = hf_config(run, vocab, token_ids(tokenizer_model))
    rows = key_table(cfg)
    check_against_config(rows, megatron, cfg, source)
    cast = None if dtype == "auto" else DTYPES[dtype]
    nbytes = {r.megatron: megatron.nbytes(r.megatron, cast) for r in rows}
    shards = plan_shards(rows, nbytes, parse_size(max_shard_size))
    cfg.dtype = str(cast or megatron.dtype(rows[0].megatron)).removeprefix("torch.")
    log(f"converting {path} ({human(sum(nbytes.values()))}) -> {output}: {len(shards)} shard(s)")
    with staged_output(Path(output), overwrite) as staging:
        weight_map = {}
        for index, shard in enumerate(shards, start=1):
            name = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            loaded = megatron.read([row.megatron for row in shard])
            for row in shard:
                parts = row.to_hf(loaded.pop(row.megatron))
                for hf_name, tensor in zip(row.hf, parts, strict=True):
                    keep = cast is None or hf_name.endswith("e_score_correction_bias")  # fp32
                    tensors[hf_name] = (tensor if keep else tensor.to(cast)).contiguous()
                    weight_map[hf_name] = name
            save_file(tensors, staging / name, metadata={"format": "pt"})
            os.chmod(staging / name, 0o666 & ~UMASK)  # safetensors writes 0600 temp files
            shard_bytes = sum(nbytes[row.megatron] for row in shard)
            log(f"  [{index}/{len(shards)}] {name}: {len(tensors)} tensors, {human(shard_bytes)}")
            del tensors, loaded
        index_json = {"metadata": {"total_size": sum(nbytes.values())}, "weight_map": weight_map}
        (staging / INDEX).write_text(json.dumps(index_json, indent=2) + "\n")
        cfg.auto_map = dict(AUTO_MAP)
        cfg.architectures = ["AttnResForCausalLM"]
        cfg.save_pretrained(staging)
        for source_file in MODELING_FILES:
            shutil.copyfile(source_file, staging / source_file.name)
        GenerationConfig(
            bos_token_id=cfg.bos_token_id,
            eos_token_id=cfg.eos_token_id,
            pad_token_id=cfg.pad_token_id,
        ).save_pretrained(staging)
        export_tokenizer(tokenizer_model, staging, max_length=cfg.max_position_embeddings)
    log(f"wrote {output}")
    return Path(output)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="attnres-convert-to-hf",
        description="Export a Megatron dist checkpoint (any TP/PP/EP layout) to a Hugging Face "
        "folder (trust_remote_code modeling code, sharded safetensors, tokenizer).",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="a save directory (its latest checkpoint) or one iter_* directory",
    )
    parser.add_argument("--output", required=True, help="new directory for the HF folder")
    parser.add_argument(
        "--config",
        help="run config YAML (default: config.yaml beside the "
        "checkpoint, written by attnres-train)",
    )
    parser.add_argument("--tokenizer", help="sentencepiece .model (default: the run's)")
    parser.add_argument(
        "--dtype",
        choices=["auto", *DTYPES],
        default="auto",
        help="weights' dtype in the export (auto: as saved)",
    )
    parser.add_argument("--max-shard-size", default="5GB", help="per safetensors file (5GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    args = parser.parse_args(argv)
    try:
        convert_to_hf(
            args.checkpoint,
            args.output,
            config=args.config,
            tokenizer=args.tokenizer,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
        )
    except ConversionError as error:
        print(f"attnres-convert-to-hf: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
