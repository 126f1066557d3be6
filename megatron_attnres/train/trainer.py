"""`attnres-train`: pretrain a Block-AttnRes MoE on Megatron-Core.

    attnres-train --config configs/tiny.yaml [--key value ...]
    torchrun --nproc-per-node 8 -m megatron_attnres.train --config ... (multi-rank)

One process per rank (torchrun / Slurm / DeepSpeed launcher set the rank variables; a bare
process is a 1-rank run). The run directory receives the resolved config (config.yaml),
metrics.jsonl, checkpoints/, wandb/ and plots/. Everything below is Megatron-Core's own machinery:
parallel state, HybridModel with our stack, DDP + finalize_model_grads, the pipeline schedules,
the optimizer and OptimizerParamScheduler, GPT datasets and dist checkpointing.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_attnres.checkpoint.format import CONFIG
from megatron_attnres.config.flops import flops_per_token
from megatron_attnres.config.host import implementation_line
from megatron_attnres.config.load import as_dict, dump, load_run_config, parse_overrides
from megatron_attnres.config.megatron import padded_vocab_size
from megatron_attnres.config.rules import microbatches_per_step
from megatron_attnres.config.run import RunConfig
from megatron_attnres.data.datasets import build_gpt_datasets, check_data, micro_batches
from megatron_attnres.mcore.compat import activate_cpu_compat, cpu_compat_needed
from megatron_attnres.train import checkpointing as ckpt
from megatron_attnres.train import faults, nonfinite
from megatron_attnres.train.build import build_run, initialize_parallel
from megatron_attnres.train.diagnostics import ModelDiagnostics, gather_diagnostics
from megatron_attnres.train.distributed import init_distributed
from megatron_attnres.train.engine import (
    check_interleaved_microbatches,
    forward_backward,
    train_step,
)
from megatron_attnres.train.layout import dry_run_layout, format_layout
from megatron_attnres.train.metrics import MetricsLog, ProgressLine, unigram_entropy
from megatron_attnres.train.stopping import StopRequest, should_stop


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, RunConfig]:
    parser = argparse.ArgumentParser(
        prog="attnres-train",
        description="Pretrain a Block-AttnRes MoE language model on Megatron-Core.",
        epilog="Any config key can be overridden: --train-iters 50 --lr 3e-4 (or --lr=3e-4). "
        "Keys are Megatron-LM's argument names; see configs/tiny.yaml.",
    )
    parser.add_argument("--config", help="YAML run config (default: all defaults)")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved config and the rank/stage layout, then exit (starts nothing)",
    )
    parser.add_argument("--world-size", type=int, help="--dry-run: ranks to lay out")
    parser.add_argument("--gpus-per-node", type=int, help="--dry-run: ranks per host (default 8)")
    parser.add_argument("--json", action="store_true", help="--dry-run: print JSON")
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS
    )  # set by the DeepSpeed launcher; LOCAL_RANK wins
    args, rest = parser.parse_known_args(argv)
    run = load_run_config(args.config, parse_overrides(rest))
    return args, run


def _prepare_data(run: RunConfig) -> tuple[list[str], str]:
    """(blend, tokenizer model): the built-in corpus is tokenised and preprocessed on rank 0."""
    if run.data_path == ["builtin"]:
        from megatron_attnres.data.preprocess import prepare_builtin_data

        out = Path(run.run_dir) / "data"
        if dist.get_rank() == 0:
            prepared = prepare_builtin_data(out, vocab_size=run.tokenizer_vocab_size)
            paths = [str(prepared.data_prefix), str(prepared.tokenizer_model)]
        else:
            paths = [None, None]
        dist.broadcast_object_list(paths, src=0)
        return [paths[0]], run.tokenizer_model or paths[1]
    if not run.tokenizer_model:
        raise ValueError(
            "tokenizer_model is not set; give the sentencepiece .model the data was "
            "preprocessed with (attnres-train-tokenizer writes one)"
        )
    return run.data_path, run.tokenizer_model


def _take(iterator, count: int) -> list[dict]:
    batch = []
    for _ in range(count):
        mb = next(iterator)
        batch.append({"tokens": mb["tokens"], "labels": mb["labels"], "loss_mask": mb["loss_mask"]})
    return batch


class Trainer:
    def __init__(self, run: RunConfig):
        self.run = run
        self.rank0 = dist.get_rank() == 0
        initialize_parallel(run)
        self.dp_rank, self.dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.num_micro = microbatches_per_step(run, self.dp)
        blend, tokenizer_path = _prepare_data(run)
        from megatron_attnres.data.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer_path)
        self.vocab = padded_vocab_size(run, self.tokenizer.vocab_size)
        # Every rank checks the files (the same answer everywhere, so all of them exit with it).
        check_data(
            blend,
            self.tokenizer,
            model_vocab_size=self.vocab,
            seq_length=run.seq_length,
            split=run.split,
        )
        built = build_run(run, self.vocab)
        self.config, self.pattern, self.chunks = built.config, built.pattern, built.chunks
        self.optimizer, self.scheduler, self.signature = (
            built.optimizer,
            built.scheduler,
            built.signature,
        )
        schedule = self.config.depth_block_schedule()
        interleaved_attnres = len(self.chunks) > 1 and schedule.uses_depth_reads
        check_interleaved_microbatches(self.num_micro, interleaved_attnres)
        self.train_data, self.valid_data = build_gpt_datasets(
            blend,
            self.tokenizer,
            seq_length=run.seq_length,
            train_samples=run.train_iters * run.global_batch_size,
            valid_samples=max(1, run.eval_iters) * run.global_batch_size,
            cache_dir=run.data_cache_path or Path(run.run_dir) / "data_cache",
            split=run.split,
            seed=run.seed,
            model_vocab_size=self.vocab,
        )
        self.save_dir = Path(run.save or Path(run.run_dir) / "checkpoints")
        if self.rank0:  # the resolved config beside the checkpoints as well as in the run dir
            self.save_dir.mkdir(parents=True, exist_ok=True)
            (self.save_dir / CONFIG).write_text(dump(run))
        self.on_disk = None  # the iteration whose checkpoint in save_dir this process matches
        # Python's and numpy's streams start from the run seed (torch's and Megatron's tracker
        # states were seeded when the model was built); a resume replaces all of them.
        ckpt.seed_host_rngs(run.seed)
        ckpt.pin_intra_op_threads()  # before the first checkpoint load or save (its docstring)
        self.progress = self._resume()
        faults.install(self.chunks)  # test-only hooks; inert unless ATTNRES_FAULT* is set
        reads = schedule.read_source_counts()
        self.flops = flops_per_token(run, self.vocab, self.pattern, reads)
        self.diagnostics = ModelDiagnostics(self.chunks)

    def _print(self, text: str) -> None:
        if self.rank0:
            print(text, flush=True)

    def _resume(self) -> ckpt.Progress:
        loaded, notes = ckpt.resume(
            self.run, self.save_dir, self.chunks, self.optimizer, self.scheduler, self.signature
        )
        for note in notes + ([loaded.summary()] if loaded else []):
            self._print(note)
        if loaded is None:
            return ckpt.Progress()
        if not loaded.weights_only and loaded.path.parent.resolve() == self.save_dir.resolve():
            self.on_disk = loaded.progress.iteration
        return loaded.progress

    def evaluate(self) -> float | None:
        if self.valid_data is None or self.run.eval_iters < 1:
            return None
        data = micro_batches(
            self.valid_data,
            self.run.micro_batch_size,
            0,
            data_parallel_rank=self.dp_rank,
            data_parallel_size=self.dp,
            seed=self.run.seed,
        )
        losses = []
        for chunk in self.chunks:
            chunk.eval()
        with torch.no_grad():
            for _ in range(self.run.eval_iters):
                batch = _take(data, self.num_micro)
                losses.append(forward_backward(self.chunks, batch, forward_only=True))
        for chunk in self.chunks:
            chunk.train()
        return sum(losses) / len(losses)

    def save(self) -> None:
        if self.progress.iteration == self.on_disk:
            return  # just resumed from it, or saved at this step before a stop
        path = ckpt.save_checkpoint(
            self.save_dir,
            self.chunks,
            self.optimizer,
            self.scheduler,
            self.progress,
            signature=self.signature,
            keep_last=self.run.keep_last_checkpoints,
        )
        self.on_disk = self.progress.iteration
        self._print(f"saved checkpoint {path}")

    def train(self, stop: "StopRequest | None" = None) -> dict:
        run, log = self.run, MetricsLog(self.run, enabled=self.rank0)
        stop = stop or StopRequest(run.exit_signal_handler)
        line = ProgressLine(run, self.flops, dist.get_world_size())
        data = micro_batches(
            self.train_data,
            run.micro_batch_size,
            self.progress.consumed_samples,
            data_parallel_rank=self.dp_rank,
            data_parallel_size=self.dp,
            num_workers=run.num_workers,
            seed=run.seed,
        )
        started, valid_loss, reason = time.monotonic(), None, "done"
        try:
            while self.progress.iteration < run.train_iters:
                faults.begin_step(self.progress.iteration + 1)
                batch = _take(data, self.num_micro)
                result = self._train_step(batch, self.progress.iteration + 1, log)
                if result.nonfinite:
                    reason = self._nonfinite(batch, self.progress.iteration + 1, log)
                    if reason:
                        break
                    self.progress.skipped_steps += 1
                else:  # as in Megatron-LM, a skipped step does not advance the schedule
                    self.scheduler.step(increment=run.global_batch_size)
                self.progress.iteration += 1
                self.progress.consumed_samples += run.global_batch_size
                step = self.progress.iteration
                values = line.step(
                    step,
                    result.loss,
                    self.scheduler.get_lr(self.optimizer.param_groups[0]),
                    result.grad_norm,
                )
                log.write(
                    "train",
                    step,
                    skipped=result.skipped,
                    consumed_samples=self.progress.consumed_samples,
                    **values,
                )
                if step % run.log_interval == 0 or step == run.train_iters:
                    self._print(line.text)
                if step % run.eval_interval == 0 and step < run.train_iters:
                    valid_loss = self.evaluate()
                    log.write("valid", step, loss=valid_loss)
                    self._print(f"step {step}: validation loss {valid_loss:.4f}")
                    line.last = time.perf_counter()  # the next step's time excludes evaluation
                reason = should_stop(run, step, stop, started)
                if reason:
                    break
                if run.save_interval and step % run.save_interval == 0:
                    self.save()
            self.save()
            if reason != "done":
                self._print(f"stopping at step {self.progress.iteration}: {reason}")
                code = NONFINITE_EXIT if reason.startswith("non-finite") else 0
                return {"stopped": reason, "step": self.progress.iteration, "exit_code": code}
            return self._finish(log)
        finally:
            log.close()

    def _train_step(self, batch: list[dict], step: int, log: MetricsLog):
        if step % self.run.diagnostics_interval:
            return train_step(self.chunks, self.optimizer, batch, skip_nonfinite=True)
        with self.diagnostics.capture():
            result = train_step(self.chunks, self.optimizer, batch, skip_nonfinite=True)
        gathered = gather_diagnostics(self.diagnostics.summary())
        if gathered is not None:
            log.write("diagnostics", step, **gathered)
        return result

    def _nonfinite(self, batch: list[dict], step: int, log: MetricsLog) -> str | None:
        """STEP's update was skipped for a NaN/Inf: report where it came from; None to go on,
        else why the run stops (nan_policy, max_skipped_steps)."""
        location = nonfinite.locate(
            self.chunks, lambda: forward_backward(self.chunks, batch, forward_only=True)
        )
        verdict = nonfinite.decide(self.run, self.progress.skipped_steps, step, location)
        log.write("nonfinite", step, **verdict.record)
        self._print(verdict.message)
        return verdict.stop_reason

    def _finish(self, log: MetricsLog) -> dict:
        valid_loss = self.evaluate()
        summary = {"valid_loss": valid_loss}
        if valid_loss is not None:
            samples = self.run.eval_iters * self.run.global_batch_size
            entropy = unigram_entropy(self.valid_data, samples)
            summary.update(unigram_entropy=entropy, below_unigram=entropy - valid_loss)
            self._print(
                f"final validation loss {valid_loss:.4f} nats; unigram entropy of the "
                f"validation split {entropy:.4f} nats ({entropy - valid_loss:+.4f})"
            )
        log.write("final", self.progress.iteration, **summary)
        return {"step": self.progress.iteration, **summary}


BAD_INPUT = (ValueError, FileNotFoundError)  # refused before training: message, no traceback
NONFINITE_EXIT = 3  # stopped on a NaN/Inf (nan_policy), after saving the last good state


def main(argv: list[str] | None = None) -> int:
    try:
        args, run = parse_args(sys.argv[1:] if argv is None else argv)
    except BAD_INPUT as err:
        print(f"attnres-train: error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        return _dry_run(args, run)
    # Installed before the (slow) start-up, so a preemption signal that arrives while the model
    # and data are being built still ends in a checkpoint after the first step.
    stop = StopRequest(run.exit_signal_handler)
    Path(run.run_dir).mkdir(parents=True, exist_ok=True)
    init_distributed()
    if cpu_compat_needed():
        activate_cpu_compat()
    try:
        if dist.get_rank() == 0:
            print(dump(run), end="", flush=True)
            print(implementation_line(run), flush=True)
            (Path(run.run_dir) / "config.yaml").write_text(dump(run))
        try:
            trainer = Trainer(run)
        except BAD_INPUT as err:
            print(f"attnres-train: error: {err}", file=sys.stderr)
            return 2
        summary = trainer.train(stop)
        if dist.get_rank() == 0 and run.plots and "stopped" not in summary:
            _plot(run.run_dir)
        return summary.get("exit_code", 0)
    finally:
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        dist.destroy_process_group()


def _dry_run(args, run: RunConfig) -> int:
    """The layout for --world-size ranks (default: the launcher's WORLD_SIZE, else 1)."""
    world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    per_node = args.gpus_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", min(world, 8)))
    try:
        layout = dry_run_layout(run, world, per_node)
    except BAD_INPUT as err:
        print(f"attnres-train: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"config": as_dict(run), "layout": layout}))
    else:
        print(dump(run) + implementation_line(run) + "\n\n" + format_layout(layout))
    return 0 if all(layout["checks"].values()) else 1


def _plot(run_dir: str) -> None:
    from megatron_attnres.train.plots import write_plots

    for path in write_plots(run_dir):
        print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
