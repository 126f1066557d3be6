"""train.build.build_run, the one ordered build the trainer, the benchmarks and these tests use,
against a model built step by step with megatron-core's own calls."""

import pytest
import torch

from tests.training.conftest import QUICK, TINY

pytestmark = [pytest.mark.mcore]


def _state(chunks) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for c in chunks for n, p in c.module.named_parameters()}


def test_build_run_builds_the_model_megatron_builds(megatron_rank):
    from megatron_attnres.checkpoint.format import model_signature
    from megatron_attnres.config.load import load_run_config, parse_overrides
    from megatron_attnres.config.megatron import layer_pattern, transformer_config
    from megatron_attnres.mcore.compat import model_parallel_manual_seed
    from megatron_attnres.mcore.model import build_model_chunks, pipeline_pattern
    from megatron_attnres.train.build import build_run

    run = load_run_config(TINY, parse_overrides(QUICK))
    built = build_run(run, 256, seed=7)

    model_parallel_manual_seed(7)
    config = transformer_config(run)
    pattern = pipeline_pattern(config, layer_pattern(run))
    by_hand = build_model_chunks(config, pattern, 256, run.seq_length)
    expected = {n: p.detach() for c in by_hand for n, p in c.named_parameters()}

    ours = _state(built.chunks)
    assert ours.keys() == expected.keys()
    assert all(torch.equal(ours[n], expected[n]) for n in ours)
    assert built.pattern == pattern and built.vocab_size == 256
    assert built.signature == model_signature(config, pattern, 256, tied_embeddings=False)
    stepped = {id(p) for g in built.optimizer.param_groups for p in g["params"]}
    assert stepped == {id(p) for c in built.chunks for p in c.parameters()}

    other = _state(build_run(run, 256, seed=8).chunks)  # negative control: the seed matters
    assert not all(torch.equal(other[n], ours[n]) for n in ours)
