"""The op benchmark's adapters to the peer kernels flash-attn-res and fast-attnres
(bench/op.py `peer_reads`): on a GPU with the packages installed, each computes our depth read
(forward and source gradients) at bf16 tolerance; everywhere, a missing or broken package is
reported by name instead of failing the benchmark."""

import importlib.metadata

import pytest
import torch

from megatron_attnres.attnres.depth_read import depth_read_reference
from megatron_attnres.bench import op

EPS = 1e-5


def test_absent_and_broken_peers_are_reported(monkeypatch):
    def version(dist):
        if dist == "fast-attnres":
            return "9.9"  # "installed" but its module does not import
        raise importlib.metadata.PackageNotFoundError(dist)

    def broken():
        raise ImportError("no module named attnres")

    monkeypatch.setattr(op.importlib.metadata, "version", version)
    monkeypatch.setitem(op._ADAPTERS, "fast_attnres", broken)
    found = op.peer_reads()
    assert found["flash_attn_res"] == (None, "not installed")
    assert found["fast_attnres"] == (
        None,
        "fast-attnres 9.9 does not import (no module named attnres)",
    )
    impls, skipped = op.implementations("cuda", compile=False)
    assert "flash_attn_res" not in impls and skipped["flash_attn_res"] == "not installed"


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(op.PEERS))
def test_peer_read_matches_the_reference(name):
    read, why = op.peer_reads()[name]
    if read is None:
        pytest.skip(f"{op.PEERS[name]}: {why} (pip install 'megatron-attnres[bench-peers]')")
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape, hidden = (256, 2, 512), 512
    sources = [(0.5 + j) * torch.randn(shape, generator=gen, device="cuda") for j in range(4)]
    sources = [s.bfloat16().requires_grad_() for s in sources]
    w = (0.3 * torch.randn(hidden, generator=gen, device="cuda")).requires_grad_()
    g = (1 + 0.1 * torch.randn(hidden, generator=gen, device="cuda")).requires_grad_()
    grad_out = torch.randn(shape, generator=gen, device="cuda").bfloat16()
    out = read(sources, w, g, EPS)
    ref = depth_read_reference([s.float() for s in sources], w, g, EPS)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    got = torch.autograd.grad(out, sources, grad_out)
    want = torch.autograd.grad(ref, sources, grad_out.float())
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.float(), b, rtol=5e-2, atol=5e-2)
