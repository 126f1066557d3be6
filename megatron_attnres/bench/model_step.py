"""Model level: Block AttnRes vs the standard residual on the same config and layout.

Both models are built with the trainer's own pieces (train/build.py build_run, engine.py:
Megatron's HybridModel, DDP, optimizer, pipeline schedule) and stepped in turn, A B, B A, ..., so
that load from other processes falls on both alike. Reported per mode: median step time after
warm-up, tokens/s, MFU (with --peak-tflops), and memory: on GPU the peak CUDA allocation of one
step above what was allocated before it (`step_peak_memory`); on CPU the saved-activation bytes
of one forward (saved_tensors_hooks, distinct storages, parameters excluded), PP=1 only. Data
are random tokens (the data pipeline is not what is measured).

Multi-rank (PP=2): `python -m torch.distributed.run --nproc-per-node 2 -m
megatron_attnres.bench.model_step --config ... --pp 2 --output out.json`; `run_ranks` starts it.
"""

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_attnres.bench.common import interleaved_times, paired_ratio
from megatron_attnres.config.flops import flops_per_token
from megatron_attnres.config.load import load_run_config, parse_overrides
from megatron_attnres.config.megatron import layer_pattern, padded_vocab_size, transformer_config
from megatron_attnres.config.rules import microbatches_per_step
from megatron_attnres.config.run import RunConfig
from megatron_attnres.mcore.compat import (
    activate_cpu_compat,
    cpu_compat_needed,
    model_parallel_manual_seed,
)
from megatron_attnres.mcore.model import build_model_chunks, pipeline_pattern
from megatron_attnres.train.build import build_run
from megatron_attnres.train.distributed import init_distributed
from megatron_attnres.train.engine import train_step

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
MODES = {"block": True, "none": False}  # enable_attention_residuals
# The saved-activation comparison at hidden >= 512 (acceptance of issue 11), two shapes:
# the tests' MoE (tests/mcore/test_activation_memory.py) and Kimi Linear's width ratios.
WIDE_CONFIGS = {
    "test shape (h512, ffn 1024, 4 experts top-2 x 512)": [
        "--hidden-size",
        "512",
        "--ffn-hidden-size",
        "1024",
        "--num-attention-heads",
        "8",
        "--num-query-groups",
        "4",
        "--moe-ffn-hidden-size",
        "512",
        "--moe-shared-expert-intermediate-size",
        "null",
        "--seq-length",
        "64",
        "--micro-batch-size",
        "2",
    ],
    "Kimi ratios (h512, dense 2048, 16 experts top-8 x 224 + shared 224)": [
        "--hidden-size",
        "512",
        "--ffn-hidden-size",
        "2048",
        "--num-attention-heads",
        "8",
        "--num-query-groups",
        "4",
        "--num-experts",
        "16",
        "--moe-router-topk",
        "8",
        "--moe-ffn-hidden-size",
        "224",
        "--moe-shared-expert-intermediate-size",
        "224",
        "--seq-length",
        "64",
        "--micro-batch-size",
        "2",
    ],
}


def mode_config(run: RunConfig, mode: str) -> RunConfig:
    return dataclasses.replace(run, enable_attention_residuals=MODES[mode])


def build(run: RunConfig, vocab: int, pattern: str):
    """(DDP chunks, optimizer, transformer config) of `run` laid out by `pattern`, built as
    attnres-train builds it (train.build.build_run)."""
    built = build_run(run, vocab, pattern=pattern)
    return built.chunks, built.optimizer, built.config


