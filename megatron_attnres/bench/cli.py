"""`attnres-bench`: cost model and benchmarks of Block AttnRes (docs/benchmarks.md).

    attnres-bench cost [--config configs/kimi_linear_48b_attnres.yaml]
    attnres-bench op [--device cpu|cuda] [--quick] [--no-compile]
    attnres-bench model [--device ...] [--config configs/tiny.yaml] [--steps 40] [--peak-tflops X]
    attnres-bench inference [--device ...] [--quick]
    attnres-bench kernels [--quick]     # Triton kernels compiled for sm_90/sm_100, on CPU
    attnres-bench save [--steps 40]     # step time before / after a checkpoint save (not in all)
    attnres-bench all --device cuda --output results.json     # everything, one command

Every part prints a table with the ratios measured in the same run, the device, torch version and
commit, and (with --output) writes JSON. On CPU the parts run at toy sizes: the ratios are CPU
ratios, and the process uses one intra-op thread (the machines it runs on are shared).
"""

import argparse
import sys
import time

import torch

from megatron_attnres.bench.common import write_json

PARTS = ("cost", "op", "model", "inference", "kernels")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="attnres-bench", description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=[*PARTS, "save", "all"])
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--quick", action="store_true", help="smallest shapes, fewest repeats")
    parser.add_argument("--no-compile", action="store_true", help="op: skip torch.compile")
    parser.add_argument(
        "--config",
        help="run config (cost: default the 48B AttnRes shape; "
        "model/inference: default configs/tiny.yaml)",
    )
    parser.add_argument(
        "--steps", type=int, default=40, help="model: timed steps per mode; save: per side"
    )
    parser.add_argument("--peak-tflops", type=float, help="model: per-device peak, for MFU")
    parser.add_argument("--output", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible; use --device cpu")
    return args


def run_model(args) -> dict:
    from megatron_attnres.bench.model_step import TINY, run_ranks
    from megatron_attnres.bench.model_table import print_model_tables

    config = args.config or str(TINY)
    steps, warmup = (3, 1) if args.quick else (args.steps, 3)
    results = {"config": config, "steps": steps, "warmup": warmup}
    for pp in (1, 2):
        if args.device == "cuda" and torch.cuda.device_count() < pp:
            results[f"pp{pp}"] = {"skipped": f"PP={pp} needs {pp} GPUs"}
            continue
        wide = pp == 1 and args.device == "cpu" and not args.quick
        results[f"pp{pp}"] = run_ranks(config, [], pp, steps, warmup, args.peak_tflops, wide)
    if "saved_activations" in results["pp1"]:
        results["saved_activations"] = results["pp1"].pop("saved_activations")
    print_model_tables(results, args.device)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.device == "cpu":
        torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    parts = PARTS if args.part == "all" else (args.part,)
    results, started = {}, time.perf_counter()
    for part in parts:
        begin = time.perf_counter()
        if part == "cost":
            from megatron_attnres.bench.cost_report import run_cost

            results[part] = run_cost(args.config)
        elif part == "op":
            from megatron_attnres.bench.op import run_op

            results[part] = run_op(args.device, args.quick, compile=not args.no_compile)
        elif part == "model":
            results[part] = run_model(args)
        elif part == "kernels":
            from megatron_attnres.bench.kernels import run_kernels

            # fla chunk_kda (minutes of compiling) only when the part is asked for by name
            results[part] = run_kernels(args.quick, kda=args.part == "kernels")
        elif part == "save":
            from megatron_attnres.bench.save_step import run_save

            results[part] = run_save(args.device, args.quick, args.config, args.steps)
        else:
            from megatron_attnres.bench.inference import run_inference

            results[part] = run_inference(args.device, args.quick, args.config)
        results[part + "_seconds"] = time.perf_counter() - begin
        print(f"[{part}: {results[part + '_seconds']:.0f} s]\n", flush=True)
    results["total_seconds"] = time.perf_counter() - started
    print(f"attnres-bench {args.part}: {results['total_seconds']:.0f} s in all", flush=True)
    write_json(args.output, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
