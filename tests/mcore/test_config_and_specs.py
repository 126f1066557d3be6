"""Config validation, the CPU compat layer's documented changes, the TE spec's classes."""

import importlib

import pytest
import torch
from megatron.core.optimizer import OptimizerConfig

from megatron_attnres.attnres.reference import ReferenceConfig
from megatron_attnres.testing.reference_mapping import megatron_config

pytestmark = pytest.mark.mcore


def config(**overrides):
    ref = ReferenceConfig(
        num_layers=4,
        hidden_size=32,
        num_attention_heads=4,
        num_experts=4,
        residual_mode="block",
        layers_per_block=2,
    )
    return megatron_config(ref, **overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(attn_res_block_layers=0), "attn_res_block_layers=0"),
        (dict(attn_res_block_layers=5), "attn_res_block_layers=5 with 4 transformer layers"),
        (dict(attn_res_block_layers=2.5), "attn_res_block_layers=2.5"),
        (dict(attn_res_mode="blocks"), "attn_res_mode='blocks'"),
        (dict(num_layers=7), "num_layers=7"),
        (
            dict(expert_model_parallel_size=3),
            "num_moe_experts=4 is not divisible by expert_model_parallel_size=3",
        ),
        (
            dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
            "recompute_granularity='full'",
        ),
        (dict(fp32_residual_connection=True), "fp32_residual_connection=True"),
    ],
)
def test_invalid_combinations_are_refused_before_building(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        config(**overrides)
    assert "unsupported configuration" in str(err.value) and ";" in str(err.value)


def test_pipeline_cuts_must_fall_on_depth_block_boundaries():
    from megatron_attnres.mcore.model import check_pattern, hybrid_pattern, pipeline_pattern

    cfg = config(pipeline_model_parallel_size=2, pipeline_dtype=torch.float32)
    assert cfg.variable_seq_lengths  # packed summaries differ in length per boundary
    plain = hybrid_pattern(4, moe=True)  # 8 sublayers, depth blocks of 4
    assert pipeline_pattern(cfg, plain) == "*E*E|*E*E"
    check_pattern(cfg, "*E*E|*E*E")
    with pytest.raises(
        ValueError,
        match=r"after sublayer 2 \(transformer layer 1\).*cut after "
        r"sublayer 4 instead",
    ):
        check_pattern(cfg, "*E|*E*E*E")
    with pytest.raises(ValueError, match="has 1 pipeline segments.*'\\*E\\*E\\|\\*E\\*E'"):
        check_pattern(cfg, plain)
    with pytest.raises(ValueError, match="cannot split 2 depth blocks into 4 pipeline stages"):
        pipeline_pattern(
            config(pipeline_model_parallel_size=4, pipeline_dtype=torch.float32), plain
        )


def test_valid_config_gives_the_schedule():
    schedule = config().depth_block_schedule()
    assert (schedule.num_sublayers, schedule.sublayers_per_block) == (8, 4)
    assert config(enable_attention_residuals=False).depth_block_schedule().mode == "none"


def test_cpu_compat_lists_and_makes_its_changes():
    from megatron.core.tensor_parallel import random as mcore_random

    from megatron_attnres.mcore import compat

    assert compat.cpu_compat_active()  # activated by the session fixture on this CUDA-less host
    assert len(compat.CHANGES) == 6
    assert torch.cuda.current_device() == "cpu"
    for name in compat.CUDA_LITERAL_MODULES:  # change 3
        module_torch = importlib.import_module(name).torch
        assert module_torch.zeros(1, device="cuda").device.type == "cpu", name
        assert module_torch.tensor([1.0], device="cuda").device.type == "cpu", name
        module_torch.cuda.current_stream().wait_stream(module_torch.cuda.Stream())
        assert module_torch.nn is torch.nn  # everything else is torch's own
    assert torch.zeros(1).device.type == "cpu" and torch.tensor is not module_torch.tensor
    optimizer_module = importlib.import_module("megatron.core.optimizer.optimizer")
    assert optimizer_module.clip_grad_by_total_norm_fp32 is compat.clip_grad_by_total_norm_cpu
    bf16 = torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))  # change 5
    sgd = torch.optim.SGD([bf16], lr=1.0)
    mixed = optimizer_module.Float16OptimizerWithFloat16Params(
        sgd, OptimizerConfig(optimizer="sgd", lr=1.0, bf16=True), None, lambda opt, cfg: None
    )
    assert mixed.float16_groups[0] == [bf16]  # sorted as a bf16 parameter, fp32 main copy made
    assert mixed.fp32_from_float16_groups[0][0].dtype == torch.float32
    assert bf16.type() == "torch.BFloat16Tensor"  # only while the optimizer is constructed
    tracker = mcore_random.get_cuda_rng_tracker()
    assert isinstance(tracker, compat.CPURNGStatesTracker)
    assert set(tracker.get_states()) == {
        "data-parallel-rng",
        "model-parallel-rng",
        "expert-parallel-rng",
    }
    outer = torch.get_rng_state()
    with tracker.fork():
        first = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), outer)  # the default stream is untouched
    with tracker.fork():
        second = torch.rand(3)
    assert not torch.equal(first, second)  # the forked stream continues, it does not restart


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_cpu_grad_clipping_matches_torch(max_norm):
    from megatron_attnres.mcore.compat import clip_grad_by_total_norm_cpu

    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p)
    expected = [p.grad.clone() for p in params]
    oracle = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for o, g in zip(oracle, expected, strict=True):
        o.grad = g
    total = torch.nn.utils.clip_grad_norm_(oracle, max_norm).item()
    clip_grad_by_total_norm_cpu(params, max_norm, total)
    for p, o in zip(params, oracle, strict=True):
        torch.testing.assert_close(p.grad, o.grad)


