import os
import socket

import pytest
import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def megatron_single_rank():
    """One gloo rank with Megatron's parallel state (TP = PP = EP = 1) and the CPU compat layer."""
    from megatron.core import parallel_state as ps

    from megatron_attnres.mcore.compat import activate_cpu_compat

    activate_cpu_compat()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(_free_port())
        dist.init_process_group("gloo", rank=0, world_size=1)
    ps.initialize_model_parallel(1, 1)
    yield
    ps.destroy_model_parallel()


@pytest.fixture(autouse=True)
def _seeded(megatron_single_rank):
    from megatron_attnres.mcore.compat import model_parallel_manual_seed

    model_parallel_manual_seed(1234)
    torch.manual_seed(1234)
