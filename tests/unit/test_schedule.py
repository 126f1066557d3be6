"""The depth-block schedule against counts worked out by hand and the formulas of
docs/architecture.md section 3."""

import pytest

from megatron_attnres.attnres import DepthBlockSchedule, ResidualMode


def test_48b_shape_final_read_has_10_sources():
    # Kimi Linear 48B: 27 layers = 54 sublayers, 3 layers (6 sublayers) per depth block.
    schedule = DepthBlockSchedule.from_layers(27, "block", layers_per_block=3)
    assert (schedule.num_sublayers, schedule.sublayers_per_block) == (54, 6)
    assert schedule.num_final_sources() == 10
    assert DepthBlockSchedule(54, ResidualMode.FULL).num_final_sources() == 55


@pytest.mark.parametrize(
    ("L", "S"), [(L, S) for L in (1, 5, 12, 54) for S in (1, 2, 3, 6, 7) if S <= L]
)
def test_final_source_count_formula(L, S):
    schedule = DepthBlockSchedule(L, ResidualMode.FULL if S == 1 else ResidualMode.BLOCK, S)
    assert schedule.num_final_sources() == (L - 1) // S + 2


def test_sources_per_sublayer_by_hand():
    # 7 sublayers, 3 per depth block: blocks {1,2,3} {4,5,6} {7}.
    schedule = DepthBlockSchedule(7, "block", 3)
    expected = {
        1: (1, False),
        2: (1, True),
        3: (1, True),
        4: (2, False),
        5: (2, True),
        6: (2, True),
        7: (3, False),
    }
    for n, (completed, partial) in expected.items():
        spec = schedule.sources(n)
        assert (spec.num_completed, spec.has_partial) == (completed, partial), n
    assert [n for n in range(1, 8) if schedule.starts_block(n)] == [1, 4, 7]
    assert schedule.final_sources().num_sources == 4  # b_0, b_1, b_2 and the partial block 3


def test_full_mode_reads_every_earlier_output():
    schedule = DepthBlockSchedule(5, "full")
    assert [schedule.sources(n).num_sources for n in range(1, 6)] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("bad", [0, -2, 1.5, "3", None, True])
def test_block_size_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match=f"got {bad!r}"):
        DepthBlockSchedule(8, "block", bad)
    with pytest.raises(ValueError, match=f"got {bad!r}"):
        DepthBlockSchedule.from_layers(8, "block", layers_per_block=bad)


def test_block_larger_than_model_is_rejected():
    with pytest.raises(ValueError, match="layers_per_block=5 exceeds num_layers=4"):
        DepthBlockSchedule.from_layers(4, "block", layers_per_block=5)


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="'blocks' is not a valid ResidualMode"):
        DepthBlockSchedule(4, "blocks", 2)


def test_pipeline_split_cuts_only_at_block_boundaries():
    schedule = DepthBlockSchedule.from_layers(27, "block", layers_per_block=3)  # 9 blocks
    stages = schedule.split_stages(4)
    assert [(s.start, s.stop - 1) for s in stages] == [(1, 18), (19, 30), (31, 42), (43, 54)]
    assert all((s.start - 1) % 6 == 0 for s in stages)
    assert [schedule.summaries_entering(s.start) for s in stages] == [1, 4, 6, 8]
    assert schedule.valid_pipeline_cuts() == [6, 12, 18, 24, 30, 36, 42, 48]
    with pytest.raises(ValueError, match="inside a depth block"):
        schedule.summaries_entering(8)
    with pytest.raises(ValueError, match="use at most 9 stages"):
        schedule.split_stages(10)


def test_saved_activation_overhead_counts_partials_and_read_scalars():
    tokens, hidden, act_bytes = 10, 8, 2
    assert DepthBlockSchedule(4, "none").saved_activation_overhead_bytes(tokens, hidden, 2) == 0
    # 4 sublayers, 2 per depth block. Reads: j=1 has 1 source (identity, nothing saved),
    # j=2: b0 + partial, j=3: b0 b1, j=4: b0 b1 + partial, output read: b0 b1 + partial.
    schedule = DepthBlockSchedule(4, "block", 2)
    partials = 4 * tokens * hidden * act_bytes
    scalars = 3 * 4 * tokens * (2 + 2 + 3 + 3)
    assert schedule.saved_activation_overhead_bytes(tokens, hidden, act_bytes) == scalars
    overhead = schedule.saved_activation_overhead_bytes(tokens, hidden, act_bytes, False)
    assert overhead == partials + scalars