def test_cpu_compat_is_a_no_op_on_cuda_hosts(monkeypatch):
    from megatron_attnres.mcore import compat

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert compat.activate_cpu_compat() == ()


def test_te_spec_names_the_intended_transformer_engine_classes():
    import megatron.core.extensions.transformer_engine as te

    from megatron_attnres.mcore.specs import attnres_te_stack_spec, raw_output_bda

    # Without TransformerEngine megatron binds these names to distinct mock objects, so identity
    # with the objects megatron exports under each name is what can be checked here.
    spec = attnres_te_stack_spec()
    assert spec.module.__qualname__ == "AttnResHybridStack"
    assert spec.params["final_norm_module"] is te.TENorm
    attention = spec.submodules.attention_layer.submodules.self_attention.submodules
    assert attention.linear_qkv is te.TELayerNormColumnParallelLinear
    assert attention.core_attention is te.TEDotProductAttention
    assert attention.linear_proj is te.TERowParallelLinear
    assert spec.submodules.moe_layer.submodules.pre_mlp_layernorm is te.TENorm
    assert te.TELayerNormColumnParallelLinear is not te.TERowParallelLinear
    mla = spec.submodules.mla_layer.submodules.self_attention
    assert mla.module.__qualname__ == "AttnResMLASelfAttention"
    assert mla.submodules.kv_layernorm is te.TENorm and mla.submodules.q_layernorm is te.TENorm
    assert mla.submodules.linear_q_proj is te.TEColumnParallelLinear  # no extra fused q norm
    for field in ("attention_layer", "mla_layer", "mlp_layer", "moe_layer"):
        layer = getattr(spec.submodules, field).submodules
        assert raw_output_bda in (layer.self_attn_bda, layer.mlp_bda), field


@pytest.mark.gpu
def test_te_spec_builds_where_transformer_engine_is_installed():
    pytest.importorskip("transformer_engine")
    from megatron_attnres.mcore.model import build_model, hybrid_pattern
    from megatron_attnres.mcore.specs import attnres_te_stack_spec

    cfg = config(params_dtype=torch.bfloat16, use_cpu_initialization=False)
    model = build_model(
        cfg, hybrid_pattern(4, moe=True), 64, 16, stack_spec=attnres_te_stack_spec()
    )
    assert type(model.decoder).__name__ == "AttnResHybridStack"
