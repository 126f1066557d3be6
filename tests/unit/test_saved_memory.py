"""The lean depth read saves per-token scalars, not full tensors (docs/architecture.md
section 3)."""

import torch

from megatron_attnres.attnres import depth_read, depth_read_reference

NUM_SOURCES, TOKENS, HIDDEN = 9, 4096, 256


def saved_bytes_excluding_inputs(op, sources, w, g):
    """Bytes of tensors autograd saves for `op` whose storage is not one of the op's inputs."""
    input_storages = {t.untyped_storage().data_ptr() for t in [*sources, w, g]}
    counted = {}

    def pack(tensor):
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in input_storages:
            counted[ptr] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        op(sources, w, g, 1e-5)
    return sum(counted.values())


def test_lean_op_saves_at_least_10x_fewer_bytes():
    sources = [torch.randn(TOKENS, HIDDEN, requires_grad=True) for _ in range(NUM_SOURCES)]
    w = torch.randn(HIDDEN, requires_grad=True)
    g = torch.ones(HIDDEN, requires_grad=True)
    lean = saved_bytes_excluding_inputs(depth_read, sources, w, g)
    reference = saved_bytes_excluding_inputs(depth_read_reference, sources, w, g)
    # Documented figure: three fp32 scalars (inverse rms, score term, weight) per source and token.
    assert lean == 3 * NUM_SOURCES * TOKENS * 4
    # The reference keeps at least the stacked fp32 values: N * T * H * 4 bytes.
    assert reference >= NUM_SOURCES * TOKENS * HIDDEN * 4
    assert reference >= 10 * lean, (reference, lean)
