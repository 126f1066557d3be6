"""`attnres-ablate`: the paper's residual ablation at small scale, one command.

    attnres-ablate --preset cpu-smoke --output runs/ablate-smoke          # < 5 minutes, 2 cores
    attnres-ablate --preset cpu-study --seeds 3 --output runs/ablate-study  # < 60 minutes
    attnres-ablate --preset gpu-25min --output runs/ablate-gpu             # one CUDA GPU
    attnres-ablate --preset cpu-study --data my_texts/*.jsonl --output runs/ablate-mine

Trains three variants of one small MoE model on the same data, token budget and seeds:
`none` (the standard residual), `block` (Block AttnRes) and `full` (Full AttnRes). Every run is
an ordinary `attnres-train` process with its own run directory under OUTPUT/runs/VARIANT-sSEED;
the only config keys that differ between the variants are the AttnRes ones. Then it writes
OUTPUT/results.md and OUTPUT/results.json (final validation loss, mean and standard deviation
per variant) and the figures in OUTPUT/plots (ablate_report.py).

Data: the built-in corpus by default (a tokenizer is trained and the text preprocessed once into
OUTPUT/data). `--data FILE...` uses local .txt / .jsonl / .parquet files instead (read with
`datasets`; JSONL and Parquet take the `--text-key` column), tokenised the same way, so a larger
local dataset changes nothing else.

Nothing is lost on a crash or Ctrl-C: a run whose metrics already hold its final record is
reused when the same command is started again with the same OUTPUT (a changed preset, seed count
or data is refused, so results never mix); an unfinished run is started again from scratch.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from megatron_attnres.config.load import FIELDS
from megatron_attnres.config.run import RunConfig

VARIANTS = {
    "none": {"enable_attention_residuals": False},
    "block": {"enable_attention_residuals": True, "attn_res_mode": "block"},
    "full": {"enable_attention_residuals": True, "attn_res_mode": "full"},
}

_MOE = {
    "num_experts": 4,
    "moe_first_k_dense": 1,
    "moe_router_topk": 2,
    "moe_router_score_function": "sigmoid",
    "moe_router_enable_expert_bias": True,
    "moe_router_topk_scaling_factor": 2.5,
    "moe_aux_loss_coeff": 0.001,
}
_CPU = {
    "hidden_size": 64,
    "ffn_hidden_size": 128,
    "num_attention_heads": 4,
    "num_query_groups": 2,
    "seq_length": 128,
    "moe_ffn_hidden_size": 64,
    "moe_shared_expert_intermediate_size": 64,
    "tokenizer_vocab_size": 1024,
    "micro_batch_size": 8,
    "global_batch_size": 8,
    "optimizer": "adam",
    "lr": 3.0e-3,
    "min_lr": 3.0e-4,
    "weight_decay": 0.1,
    "clip_grad": 1.0,
    "lr_decay_style": "WSD",
}


@dataclass(frozen=True)
class Preset:
    description: str
    seeds: int
    config: dict


PRESETS = {
    "cpu-smoke": Preset(
        "4 layers, hidden 64, 40 steps: checks the pipeline end to end (not a result)",
        seeds=1,
        config=_CPU
        | _MOE
        | {
            "num_layers": 4,
            "attn_res_block_layers": 1,
            "train_iters": 40,
            "lr_warmup_iters": 5,
            "lr_wsd_decay_iters": 10,
            "eval_interval": 10,
            "eval_iters": 2,
            "diagnostics_interval": 20,
        },
    ),
    "cpu-study": Preset(
        "8 layers (16 sublayers), hidden 64, 4 depth blocks of 2 layers, 400 steps of 1024 tokens",
        seeds=3,
        config=_CPU
        | _MOE
        | {
            "num_layers": 8,
            "attn_res_block_layers": 2,
            "train_iters": 400,
            "lr_warmup_iters": 40,
            "lr_wsd_decay_iters": 80,
            "eval_interval": 50,
            "eval_iters": 8,
            "diagnostics_interval": 100,
        },
    ),
    "gpu-25min": Preset(
        "12 layers, hidden 512, seq 1024, bf16, 3000 steps of 32k tokens on one CUDA GPU",
        seeds=1,
        config=_MOE
        | {
            "num_layers": 12,
            "hidden_size": 512,
            "ffn_hidden_size": 1536,
            "num_attention_heads": 8,
            "num_query_groups": 4,
            "seq_length": 1024,
            "num_experts": 8,
            "moe_ffn_hidden_size": 512,
            "moe_shared_expert_intermediate_size": 512,
            "attn_res_block_layers": 2,
            "tokenizer_vocab_size": 4096,
            "micro_batch_size": 8,
            "global_batch_size": 32,
            "bf16": True,
            "optimizer": "adam",
            "lr": 1.0e-3,
            "min_lr": 1.0e-4,
            "weight_decay": 0.1,
            "clip_grad": 1.0,
            "lr_decay_style": "WSD",
            "train_iters": 3000,
            "lr_warmup_iters": 200,
            "lr_wsd_decay_iters": 600,
            "eval_interval": 250,
            "eval_iters": 16,
            "diagnostics_interval": 500,
            "peak_tflops": 989,
        },
    ),
}
# Keys every run gets whatever the preset: runs are short and many, so no wandb, no per-run
# plots (the report draws its own) and one checkpoint (at the end).
_RUN_DEFAULTS = {"wandb_mode": "disabled", "plots": False, "save_interval": None}


@dataclass(frozen=True)
class RunSpec:
    variant: str
    seed: int
    run_dir: Path

    @property
    def name(self) -> str:
        return f"{self.variant}-s{self.seed}"


def run_config(base: dict, variant: str, seed: int, data: dict, run_dir: Path) -> dict:
    """The attnres-train config of one run: `base` (the preset with the user's --set keys), the
    variant's AttnRes keys, the data, the seed; nothing else differs between runs."""
    values = dict(base) | _RUN_DEFAULTS | VARIANTS[variant] | data
    values |= {"seed": seed, "run_dir": str(run_dir)}
    unknown = sorted(set(values) - set(FIELDS))
    assert not unknown, f"unknown config keys {unknown}"
    return values


def _records_backwards(run_dir: Path):
    """RUN_DIR/metrics.jsonl's records, last first; a line being written is skipped."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    for line in reversed(lines):
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            continue


def finished(run_dir: Path) -> dict | None:
    """The run's `final` record if it completed (its last record), else None."""
    last = next(_records_backwards(run_dir), None)
    return last if last is not None and last.get("kind") == "final" else None


def _last_train_record(run_dir: Path) -> dict | None:
    return next((r for r in _records_backwards(run_dir) if r.get("kind") == "train"), None)


def _fmt(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else (f"{seconds // 60}m{seconds % 60:02d}s")
    )


def train_one(spec: RunSpec, config: dict, nproc: int, label: str, poll_s: float = 10.0) -> None:
    """Run attnres-train for one variant and seed, logging to RUN_DIR/train.log and printing its
    progress every `poll_s` seconds. Raises RuntimeError (naming the log) when the run fails."""
    if spec.run_dir.exists():  # an unfinished earlier attempt: start it again from scratch
        shutil.rmtree(spec.run_dir)
    spec.run_dir.mkdir(parents=True)
    config_path = spec.run_dir / "ablation.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    command = [
        sys.executable,
        "-m",
        "megatron_attnres.train.trainer",
        "--config",
        str(config_path),
    ]
    if nproc > 1:  # torchrun, one process per GPU (or CPU rank)
        command[1:3] = [
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "--module",
            "megatron_attnres.train.trainer",
        ]
    total = config["train_iters"]
    started = time.monotonic()
    with (spec.run_dir / "train.log").open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        while True:
            try:
                code = process.wait(timeout=poll_s)
                break
            except subprocess.TimeoutExpired:
                record = _last_train_record(spec.run_dir)
                if record:
                    elapsed = time.monotonic() - started
                    eta = elapsed / record["step"] * (total - record["step"])
                    print(
                        f"  {label} {spec.name}: step {record['step']}/{total}, loss "
                        f"{record['loss']:.3f}, {_fmt(elapsed)} elapsed, ~{_fmt(eta)} left",
                        flush=True,
                    )
            except BaseException:
                process.terminate()
                process.wait()
                raise
    (spec.run_dir / "duration_s.txt").write_text(f"{time.monotonic() - started:.1f}\n")
    if code != 0 or finished(spec.run_dir) is None:
        tail = "".join((spec.run_dir / "train.log").read_text().splitlines(True)[-15:])
        raise RuntimeError(
            f"run {spec.name} failed (exit code {code}); its log is {spec.run_dir / 'train.log'}:"
            f"\n{tail}"
        )


