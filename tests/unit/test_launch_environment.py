"""The trainer reads its rank from torchrun's variables, from Slurm's (srun one task per GPU), or
runs as one rank; a Slurm task launch without MASTER_ADDR is refused with the fix."""

import pytest

from megatron_attnres.train.distributed import launch_environment

VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
)


@pytest.fixture
def env(monkeypatch):
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_torchrun_variables_win(env):
    env.setenv("RANK", "3")
    env.setenv("WORLD_SIZE", "8")
    env.setenv("LOCAL_RANK", "1")
    env.setenv("SLURM_PROCID", "0")  # torchrun inside an sbatch job: torchrun's ranks count
    env.setenv("SLURM_NTASKS", "2")
    assert launch_environment() == {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}


def test_slurm_task_per_gpu(env):
    env.setenv("SLURM_PROCID", "5")
    env.setenv("SLURM_NTASKS", "16")
    env.setenv("SLURM_LOCALID", "1")
    env.setenv("MASTER_ADDR", "node0")
    assert launch_environment() == {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1"}


def test_slurm_without_master_addr_is_refused(env):
    env.setenv("SLURM_PROCID", "0")
    env.setenv("SLURM_NTASKS", "2")
    with pytest.raises(RuntimeError, match="export MASTER_ADDR=.*scontrol show hostnames"):
        launch_environment()


def test_single_process_and_a_one_task_slurm_job_are_one_rank(env):
    assert launch_environment() == {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    env.setenv("SLURM_PROCID", "0")
    env.setenv("SLURM_NTASKS", "1")  # sbatch's batch step running torchrun or a bare process
    assert launch_environment() == {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
