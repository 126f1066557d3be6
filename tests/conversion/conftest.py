import pytest
import torch
import torch.distributed as dist
import transformers


@pytest.fixture(scope="module")
def megatron_one_rank():
    """One gloo rank (in-process store) with Megatron's parallel state TP = PP = EP = 1 and the
    CPU compat layer; torn down afterwards if created here."""
    from megatron.core import parallel_state as ps

    from megatron_attnres.conversion.megatron_io import one_rank_process_group
    from megatron_attnres.mcore.compat import model_parallel_manual_seed

    created_group = not dist.is_initialized()
    one_rank_process_group()
    created_state = not ps.model_parallel_is_initialized()
    if created_state:
        ps.initialize_model_parallel(1, 1)
    model_parallel_manual_seed(1234)
    yield
    if created_state:
        ps.destroy_model_parallel()
    if created_group:
        dist.destroy_process_group()


@pytest.fixture
def hf_modules_cache(tmp_path, monkeypatch):
    """trust_remote_code copies the folder's modeling code here, not into $HF_HOME."""
    import sys

    monkeypatch.setattr(
        transformers.dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "hf_modules")
    )
    monkeypatch.setattr(sys, "path", list(sys.path))
    # A `transformers_modules` package imported by an earlier test points at that test's cache;
    # relative imports between shipped files (modeling_kda) must resolve in this one.
    for name in [m for m in sys.modules if m.split(".")[0] == "transformers_modules"]:
        monkeypatch.delitem(sys.modules, name)


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """Tiny models: one thread beats two and does not oversubscribe a shared host."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer_model(tmp_path_factory):
    """A sentencepiece model trained by attnres-train-tokenizer's code on the built-in corpus."""
    from megatron_attnres.data import builtin_corpus_path
    from megatron_attnres.data.tokenizer import train_tokenizer

    return train_tokenizer([builtin_corpus_path()], tmp_path_factory.mktemp("tok") / "tok", 384)