def prepare_data(output: Path, vocab_size: int, files: list[str], text_key: str) -> dict:
    """Tokenizer and .bin/.idx data in OUTPUT/data, built once; the config keys pointing at it."""
    from megatron_attnres.data.preprocess import prepare_builtin_data, preprocess
    from megatron_attnres.data.tokenizer import train_tokenizer

    out = output / "data"
    name = "builtin_text_document" if not files else "text_document"
    prefix, model = out / name, out / "tokenizer.model"
    if not (model.is_file() and prefix.with_suffix(".idx").is_file()):
        if not files:
            prepared = prepare_builtin_data(out, vocab_size=vocab_size)
            prefix, model = prepared.data_prefix, prepared.tokenizer_model
        else:
            model = train_tokenizer(files, out / "tokenizer", vocab_size, text_key=text_key)
            prefix = preprocess(files, prefix, model, text_key=text_key).path_prefix
    return {"data_path": [str(prefix)], "tokenizer_model": str(model)}


def check_manifest(output: Path, manifest: dict) -> None:
    """Refuse to mix results: OUTPUT must hold nothing or an ablation with the same settings."""
    path = output / "ablation.json"
    if path.is_file():
        before = json.loads(path.read_text())
        changed = sorted(
            k for k in manifest.keys() | before.keys() if before.get(k) != manifest.get(k)
        )
        if changed:
            detail = "; ".join(f"{k}: {before.get(k)!r} -> {manifest.get(k)!r}" for k in changed)
            raise ValueError(
                f"{output} holds an ablation with other settings ({detail}); give a new --output "
                "or delete that directory to start over"
            )
    elif output.is_dir() and any(output.iterdir()):
        raise ValueError(
            f"{output} is not empty and is not an attnres-ablate output; give a new --output"
        )
    output.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=1) + "\n")


