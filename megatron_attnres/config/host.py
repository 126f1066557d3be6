"""What this host offers and the GPU implementation choices that follow from it.

The run config's implementation keys (transformer_impl, moe_grouped_gemm, overlap_grad_reduce,
overlap_param_gather, batch_p2p_comm) default to null, which means "what suits this host": the
fast GPU path where CUDA and TransformerEngine are present, the local/off path elsewhere. Loading
a config resolves them (config/load.py), so the printed and saved config shows what was chosen.
"""

import dataclasses
import importlib.util
from dataclasses import dataclass

import torch

from megatron_attnres.config.run import RunConfig

IMPLEMENTATION_KEYS = (
    "transformer_impl",
    "moe_grouped_gemm",
    "overlap_grad_reduce",
    "overlap_param_gather",
    "batch_p2p_comm",
)


@dataclass(frozen=True)
class Host:
    cuda: bool  # a CUDA device is visible (NCCL process groups; gloo otherwise)
    transformer_engine: bool  # TransformerEngine is importable

    @property
    def backend(self) -> str:
        """The process-group backend train/distributed.py starts on this host."""
        return "nccl" if self.cuda else "gloo"

    def describe(self) -> str:
        yes = {True: "yes", False: "no"}
        return f"CUDA {yes[self.cuda]}, TransformerEngine {yes[self.transformer_engine]}"


def probe() -> Host:
    """This host (cheap: no import of TransformerEngine itself, no CUDA context)."""
    te = importlib.util.find_spec("transformer_engine") is not None
    return Host(cuda=torch.cuda.is_available(), transformer_engine=te)


def host_defaults(run: RunConfig, host: Host) -> dict:
    """The value each implementation key takes on `host` when the config leaves it null.

    - transformer_impl: TransformerEngine's spec where CUDA and TE are present, else local.
    - moe_grouped_gemm: with the TE spec and experts (TE's grouped GEMM), else off.
    - overlap_grad_reduce: on with CUDA (NCCL overlaps the reduce with backward), off on gloo.
    - overlap_param_gather: with CUDA and the distributed optimizer (it gathers the shards it
      keeps), else off.
    - batch_p2p_comm: on with CUDA, as megatron-core's default; off on gloo, where it gives wrong
      results with interleaving (docs/architecture.md section 4) and gains nothing otherwise.
    """
    te = host.cuda and host.transformer_engine
    return {
        "transformer_impl": "transformer_engine" if te else "local",
        "moe_grouped_gemm": bool(te and run.num_experts),
        "overlap_grad_reduce": host.cuda,
        "overlap_param_gather": host.cuda and run.use_distributed_optimizer,
        "batch_p2p_comm": host.cuda,
    }


def resolve_implementation(run: RunConfig, host: Host | None = None) -> RunConfig:
    """`run` with every null implementation key set to this host's default (others kept)."""
    unset = [key for key in IMPLEMENTATION_KEYS if getattr(run, key) is None]
    if not unset:
        return run
    defaults = host_defaults(run, host or probe())
    return dataclasses.replace(run, **{key: defaults[key] for key in unset})


def implementation_line(run: RunConfig, host: Host | None = None) -> str:
    """One line for the run's start: the host and what was chosen for it."""
    chosen = ", ".join(f"{key}={getattr(run, key)}" for key in IMPLEMENTATION_KEYS)
    return f"implementation ({(host or probe()).describe()}): {chosen}"
