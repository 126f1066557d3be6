"""The "no CUDA" accommodations for megatron-core on hosts without a GPU (DESIGN section 4b).

megatron-core 0.19.2 assumes CUDA in many places. Everything this project changes to run it on a
CPU-only host lives here, is applied only by `activate_cpu_compat()` and only when CUDA is absent;
GPU runs never go through this module. `CHANGES` lists what is changed (a test checks the list
against what activation really does).

Kept apart on purpose: the "no TransformerEngine" choices (SDPA core attention, torch norms) are
ordinary spec choices in `megatron_attnres.mcore.specs`, used on GPUs without TE too.
"""

import contextlib

import torch
from megatron.core.tensor_parallel import random as mcore_random

CHANGES = (
    "torch.cuda.current_device() answers 'cpu' (router buffers, rotary embedding, scratch buffers "
    "allocate on the current device)",
    "megatron.core.tensor_parallel.random: the RNG tracker keeps CPU generator states "
    "(CPURNGStatesTracker) and model_parallel_cuda_manual_seed seeds it, with the same three "
    "named states and seeds as on GPU",
)

_ORIGINALS: dict[str, object] = {}


def cpu_compat_needed() -> bool:
    return not torch.cuda.is_available()


def cpu_compat_active() -> bool:
    return bool(_ORIGINALS)


class CPURNGStatesTracker(mcore_random.CudaRNGStatesTracker):
    """Megatron's RNG tracker with CPU generator states: fork() swaps torch's CPU RNG state."""

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise ValueError(f"RNG seed {seed} is already tracked")
        if name in self.states_:
            raise ValueError(f"RNG state {name!r} is already tracked")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name=mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            raise KeyError(f"RNG state {name!r} was never added; call model_parallel_manual_seed")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _cpu_initialize_rng_tracker(*args, force_reset=False, **kwargs):
    if force_reset or not isinstance(mcore_random._CUDA_RNG_STATE_TRACKER, CPURNGStatesTracker):
        mcore_random._CUDA_RNG_STATE_TRACKER = CPURNGStatesTracker()


def _cpu_manual_seed(seed, *args, tp_rank=None, ep_rank=None, etp_rank=None, **kwargs):
    """Seeds like megatron's model_parallel_cuda_manual_seed: seed, +2718+tp, +1024+100ep+etp."""
    from megatron.core import parallel_state as ps

    tp_rank = ps.get_tensor_model_parallel_rank() if tp_rank is None else tp_rank
    ep_rank = ps.get_expert_model_parallel_rank() if ep_rank is None else ep_rank
    etp_rank = ps.get_expert_tensor_parallel_rank() if etp_rank is None else etp_rank
    _cpu_initialize_rng_tracker(force_reset=True)
    tracker = mcore_random._CUDA_RNG_STATE_TRACKER
    torch.manual_seed(seed)
    tracker.add(mcore_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(
        mcore_random._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank
    )


def activate_cpu_compat() -> tuple[str, ...]:
    """Apply the CPU accommodations if this host has no CUDA; returns what was changed."""
    if not cpu_compat_needed():
        return ()
    if cpu_compat_active():
        return CHANGES
    _ORIGINALS["current_device"] = torch.cuda.current_device
    _ORIGINALS["initialize_rng_tracker"] = mcore_random.initialize_rng_tracker
    _ORIGINALS["model_parallel_cuda_manual_seed"] = mcore_random.model_parallel_cuda_manual_seed
    torch.cuda.current_device = lambda: "cpu"
    mcore_random.initialize_rng_tracker = _cpu_initialize_rng_tracker
    mcore_random.model_parallel_cuda_manual_seed = _cpu_manual_seed
    _cpu_initialize_rng_tracker(force_reset=True)
    return CHANGES


def model_parallel_manual_seed(seed: int) -> None:
    """Seed torch and Megatron's named RNG states, on GPU or (through the compat layer) on CPU."""
    mcore_random.model_parallel_cuda_manual_seed(seed)
