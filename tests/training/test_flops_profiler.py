"""The FLOP formula behind TFLOP/s and MFU (`config.flops.flops_per_token`) against an independent
count: DeepSpeed's FLOPs profiler on the forward pass of the tiny model.

What the profiler counts here (deepspeed/profiling/flops_profiler/profiler.py): 2 x MACs of every
F.linear / torch.matmul / bmm call, so the MoE experts only over the tokens routed to them
(top-k of num_experts), and F.scaled_dot_product_attention over the full S x S score matrix
(causal masking not subtracted, as our formula counts attention). It counts nothing for the
elementwise work of this model: SiLU is the config's function object, bound before the profiler
patches F.silu; RMSNorm (F.rms_norm), torch.softmax and the `*` / `+` operators are not patched.

One correction: its matmul counter charges `prod(input.shape) * other.shape[-1]` MACs, which for
a matrix-vector product [T, H] @ [H] is T x H x H instead of T x H (deepspeedai/DeepSpeed PR 8419).
The depth read's scores are such products (`v_TH @ q_H`), so the test counts 1-D right operands
correctly; left as is, the profiler would report 2 x H times the depth reads' dot products.
"""

import importlib.util
import os
import socket

import pytest
import torch
import torch.distributed as dist

from tests.training.trainer_runs import TINY

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"
    ),
]
SEQ, BATCH = 128, 2  # the tiny config's sequence length


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def megatron_parallel_state():
    """One gloo rank with Megatron's parallel state (TP = PP = EP = 1) and the CPU compat layer,
    as in tests/mcore/conftest.py; whatever already exists is reused and left in place."""
    from megatron.core import parallel_state as ps

    from megatron_attnres.mcore.compat import activate_cpu_compat

    activate_cpu_compat()
    made_group = not dist.is_initialized()
    if made_group:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(_free_port())
        dist.init_process_group("gloo", rank=0, world_size=1)
    made_state = not ps.model_parallel_is_initialized()
    if made_state:
        ps.initialize_model_parallel(1, 1)
    yield
    if made_state:
        ps.destroy_model_parallel()
    if made_group:
        dist.destroy_process_group()


def _matmul_flops(input, other, *, out=None):
    """DeepSpeed's matmul count, with a 1-D right operand contracting to one output per row."""
    macs = input.numel() * (other.shape[-1] if other.dim() > 1 else 1)
    return 2 * macs, macs


def _profile_forward(model, tokens, positions, monkeypatch) -> dict[str, int]:
    """FLOPs of one forward pass, summed by module type (each functional call is charged to the
    innermost module that made it)."""
    from deepspeed.profiling.flops_profiler import profiler as profiler_module

    monkeypatch.setattr(profiler_module, "_matmul_flops_compute", _matmul_flops)
    profiler = profiler_module.FlopsProfiler(model)
    profiler.start_profile()
    try:
        with torch.no_grad():
            model(tokens, positions, None)
        flops = {}
        for module in model.modules():
            name = type(module).__name__
            flops[name] = flops.get(name, 0) + module.__flops__
        assert sum(flops.values()) == profiler.get_total_flops()
        assert profiler.get_total_flops() == 2 * profiler.get_total_macs()  # no elementwise
    finally:
        profiler.end_profile()
    return flops


@pytest.mark.usefixtures("megatron_parallel_state")
def test_flops_per_token_matches_deepspeeds_profiler(monkeypatch):
    from megatron_attnres.config.flops import flops_per_token
    from megatron_attnres.config.load import load_run_config
    from megatron_attnres.config.megatron import (
        layer_pattern,
        padded_vocab_size,
        transformer_config,
    )
    from megatron_attnres.mcore.compat import model_parallel_manual_seed
    from megatron_attnres.mcore.model import build_model

    # DeepSpeed's profiler counts torch calls: the reads must run the PyTorch op, not the CPU
    # kernel (kernels/depth_read_cpu.py), whose arithmetic it cannot see.
    monkeypatch.setenv("ATTNRES_DEPTH_READ", "torch")
    run = load_run_config(TINY, {"seq_length": SEQ})
    vocab = padded_vocab_size(run, run.tokenizer_vocab_size)
    config, pattern = transformer_config(run), layer_pattern(run)
    schedule = config.depth_block_schedule()
    reads = [schedule.sources(i).num_sources for i in range(1, schedule.num_sublayers + 1)]
    reads.append(schedule.num_final_sources())  # the output read
    model_parallel_manual_seed(1234)
    model = build_model(config, pattern, vocab, SEQ).eval()
    tokens = torch.randint(0, vocab, (BATCH, SEQ))
    positions = torch.arange(SEQ).expand(BATCH, SEQ)

    by_module = _profile_forward(model, tokens, positions, monkeypatch)
    profiled = {name: flops / (BATCH * SEQ) for name, flops in by_module.items() if flops}
    ours = flops_per_token(run, vocab, pattern, reads) / 3  # training = 3 x forward
    ours_without_reads = flops_per_token(run, vocab, pattern, []) / 3

    # The criterion: the whole forward within 5%.
    assert ours == pytest.approx(sum(profiled.values()), rel=0.05), (ours, profiled)
    # Sharper: projections, MLPs, router, routed and shared experts, output layer and attention
    # agree exactly ...
    assert ours_without_reads == sum(v for k, v in profiled.items() if k != "DepthAttention")
    # ... and the depth reads' dot products are half our depth term, whose other half is the
    # weighted sum sum_i a_i v_i (`*` and `+`, which the profiler does not see).
    assert profiled["DepthAttention"] == (ours - ours_without_reads) / 2
