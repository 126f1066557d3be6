import os
import socket

import pytest
import torch.distributed as dist

from megatron_attnres.data.preprocess import prepare_builtin_data


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gloo_rank():
    """A 1-rank gloo process group (as in a training job), destroyed afterwards if made here."""
    created = not dist.is_initialized()
    if created:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(_free_port())
        dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    if created:
        dist.destroy_process_group()


@pytest.fixture(scope="session")
def builtin_data(tmp_path_factory):
    """Tokenizer (vocab 2048) and indexed dataset of the built-in corpus."""
    return prepare_builtin_data(tmp_path_factory.mktemp("builtin"), vocab_size=2048)
