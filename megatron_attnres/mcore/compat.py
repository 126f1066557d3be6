"""The "no CUDA" accommodations for megatron-core on hosts without a GPU (docs/architecture.md
section 4, CPU mode (b)).

megatron-core 0.19.2 assumes CUDA in many places. Everything this project changes to run it on a
CPU-only host lives here, is applied only by `activate_cpu_compat()` and only when CUDA is absent;
GPU runs never go through this module. `CHANGES` lists what is changed (a test checks the list
against what activation really does).

Kept apart on purpose: the "no TransformerEngine" choices (SDPA core attention, torch norms) are
ordinary spec choices in `megatron_attnres.mcore.specs`, used on GPUs without TE too.
"""

import contextlib
import importlib
import types

import torch
from megatron.core.tensor_parallel import random as mcore_random

CHANGES = (
    "torch.cuda.current_device() answers 'cpu' (router buffers, rotary embedding, scratch buffers "
    "allocate on the current device)",
    "megatron.core.tensor_parallel.random: the RNG tracker keeps CPU generator states "
    "(CPURNGStatesTracker) and model_parallel_cuda_manual_seed seeds it, with the same three "
    "named states and seeds as on GPU",
    "the modules in CUDA_LITERAL_MODULES (optimizer, grad clipping and its norm helpers, "
    "pipeline schedules and p2p, DDP grad buffers, dist-checkpoint writer) see a `torch` whose "
    "tensor factories "
    "(tensor/zeros/ones/empty/full) map device='cuda' to the CPU (loss scale, found-inf flags, "
    "grad-norm buffers, token counters, p2p buffers) and whose torch.cuda.current_stream(), "
    "Stream(), stream() and synchronize() are CPU no-ops (one stream: the alltoall "
    "dispatcher's side stream is the current one)",
    "megatron.core.optimizer.optimizer clips gradients with clip_grad_by_total_norm_cpu (the same "
    "arithmetic as Megatron's clip_grad_by_total_norm_fp32, whose fused path asserts CUDA tensors)",
    "the alltoall token dispatcher's split sizes become numpy arrays, as its device-to-host "
    "copy makes them on GPU (maybe_move_tensor_to_cpu leaves CPU tensors alone, and gloo's "
    "all_to_all_single takes lists, not tensors)",
    "Float16OptimizerWithFloat16Params (bf16/fp16 training with fp32 main params) sorts its "
    "parameters by Tensor.type() strings that only name CUDA tensors; while it is constructed, "
    "Tensor.type() of a CPU tensor answers the CUDA name of the same dtype",
)

# Modules that create tensors with a literal device="cuda" at call sites we go through.
CUDA_LITERAL_MODULES = (
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.utils",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.transformer.moe.token_dispatcher",
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


def _on_cpu(factory):
    def wrapped(*args, device=None, **kwargs):
        if device is not None and torch.device(device).type == "cuda":
            device = "cpu"
        return factory(*args, device=device, **kwargs)

    return wrapped


class _CPUEvent:
    """Stand-in for a CUDA event: CPU work is complete when it is recorded."""

    def synchronize(self):
        pass

    def wait(self, stream=None):
        pass

    def query(self):
        return True


class _CPUStream:
    """Stand-in for a CUDA stream on the CPU, where all work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_event(self, event):
        pass

    def wait_stream(self, stream):
        pass

    def synchronize(self):
        pass

    def record_event(self, event=None):
        return _CPUEvent()

    def __eq__(self, other):  # one stream on the CPU: every stand-in is the current one
        return isinstance(other, _CPUStream)

    __hash__ = object.__hash__


class _CPUCuda(types.ModuleType):
    def __init__(self):
        super().__init__("torch.cuda")
        self.Stream = _CPUStream
        self.current_stream = lambda device=None: _CPUStream()
        self.synchronize = lambda device=None: None
        self.stream = lambda stream=None: contextlib.nullcontext()

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _CPUDeviceTorch(types.ModuleType):
    """`torch` as seen by a redirected module: everything is torch's, but tensor factories
    asked for device="cuda" allocate on the CPU."""

    def __init__(self):
        super().__init__("torch")
        for name in ("tensor", "zeros", "ones", "empty", "full"):
            setattr(self, name, _on_cpu(getattr(torch, name)))
        self.cuda = _CPUCuda()

    def __getattr__(self, name):
        return getattr(torch, name)


def split_sizes_as_numpy(tensor, as_numpy: bool = False, record_stream: bool = False):
    """megatron's maybe_move_tensor_to_cpu for tensors that are already on the CPU: the numpy
    view it would have made from a device-to-host copy (no copy, no stream)."""
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.numpy()
    return tensor


def clip_grad_by_total_norm_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """Scale the gradients by max_norm / (total_norm + 1e-6) when that is below 1 (Megatron's
    clip_grad_by_total_norm_fp32 contract), without its CUDA-only multi-tensor kernel."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr) for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_([g.detach() for g in grads], clip_coeff)


@contextlib.contextmanager
def _cuda_type_names():
    """Tensor.type() (no arguments) of CPU tensors answers 'torch.cuda.<Dtype>Tensor'."""
    real_type = torch.Tensor.type

    def cuda_named(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu":
            return real_type(self).replace("torch.", "torch.cuda.", 1)
        return real_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = cuda_named
    try:
        yield
    finally:
        torch.Tensor.type = real_type


def _with_cuda_type_names(init):
    def wrapped(self, *args, **kwargs):
        with _cuda_type_names():
            init(self, *args, **kwargs)

    return wrapped


def activate_cpu_compat() -> tuple[str, ...]:
    """Apply the CPU accommodations if this host has no CUDA; returns what was changed."""
    if not cpu_compat_needed():
        return ()
    if cpu_compat_active():
        return CHANGES
    optimizer_module = importlib.import_module("megatron.core.optimizer.optimizer")
    for name in CUDA_LITERAL_MODULES:
        module = importlib.import_module(name)
        _ORIGINALS[name + ".torch"] = module.torch
        module.torch = _CPUDeviceTorch()
    _ORIGINALS["clip_grad_by_total_norm_fp32"] = optimizer_module.clip_grad_by_total_norm_fp32
    optimizer_module.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_cpu
    dispatcher = importlib.import_module("megatron.core.transformer.moe.token_dispatcher")
    _ORIGINALS["token_dispatcher.maybe_move_tensor_to_cpu"] = dispatcher.maybe_move_tensor_to_cpu
    dispatcher.maybe_move_tensor_to_cpu = split_sizes_as_numpy
    float16 = optimizer_module.Float16OptimizerWithFloat16Params
    _ORIGINALS["Float16OptimizerWithFloat16Params.__init__"] = float16.__init__
    float16.__init__ = _with_cuda_type_names(float16.__init__)
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
