"""Process-group start-up for every way a run is launched.

- torchrun (and the DeepSpeed launcher): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT are set.
- Slurm, one task per GPU (`srun --ntasks-per-node=G python -m megatron_attnres.train ...`): the
  ranks come from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID; MASTER_ADDR must be exported by
  the job script (the first host of the node list) and MASTER_PORT defaults to 29500.
- A bare process: a 1-rank group on an in-process store (no network port).
- Restarted by torchrun (--max-restarts): the store keys of each attempt are kept apart.

NCCL on GPU hosts (each rank on cuda:LOCAL_RANK), gloo on CPU.
"""

import os

import torch
import torch.distributed as dist


def launch_environment() -> dict[str, str]:
    """The rank variables for this process, from torchrun, Slurm, or defaults for 1 rank."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return {k: env[k] for k in ("RANK", "WORLD_SIZE")} | {
            "LOCAL_RANK": env.get("LOCAL_RANK", "0")
        }
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        if "MASTER_ADDR" not in env:
            raise RuntimeError(
                "Slurm task launch without MASTER_ADDR: export MASTER_ADDR=$(scontrol show "
                "hostnames $SLURM_JOB_NODELIST | head -n1) in the job script (see "
                "launch/slurm/train.sbatch), or start ranks with torchrun"
            )
        return {
            "RANK": env["SLURM_PROCID"],
            "WORLD_SIZE": env["SLURM_NTASKS"],
            "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        }
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}


def init_distributed() -> None:
    """Start the default process group (no-op when one exists)."""
    if dist.is_initialized():
        return
    ranks = launch_environment()
    os.environ.update(ranks)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(ranks["LOCAL_RANK"]))
        backend = "nccl"
    else:
        backend = "gloo"
    if ranks["WORLD_SIZE"] == "1":
        # One rank needs no rendezvous: an in-process store, no port to race for (an inherited
        # MASTER_ADDR/MASTER_PORT may name a port another process holds).
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        return
    os.environ.setdefault("MASTER_PORT", "29500")
    rank, world = int(ranks["RANK"]), int(ranks["WORLD_SIZE"])
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None:
        dist.init_process_group(backend, rank=rank, world_size=world)
        return
    # Under torchrun --max-restarts the agent's store outlives a restart (torch 2.14,
    # --standalone or a fixed endpoint) and still holds the previous attempt's keys (gloo peer
    # addresses, NCCL unique ids): restarted ranks would wait forever for dead peers. Each
    # attempt gets its own key prefix (tests/training/test_fault_injection.py, 2 ranks).
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world))
    store = dist.PrefixStore(f"attnres/attempt_{restart}/", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world)
