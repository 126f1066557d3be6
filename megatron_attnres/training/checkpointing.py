"""Checkpoints through megatron.core.dist_checkpointing (the torch_dist format).

    SAVE/iter_0000010/            one distributed checkpoint (model, optimizer, scheduler, RNG of
                                  every rank, iteration and consumed samples)
    SAVE/latest_checkpointed_iteration.txt   Megatron-LM's tracker file

A checkpoint is written into `iter_N.tmp` and renamed only once every rank has finished, and the
tracker is rewritten (atomically) after that, so a crash during a save leaves the previous
checkpoint as the latest. Because the format is Megatron's sharded one, a checkpoint loads into
another TP/PP/EP layout of the same model (the RNG states are then reseeded, as they are
per-rank).
"""

import os
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

TRACKER = "latest_checkpointed_iteration.txt"


@dataclass
class Progress:
    iteration: int = 0  # optimizer steps done
    consumed_samples: int = 0  # global samples consumed by those steps


def checkpoint_dir(save: str | Path, iteration: int) -> Path:
    return Path(save) / f"iter_{iteration:07d}"


def latest_iteration(load: str | Path) -> int | None:
    """The iteration in LOAD's tracker file, or None when LOAD has no checkpoint yet."""
    tracker = Path(load) / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise ValueError(
            f"checkpoint tracker {tracker} says {text!r}, not an iteration number; fix or "
            "delete it (each iter_* directory is a complete checkpoint)"
        )
    if not checkpoint_dir(load, int(text)).is_dir():
        raise FileNotFoundError(
            f"checkpoint tracker {tracker} names iteration {text} but "
            f"{checkpoint_dir(load, int(text))} does not exist; point the tracker at an existing "
            "iter_* directory"
        )
    return int(text)


def _unwrap(chunk):
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _rng_state() -> dict:
    return {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _sharded_state(chunks, optimizer, scheduler, progress: Progress, loading: bool) -> dict:
    state = {}
    for i, chunk in enumerate(chunks):
        state["model" if len(chunks) == 1 else f"model{i}"] = _unwrap(chunk).sharded_state_dict()
    state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=loading)
    state["scheduler"] = scheduler.state_dict()
    state["progress"] = {
        "iteration": progress.iteration,
        "consumed_samples": progress.consumed_samples,
    }
    rank, world = dist.get_rank(), dist.get_world_size()
    state["world_size"] = world  # the RNG states below are per rank
    state["rng"] = ShardedObject("rng_state", _rng_state(), (world,), (rank,), replica_id=0)
    return state


def save_checkpoint(save: str | Path, chunks, optimizer, scheduler, progress: Progress) -> Path:
    final = checkpoint_dir(save, progress.iteration)
    staging = final.with_name(final.name + ".tmp")
    if dist.get_rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    dist.barrier()
    state = _sharded_state(chunks, optimizer, scheduler, progress, loading=False)
    dist_checkpointing.save(state, str(staging))
    dist.barrier()
    if dist.get_rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
        tracker = Path(save) / TRACKER
        tmp = tracker.with_suffix(".tmp")
        tmp.write_text(f"{progress.iteration}\n")
        os.replace(tmp, tracker)
    dist.barrier()
    return final


def load_checkpoint(load: str | Path, chunks, optimizer, scheduler) -> Progress | None:
    """Restore the latest checkpoint under LOAD into the model, optimizer and scheduler; returns
    its progress, or None when LOAD holds no checkpoint (a fresh run)."""
    iteration = latest_iteration(load)
    if iteration is None:
        return None
    path = checkpoint_dir(load, iteration)
    template = _sharded_state(chunks, optimizer, scheduler, Progress(), loading=True)
    common = dist_checkpointing.load_common_state_dict(str(path))
    same_layout = common.get("world_size") == dist.get_world_size()
    if not same_layout:
        del template["rng"]
    state = dist_checkpointing.load(template, str(path))
    for i, chunk in enumerate(chunks):
        _unwrap(chunk).load_state_dict(state["model" if len(chunks) == 1 else f"model{i}"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if same_layout:
        _set_rng_state(state["rng"])
    return Progress(**state["progress"])
