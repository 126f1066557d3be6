"""The cost model (bench/cost_model.py): the paper's traffic figures (docs/architecture.md
section 6), and exact agreement with the read/write bytes instrumented inside the HF model's
two-phase depth reads."""

import pytest
import torch

from megatron_attnres.attnres.schedule import DepthBlockSchedule
from megatron_attnres.bench.cost_model import (
    Traffic,
    paper_elements,
    paper_items,
    read_training_traffic,
    two_phase_traffic,
)
from megatron_attnres.bench.traffic import instrument_two_phase
from megatron_attnres.conversion.hf import modeling_attnres
from megatron_attnres.conversion.hf.configuration_attnres import AttnResConfig

D = 2304  # any hidden size; the figures are per d


def test_paper_figures_for_8_blocks_of_16():
    # Oracle: the paper's Table 1 as docs/architecture.md section 6 quotes it.
    assert paper_elements("none", D) == 3 * D
    assert paper_elements("block", D, num_blocks=8, block_size=16) == 5.5 * D
    assert paper_elements("full", D, num_blocks=8, block_size=16) == 24 * D
    assert paper_elements("mhc", D, streams=4) == 34 * D + 2 * 16 + 4 * 4


def test_itemised_accounting_reproduces_the_paper_totals():
    assert sum(paper_items("none").values()) == 3
    assert sum(paper_items("block", 8, 16).values()) == 5.5
    assert sum(paper_items("block", 9, 6).values()) == pytest.approx(9 / 6 + 5)
    # Full: the paper's (S + N) leaves out the embedding's 1/S (see the module docstring).
    assert sum(paper_items("full", 8, 16).values()) == pytest.approx(24 + 1 / 16)


CASES = [  # (transformer layers, layers per depth block, mode, dtype): (N blocks, S)
    (4, 1, "block", torch.float32),  # N = 4, S = 2
    (6, 2, "block", torch.float32),  # N = 3, S = 4
    (6, 3, "block", torch.float32),  # N = 2, S = 6
    (5, 2, "block", torch.float32),  # N = 3, S = 4, a shorter last block
    (3, 1, "full", torch.float32),  # N = 6, S = 1
    (4, 1, "block", torch.bfloat16),  # bf16 sources, fp32 statistics
]


def instrumented_forward(layers, layers_per_block, mode, dtype, tokens_shape=(2, 5), hidden=16):
    config = AttnResConfig(
        vocab_size=32,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=32,
        num_experts=0,
        attn_res_mode=mode,
        attn_res_block_size=layers_per_block,
        mixer_types=["full_attention"] * layers,
    )
    model = modeling_attnres.AttnResModel(config).to(dtype).eval()
    ids = torch.randint(0, 32, tokens_shape)
    with torch.no_grad(), instrument_two_phase(modeling_attnres) as measured:
        model(ids, use_cache=False, attn_res_two_phase=True)
    return measured


@pytest.mark.parametrize(("layers", "per_block", "mode", "dtype"), CASES)
def test_two_phase_bytes_equal_the_instrumented_counts(layers, per_block, mode, dtype):
    measured = instrumented_forward(layers, per_block, mode, dtype)
    S = 2 * per_block if mode == "block" else 1
    schedule = DepthBlockSchedule(2 * layers, mode, S)
    predicted = two_phase_traffic(schedule, tokens=10, hidden=16, act_bytes=dtype.itemsize)
    assert measured.calls["phase1"] == schedule.num_blocks
    for phase in ("phase1", "phase2"):
        assert measured.unavoidable[phase] == predicted[phase], phase
        # The eager code moves more than a fused kernel must (its temporaries).
        assert measured.all_ops[phase].total > measured.unavoidable[phase].total


def test_instrumentation_sees_a_phase_that_reads_too_much(monkeypatch):
    """Negative control: a phase 2 that touches every read's statistics (the whole o_TRH, not
    its own row) is measured as such, and no longer matches the cost model."""
    original = modeling_attnres.depth_read_phase2

    def wasteful(stats, read, *args, **kwargs):
        stats = stats._replace(acc_TRH=stats.acc_TRH * 1.0)  # reads all R rows
        return original(stats, read, *args, **kwargs)

    monkeypatch.setattr(modeling_attnres, "depth_read_phase2", wasteful)
    measured = instrumented_forward(4, 1, "block", torch.float32)
    predicted = two_phase_traffic(DepthBlockSchedule(8, "block", 2), 10, 16, 4)
    assert measured.unavoidable["phase2"].read > predicted["phase2"].read


def test_training_read_counts_sources_and_scalars():
    parts = read_training_traffic(n=9, tokens=100, hidden=64, act_bytes=2)
    assert parts["forward"] == Traffic(
        read=9 * 100 * 64 * 2, write=100 * 64 * 2 + 3 * 9 * 100 * 4, flops=6 * 9 * 64 * 100
    )
    assert read_training_traffic(n=1, tokens=100, hidden=64, act_bytes=2)["forward"] == Traffic()