def random_batch(run: RunConfig, vocab: int, micro: int, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    shape = (run.micro_batch_size, run.seq_length)
    batch = []
    for _ in range(micro):
        tokens = torch.randint(0, vocab, shape, generator=gen)
        batch.append(
            {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": torch.ones(shape)}
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return [{k: v.to(device) for k, v in mb.items()} for mb in batch]


def saved_activation_bytes(model, tokens: torch.Tensor) -> int:
    """Bytes of distinct storages autograd saves during one forward, parameters excluded.

    Every saved tensor is held until the count is done: a storage freed during the forward
    could otherwise hand its address to a later one and be counted once for both (the count
    then depended on the allocator's reuse, i.e. on what ran before)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved, held = {}, []

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
            held.append(tensor)
        return tensor

    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, positions, None, labels=torch.roll(tokens, -1, 1))
    return sum(saved.values())


def step_peak_memory(step) -> int:
    """CUDA bytes allocated at the peak of one step above what was allocated before it
    (activations, gradients in flight, temporaries; both models' weights live in the process)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def measure(run: RunConfig, steps: int, warmup: int, peak_tflops: float | None) -> dict:
    """Build both modes in this process (parallel state already initialised) and time them."""
    vocab = padded_vocab_size(run, run.tokenizer_vocab_size)
    block_config = transformer_config(mode_config(run, "block"))
    pattern = pipeline_pattern(block_config, layer_pattern(run))  # one layout for both modes
    dp = ps.get_data_parallel_world_size()
    micro = microbatches_per_step(run, dp)
    batch = random_batch(run, vocab, micro)
    models, steppers, results = {}, {}, {}
    for mode in MODES:
        chunks, optimizer, config = build(mode_config(run, mode), vocab, pattern)
        models[mode] = (chunks, config)
        steppers[mode] = lambda c=chunks, o=optimizer: train_step(c, o, batch)
    on_gpu = torch.cuda.is_available()
    runs = interleaved_times(steppers, "cuda" if on_gpu else "cpu", warmup, steps)
    times = {mode: statistics.median(values) for mode, values in runs.items()}
    tokens = run.global_batch_size * run.seq_length
    for mode, (_, config) in models.items():
        schedule = config.depth_block_schedule()
        reads = schedule.read_source_counts()
        flops = flops_per_token(mode_config(run, mode), vocab, pattern, reads)
        tflops = tokens / times[mode] * flops / 1e12
        ranks = dist.get_world_size()
        results[mode] = dict(
            step_s=times[mode],
            tokens_per_s=tokens / times[mode],
            tflops=tflops,
            mfu=tflops / (peak_tflops * ranks) if peak_tflops else None,
        )
    results["block"]["paired_ratio_vs_none"] = paired_ratio(runs, "block", "none")
    if on_gpu:
        for mode, step in steppers.items():
            results[mode]["step_peak_memory_bytes"] = step_peak_memory(step)
    elif ps.get_pipeline_model_parallel_world_size() == 1:
        for mode, (chunks, _) in models.items():
            results[mode]["saved_activation_bytes"] = saved_activation_bytes(
                chunks[0], batch[0]["tokens"]
            )
    return results


def saved_activation_comparison(run: RunConfig) -> dict:
    """Saved-activation bytes of one forward, Block vs none (PP=1, in this process), with the
    analytic overhead (DepthBlockSchedule.saved_activation_overhead_bytes) beside it."""
    vocab = padded_vocab_size(run, run.tokenizer_vocab_size)
    pattern = layer_pattern(run)
    tokens = random_batch(run, vocab, 1)[0]["tokens"]
    saved, config = {}, None
    for mode in MODES:
        model_parallel_manual_seed(run.seed)
        config = transformer_config(mode_config(run, mode))
        (model,) = build_model_chunks(config, pattern, vocab, run.seq_length)
        saved[mode] = saved_activation_bytes(model, tokens)
        if mode == "block":
            predicted = config.depth_block_schedule().saved_activation_overhead_bytes(
                tokens=tokens.numel(), hidden=run.hidden_size, act_bytes=4 - 2 * run.bf16
            )
    return dict(
        hidden=run.hidden_size,
        block_bytes=saved["block"],
        none_bytes=saved["none"],
        ratio=saved["block"] / saved["none"],
        overhead_measured=saved["block"] - saved["none"],
        overhead_predicted=predicted,
    )


def start_ranks(pp: int) -> None:
    init_distributed()
    if cpu_compat_needed():
        activate_cpu_compat()
        torch.set_num_threads(1)  # ranks share the machine's cores
    ps.initialize_model_parallel(1, pp)


def run_ranks(
    config: str,
    overrides: list[str],
    pp: int,
    steps: int,
    warmup: int,
    peak_tflops: float | None = None,
    wide: bool = False,
    timeout: int = 900,
) -> dict:
    """`measure` in fresh processes: `pp` ranks under torchrun (gloo on CPU); with `wide` (PP=1)
    also `saved_activation_comparison` of each WIDE_CONFIGS shape. Rank 0's results."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={pp}",
            "-m",
            "megatron_attnres.bench.model_step",
            "--config",
            config,
            "--pp",
            str(pp),
            "--steps",
            str(steps),
            "--warmup",
            str(warmup),
            "--output",
            str(out),
            *overrides,
        ]
        if peak_tflops:
            command += ["--peak-tflops", str(peak_tflops)]
        if wide:
            command.append("--wide")
        env = {
            k: v
            for k, v in __import__("os").environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
        }
        env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        done = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"PP={pp} benchmark failed ({done.returncode}):\n{done.stderr[-3000:]}"
            )
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    """One process of the multi-rank benchmark (started by `run_multi_rank`)."""
    parser = argparse.ArgumentParser(prog="python -m megatron_attnres.bench.model_step")
    parser.add_argument("--config", default=str(TINY))
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float)
    parser.add_argument("--output", required=True)
    parser.add_argument(
        "--wide", action="store_true", help="PP=1: also compare saved activations on WIDE_CONFIGS"
    )
    args, rest = parser.parse_known_args(argv)
    run = load_run_config(args.config, parse_overrides(rest))
    run = dataclasses.replace(run, pipeline_model_parallel_size=args.pp)
    start_ranks(args.pp)
    try:
        results = measure(run, args.steps, args.warmup, args.peak_tflops)
        if args.wide:
            results["saved_activations"] = {
                name: saved_activation_comparison(load_run_config(args.config, parse_overrides(o)))
                for name, o in WIDE_CONFIGS.items()
            }
        if dist.get_rank() == 0:
            Path(args.output).write_text(json.dumps(results))
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
