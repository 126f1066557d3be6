"""Checkpoints through megatron.core.dist_checkpointing (the torch_dist format).

    SAVE/iter_0000010/            one distributed checkpoint (model, optimizer, scheduler, RNG of
                                  every rank, iteration, consumed samples, skipped steps, and the
                                  model-defining config fields)
    SAVE/latest_checkpointed_iteration.txt   Megatron-LM's tracker file

A checkpoint is written into `iter_N.tmp`, verified (checkpoint.files.verify: every file the
metadata names is there and long enough), renamed, and only then named by the tracker (replaced
atomically); older checkpoints beyond `keep_last_checkpoints` are removed last. A crash at any
point leaves a loadable latest checkpoint, and loading skips a torn or corrupt one for the
previous good one (checkpoint.files.choose). Because the format is Megatron's sharded one, a
checkpoint loads into another TP/PP/EP layout of the same model (the RNG states are then
reseeded, as they are per-rank).

A model-only checkpoint (common state {"model_only": True}, as `attnres-convert-from-hf` writes)
and `finetune: true` load the model weights alone and start at step 0 with a fresh optimizer
and schedule.
"""

import contextlib
import dataclasses
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.tensor_parallel import get_cuda_rng_tracker

from megatron_attnres.checkpoint import files
from megatron_attnres.checkpoint.files import TRACKER, checkpoint_dir
from megatron_attnres.checkpoint.format import (
    MODEL_ONLY,
    Progress,
    check_signature,
    model_state_key,
    use_in_process_writer,
)
from megatron_attnres.train import faults


def _unwrap(chunk):
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def seed_host_rngs(seed: int) -> None:
    """Seed Python's `random` and numpy's global generator from the run seed, per pipeline stage
    as Megatron-LM's _set_random_seed does (seed + 100 x pipeline rank). torch's generator and
    Megatron's tracker states are seeded by model_parallel_manual_seed; rng_state() records all
    of them in every checkpoint, so a resumed run continues each stream where it stopped."""
    from megatron.core import parallel_state as ps

    seed += 100 * ps.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)


def rng_state() -> dict:
    return {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


@contextlib.contextmanager
def _one_intra_op_thread():
    """Run a checkpoint's collectives with one ATen intra-op thread (issue 21: every step after
    the first save was ~1.7x slower on CPU).

    dist_checkpointing's collectives (the metadata all_gather_object, the write results'
    gather_object: ~36 KB byte tensors on the tiny model) run in gloo's worker threads, and a copy
    there above ATen's grain size starts an OpenMP thread pool in that worker. Such a thread takes
    torch's intra-op thread count the first time it runs ATen code and keeps it, and its pool
    lives as long as the process group. With those pools libgomp manages more OpenMP threads than
    there are CPUs and cuts the spin-wait of every pool (300000 spins to 100), the training
    thread's included: from then on each parallel op wakes its workers through the kernel (a
    64K-element add on the 2-core test VM: ~10 us -> ~50 us). Gloo's threads that first run ATen
    code here run it serially, now and later. See pin_intra_op_threads for the one thing
    torch.set_num_threads changes beyond the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def pin_intra_op_threads() -> None:
    """Set torch's intra-op thread count to its current value; call it once at the start of a run,
    before any checkpoint is saved or loaded.

    torch.set_num_threads also turns MKL's dynamic threading off, for good (torch cannot turn it
    back on), so the first _one_intra_op_thread would change the GEMMs of every later step
    (measured interleaved on the tiny config: 1.5-6% slower steps with it off). Made here, the
    change falls before the first step and a run's steps before and after a save are alike."""
    torch.set_num_threads(torch.get_num_threads())


def _model_state(chunks) -> dict:
    # Sharded tensors are keyed globally, so this nesting does not have to match the writer's.
    return {
        model_state_key(i, len(chunks)): _unwrap(chunk).sharded_state_dict()
        for i, chunk in enumerate(chunks)
    }


def _weights_template(chunks) -> dict:
    """The model's tensors without the modules' `_extra_state` objects: a weights-only start
    needs none of it (empty for local specs; TransformerEngine's FP8 scaling history restarts),
    and attnres-convert-from-hf, which writes global tensors without building the model, has
    none to give."""
    return {
        name: {
            k: v
            for k, v in state.items()
            if not (isinstance(v, ShardedObject) and v.key.endswith("._extra_state"))
        }
        for name, state in _model_state(chunks).items()
    }


def _sharded_state(chunks, optimizer, scheduler, progress: Progress, loading: bool) -> dict:
    state = _model_state(chunks)
    state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=loading)
    state["scheduler"] = scheduler.state_dict()
    state["progress"] = dataclasses.asdict(progress)
    rank, world = dist.get_rank(), dist.get_world_size()
    state["world_size"] = world  # the RNG states below are per rank
    state["rng"] = ShardedObject("rng_state", rng_state(), (world,), (rank,), replica_id=0)
    return state


