"""The GPU implementation keys (transformer_impl, moe_grouped_gemm, overlap_grad_reduce,
overlap_param_gather, batch_p2p_comm): null resolves to the host's choice when a config is
loaded, the resolved config and the start-up line show it, and what is wrong is refused. The
host is simulated by replacing config.host.probe (this machine has neither CUDA nor TE)."""

from pathlib import Path

import pytest

from megatron_attnres.config import host as host_module
from megatron_attnres.config.host import IMPLEMENTATION_KEYS, Host
from megatron_attnres.config.load import dump, load_run_config
from megatron_attnres.config.rules import check_host_support

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
H100 = Host(cuda=True, transformer_engine=True)
CPU = Host(cuda=False, transformer_engine=False)


def _on(monkeypatch, host: Host) -> None:
    monkeypatch.setattr(host_module, "probe", lambda: host)


def test_a_gpu_host_with_te_picks_te_grouped_gemm_and_overlap(monkeypatch):
    _on(monkeypatch, H100)
    run = load_run_config(TINY)
    assert run.transformer_impl == "transformer_engine"
    assert run.moe_grouped_gemm is True and run.overlap_grad_reduce is True
    assert run.batch_p2p_comm is True
    assert run.overlap_param_gather is False  # tiny.yaml has no distributed optimizer
    distributed = load_run_config(TINY, {"use_distributed_optimizer": True})
    assert distributed.overlap_param_gather is True
    dense = load_run_config(TINY, {"num_experts": None, "moe_router_topk": 2})
    assert dense.moe_grouped_gemm is False  # no experts, no grouped GEMM
    assert "transformer_impl: transformer_engine" in dump(run)
    assert "overlap_grad_reduce: true" in dump(run)


def test_a_cpu_host_picks_local_and_off(monkeypatch):
    _on(monkeypatch, CPU)
    run = load_run_config(TINY)
    assert run.transformer_impl == "local"
    assert not any(getattr(run, key) for key in IMPLEMENTATION_KEYS[1:])
    assert "transformer_impl: local" in dump(run) and "batch_p2p_comm: false" in dump(run)


def test_a_gpu_without_te_keeps_local_modules_but_overlaps(monkeypatch):
    _on(monkeypatch, Host(cuda=True, transformer_engine=False))
    run = load_run_config(TINY)
    assert (run.transformer_impl, run.moe_grouped_gemm, run.overlap_grad_reduce) == (
        "local",
        False,
        True,
    )


def test_explicit_values_win_over_the_host(monkeypatch):
    _on(monkeypatch, H100)
    run = load_run_config(TINY, {"transformer_impl": "local", "moe_grouped_gemm": False})
    assert (run.transformer_impl, run.moe_grouped_gemm) == ("local", False)
    assert run.overlap_grad_reduce is True  # still the host's where left null


@pytest.mark.parametrize("host", [H100, CPU], ids=["h100", "cpu"])
def test_the_dry_run_prints_the_host_and_the_choice(monkeypatch, capsys, host):
    from megatron_attnres.train import trainer

    _on(monkeypatch, host)
    assert trainer.main(["--dry-run", "--config", str(TINY)]) == 0
    out = capsys.readouterr().out
    te = "yes" if host.transformer_engine else "no"
    assert f"implementation (CUDA {'yes' if host.cuda else 'no'}, TransformerEngine {te})" in out
    impl = "transformer_engine" if host.transformer_engine else "local"
    assert f"transformer_impl={impl}" in out and f"transformer_impl: {impl}" in out


def test_inconsistent_keys_are_refused_at_load():
    with pytest.raises(ValueError, match="overlap_param_gather=true without use_distributed"):
        load_run_config(TINY, {"overlap_param_gather": True})
    with pytest.raises(ValueError, match="moe_grouped_gemm=true with transformer_impl='local'"):
        load_run_config(TINY, {"moe_grouped_gemm": True, "transformer_impl": "local"})


def test_host_support_is_checked_when_a_run_is_built():
    te = load_run_config(TINY, {"transformer_impl": "transformer_engine"})  # loads anywhere
    with pytest.raises(ValueError, match="TransformerEngine's modules need both"):
        check_host_support(te, CPU)
    check_host_support(te, H100)
    interleaved = {
        "pipeline_model_parallel_size": 2,
        "virtual_pipeline_model_parallel_size": 2,
        "attn_res_block_layers": 1,
    }
    batched = load_run_config(TINY, {**interleaved, "batch_p2p_comm": True})
    with pytest.raises(ValueError, match="over gloo gives wrong gradients silently"):
        check_host_support(batched, CPU)
    check_host_support(batched, H100)  # NCCL is not affected
    check_host_support(load_run_config(TINY, {**interleaved, "batch_p2p_comm": False}), CPU)
    check_host_support(load_run_config(TINY, {"batch_p2p_comm": True}), CPU)  # no interleaving


def test_the_48b_configs_state_the_h100_choices():
    root = TINY.parent
    for name in ("kimi_linear_48b_attnres.yaml", "kimi_linear_48b_baseline.yaml"):
        run = load_run_config(root / name)
        assert run.transformer_impl == "transformer_engine" and run.moe_grouped_gemm
        assert run.overlap_grad_reduce and run.batch_p2p_comm
        assert run.overlap_param_gather is False  # Muon: no distributed optimizer
