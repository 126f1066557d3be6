"""The trainer's optimizer: which parameters decay and which optimizer steps them.

Weight decay is for matrices only (Megatron's default grouping): AttnRes pseudo-queries, key-norm
gains and RMSNorm gains are 1-D and never decay. With `optimizer: muon`, megatron-core's Muon
steps the hidden matrices and AdamW the embeddings, the output layer and every 1-D parameter.
"""

from pathlib import Path

import pytest

from megatron_attnres.config.load import load_run_config
from megatron_attnres.config.megatron import layer_pattern, transformer_config
from megatron_attnres.mcore.model import build_model_chunks
from megatron_attnres.train.engine import wrap_ddp
from megatron_attnres.train.optimizer import optimizer_and_scheduler

pytestmark = [pytest.mark.mcore]
TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def _groups(optimizer_name: str) -> list[tuple[str, float, set[str]]]:
    """(inner optimizer class, weight decay, parameter names) for every param group."""
    run = load_run_config(TINY, {"optimizer": optimizer_name})
    chunks = wrap_ddp(build_model_chunks(transformer_config(run), layer_pattern(run), 1024, 64))
    optimizer, _ = optimizer_and_scheduler(run, chunks)
    names = {id(p): n.removeprefix("module.") for c in chunks for n, p in c.named_parameters()}
    out = []
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in sub.optimizer.param_groups:
            params = {names[id(p)] for p in group["params"]}
            out.append((type(sub.optimizer).__name__, group["weight_decay"], params))
    assert set().union(*(g[2] for g in out)) == set(names.values())  # every parameter, once
    assert sum(len(g[2]) for g in out) == len(names)
    return out


def _is_vector(name: str) -> bool:
    return name.endswith(("pseudo_query", "key_norm_weight", "layernorm.weight", "norm.weight"))


def test_adamw_decays_matrices_only():
    for _, decay, params in _groups("adam"):
        attnres = {n for n in params if "depth_reads" in n or "output_read" in n}
        if decay > 0:
            assert not any(_is_vector(n) for n in params), params
        else:
            assert params and all(_is_vector(n) for n in params), params
            assert len(attnres) == 2 * (8 + 1)  # 8 sublayer reads + the output read


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    pytest.importorskip("emerging_optimizers")
    groups = _groups("muon")
    muon = set().union(*(p for kind, _, p in groups if "Muon" in kind))
    adamw = set().union(*(p for kind, _, p in groups if "Muon" not in kind))
    assert muon and all(n.endswith(".weight") and not _is_vector(n) for n in muon)
    assert "embedding.word_embeddings.weight" in adamw and "output_layer.weight" in adamw
    assert {n for n in adamw if n.endswith("pseudo_query")} == {
        n for n in muon | adamw if n.endswith("pseudo_query")
    }
    assert any("linear_qkv" in n for n in muon) and any("experts" in n for n in muon)