def parse_sets(items: list[str]) -> dict:
    """['train_iters=5', 'lr=1e-3'] -> {'train_iters': 5, 'lr': 0.001} (typed as RunConfig)."""
    from megatron_attnres.config.load import parse_overrides

    argv = []
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set {item!r} is not KEY=VALUE; write e.g. --set train_iters=20")
        key, value = item.split("=", 1)
        argv += [f"--{key}", value]
    return parse_overrides(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnres-ablate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--preset",
        required=True,
        choices=sorted(PRESETS),
        help="; ".join(f"{k}: {v.description}" for k, v in PRESETS.items()),
    )
    parser.add_argument("--output", required=True, help="directory for runs, results and plots")
    parser.add_argument("--seeds", type=int, help="seeds per variant (default: the preset's)")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=list(VARIANTS),
        help="variants to train (default: all three)",
    )
    parser.add_argument(
        "--data",
        nargs="+",
        default=[],
        metavar="FILE",
        help="local .txt/.jsonl/.parquet files instead of the built-in corpus",
    )
    parser.add_argument("--text-key", default="text", help="JSONL/Parquet text column")
    parser.add_argument(
        "--nproc-per-node",
        type=int,
        default=1,
        help="ranks per run (torchrun --standalone when > 1)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a run config key for every variant, e.g. train_iters=20",
    )
    return parser


def _plan(args, output: Path) -> tuple[list[RunSpec], dict]:
    seeds = args.seeds if args.seeds is not None else PRESETS[args.preset].seeds
    if seeds < 1:
        raise ValueError(f"--seeds {seeds}: give at least 1 (3 or more for a standard deviation)")
    for path in args.data:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--data {path}: no such file")
    overrides = parse_sets(args.set)
    specs = [
        RunSpec(variant, 1234 + i, output / "runs" / f"{variant}-s{1234 + i}")
        for i in range(seeds)
        for variant in args.variants
    ]
    manifest = {
        "preset": args.preset,
        "config": PRESETS[args.preset].config | overrides,
        "seeds": seeds,
        "variants": args.variants,
        "data": [str(Path(p).resolve()) for p in args.data] or "builtin",
        "text_key": args.text_key,
        "nproc_per_node": args.nproc_per_node,
    }
    return specs, manifest


def _validate(manifest: dict, specs: list[RunSpec]) -> None:
    """Every variant's config passes attnres-train's checks before anything runs."""
    from megatron_attnres.config.load import check_run_config

    placeholder = {"data_path": ["builtin"]}
    for variant in manifest["variants"]:
        values = run_config(manifest["config"], variant, specs[0].seed, placeholder, Path("."))
        check_run_config(RunConfig(**values))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    output = Path(args.output)
    try:
        specs, manifest = _plan(args, output)
        _validate(manifest, specs)
        check_manifest(output, manifest)
    except (ValueError, FileNotFoundError) as err:
        print(f"attnres-ablate: error: {err}", file=sys.stderr)
        return 2
    preset = PRESETS[args.preset]
    print(
        f"attnres-ablate: preset {args.preset} ({preset.description}); "
        f"{len(specs)} runs into {output}",
        flush=True,
    )
    data = prepare_data(
        output, manifest["config"].get("tokenizer_vocab_size", 1024), args.data, args.text_key
    )
    # SIGTERM (kill, Slurm) ends this process like Ctrl-C does, so the running trainer is
    # stopped too (train_one terminates it) instead of being left behind.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    started, durations = time.monotonic(), []
    for index, spec in enumerate(specs, start=1):
        label = f"[{index}/{len(specs)}]"
        if finished(spec.run_dir):
            print(f"{label} {spec.name}: already finished, reused", flush=True)
            continue
        config = run_config(manifest["config"], spec.variant, spec.seed, data, spec.run_dir)
        t0 = time.monotonic()
        train_one(spec, config, args.nproc_per_node, label)
        durations.append(time.monotonic() - t0)
        left = len(specs) - index
        print(
            f"{label} {spec.name}: validation loss {finished(spec.run_dir)['valid_loss']:.4f} "
            f"in {_fmt(durations[-1])}; {_fmt(time.monotonic() - started)} elapsed, "
            f"~{_fmt(left * sum(durations) / len(durations))} left",
            flush=True,
        )
    from megatron_attnres.study.ablate_report import write_report

    written = write_report(output, specs, manifest, elapsed_s=time.monotonic() - started)
    print((output / "results.md").read_text(), flush=True)
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
