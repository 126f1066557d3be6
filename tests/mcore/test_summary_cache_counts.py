"""The interleaved schedule's cached summary traffic (docs/architecture.md section 5), for many
shapes.

The exact count comes from the cache's `known()` rule applied to the stage layout that
`pipeline_pattern` produces; the oracle is the closed form written in the design notes:
the first round sends b_0 + c Np into chunk c < P, later transitions (P - 1) Np. It must be at
most the paper's P(P - 1)/2 Np + (V - 1) P^2 Np and below sending the full history.
"""

import pytest
import torch

from megatron_attnres.attnres.reference import ReferenceConfig
from megatron_attnres.mcore.model import pipeline_pattern
from megatron_attnres.mcore.pipeline import cached_transfer_counts, chunk_first_layers
from megatron_attnres.testing.reference_mapping import megatron_config, reference_pattern


@pytest.mark.parametrize(("P", "V", "Np"), [(2, 2, 1), (2, 3, 2), (4, 2, 1), (4, 3, 2), (3, 4, 1)])
def test_cached_traffic_matches_the_closed_form_and_the_papers_bound(P, V, Np):
    blocks = P * V * Np
    ref = ReferenceConfig(
        vocab_size=32,
        hidden_size=16,
        num_layers=blocks,
        num_attention_heads=2,
        ffn_hidden_size=16,
        residual_mode="block",
        layers_per_block=1,
    )
    config = megatron_config(
        ref,
        pipeline_model_parallel_size=P,
        virtual_pipeline_model_parallel_size=V,
        pipeline_dtype=torch.float32,
    )
    schedule = config.depth_block_schedule()
    pattern = pipeline_pattern(config, reference_pattern(ref))
    entering = [schedule.summaries_entering(first) for first in chunk_first_layers(pattern)]
    assert entering == [1 + c * Np for c in range(P * V)]  # Np blocks per chunk

    counts = cached_transfer_counts(entering, P)
    assert counts == [c * Np + 1 if c < P else (P - 1) * Np for c in range(1, P * V)]
    ours = sum(counts)  # b_0 included
    assert ours == (P - 1) + P * (P - 1) // 2 * Np + (V - 1) * P * (P - 1) * Np
    assert ours <= P * (P - 1) // 2 * Np + (V - 1) * P**2 * Np
    assert ours < sum(entering[1:])  # the full history of every transition