def _agreed(value):
    """Rank 0's value on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@_one_intra_op_thread()
def save_checkpoint(
    save: str | Path,
    chunks,
    optimizer,
    scheduler,
    progress: Progress,
    *,
    signature: dict | None = None,
    keep_last: int | None = None,
) -> Path:
    save = Path(save)
    final, staging = (
        checkpoint_dir(save, progress.iteration),
        files.staging_dir(save, progress.iteration),
    )
    use_in_process_writer()
    if dist.get_rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    dist.barrier()
    state = _sharded_state(chunks, optimizer, scheduler, progress, loading=False)
    state["model_config"] = signature
    dist_checkpointing.save(state, str(staging))
    dist.barrier()
    problem = _agreed(files.verify(staging) if dist.get_rank() == 0 else None)
    if problem is not None:
        raise RuntimeError(
            f"checkpoint {staging} failed verification after saving: {problem}; it was not "
            f"renamed and {TRACKER} still names the previous checkpoint (check free disk space "
            "and the file system)"
        )
    if dist.get_rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
        faults.kill_point("tracker", progress.iteration)
        files.write_tracker(save, progress.iteration)
        files.prune(save, progress.iteration, keep_last)
    dist.barrier()
    return final


@dataclass
class Loaded:
    progress: Progress
    path: Path
    weights_only: str | None  # why only the model weights were loaded, None for a full resume
    notes: list[str]

    def summary(self) -> str:
        if self.weights_only:
            return (
                f"loaded model weights only from {self.path} ({self.weights_only}); starting at "
                "step 0 with a fresh optimizer and learning-rate schedule"
            )
        return (
            f"resumed from {self.path.parent} at step {self.progress.iteration} "
            f"({self.progress.consumed_samples} samples consumed), checkpoint {self.path.name}"
        )


def find_checkpoint(load: str | Path) -> files.Choice:
    """files.choose on rank 0, the same answer on every rank (collective)."""
    if dist.get_rank() == 0:
        try:
            choice = files.choose(load)
        except FileNotFoundError as err:
            choice = err
    else:
        choice = None
    choice = _agreed(choice)
    if isinstance(choice, Exception):
        raise choice
    return choice


@_one_intra_op_thread()
def load_checkpoint(
    path: str | Path,
    chunks,
    optimizer,
    scheduler,
    *,
    signature: dict | None = None,
    finetune: bool = False,
) -> Loaded:
    """Restore the checkpoint directory PATH (an iter_N) into the model, optimizer and
    scheduler. Model-only checkpoints and `finetune` restore the model weights alone."""
    path = Path(path)
    common = dist_checkpointing.load_common_state_dict(str(path))
    note = check_signature(common.get("model_config"), signature, path)
    notes = [note] if note else []
    if finetune or common.get(MODEL_ONLY, False):
        state = dist_checkpointing.load(_weights_template(chunks), str(path))
        _load_model(chunks, state)
        optimizer.reload_model_params()  # mixed precision: refresh the fp32 main params
        why = "finetune=true" if finetune else "a model-only checkpoint"
        return Loaded(Progress(), path, why, notes)
    template = _sharded_state(chunks, optimizer, scheduler, Progress(), loading=True)
    same_layout = common.get("world_size") == dist.get_world_size()
    if not same_layout:
        del template["rng"]
    state = dist_checkpointing.load(template, str(path))
    _load_model(chunks, state)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if same_layout:
        set_rng_state(state["rng"])
    return Loaded(Progress(**state["progress"]), path, None, notes)


def _load_model(chunks, state: dict) -> None:
    for i, chunk in enumerate(chunks):
        _unwrap(chunk).load_state_dict(state[model_state_key(i, len(chunks))])


def resume(
    run, save: Path, chunks, optimizer, scheduler, signature: dict
) -> tuple[Loaded | None, list[str]]:
    """What a run starts from, and the notes to print. A save directory that already holds a
    checkpoint is this run's own progress (a restart under torchrun --max-restarts, a Slurm
    requeue): resume from it, whatever `load` says. Otherwise `load` (with `finetune`), or
    nothing (None): a fresh run."""
    load = Path(run.load) if run.load else None
    notes = []
    if load is None or load.resolve() != save.resolve():
        choice = find_checkpoint(save)
        notes += choice.notes
        if choice.path is not None:
            because = "load is not set" if load is None else f"it takes precedence over {load}"
            notes.append(f"auto-resume: {save} holds this run's checkpoints ({because})")
            loaded = load_checkpoint(choice.path, chunks, optimizer, scheduler, signature=signature)
            return loaded, notes + loaded.notes
    if load is None:
        return None, notes
    choice = find_checkpoint(load)
    notes += choice.notes
    if choice.path is None:
        if run.finetune:
            raise FileNotFoundError(
                f"finetune=true but load={load} holds no checkpoint; point load at the "
                "checkpoint directory to fine-tune from"
            )
        return None, notes
    loaded = load_checkpoint(
        choice.path, chunks, optimizer, scheduler, signature=signature, finetune=run.finetune
    )
    return loaded, notes + loaded.notes
