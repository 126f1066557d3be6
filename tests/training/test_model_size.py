"""attnres-model-size on the 48B configs: parameter totals against independent counts
(docs/architecture.md section 7's figures, and transformers' own Kimi Linear model built on the
meta device from the public config), the KDA count and FLOPs against transformers'
KimiLinearDeltaAttention, and the per-GPU split of a parallel layout covering the model exactly
once.
(tests/mcore/test_model_size_exact.py checks the counts against built models.)"""

import json
from pathlib import Path

import pytest
import torch

from megatron_attnres.config.flops import flops_per_token
from megatron_attnres.config.load import load_run_config
from megatron_attnres.config.megatron import transformer_config
from megatron_attnres.study.model_size import attnres_stage_bytes, main, model_size

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
ATTNRES, BASELINE, DEBUG = (
    CONFIGS / "kimi_linear_48b_attnres.yaml",
    CONFIGS / "kimi_linear_48b_baseline.yaml",
    CONFIGS / "kimi_linear_debug.yaml",
)
MLA_LAYERS = (4, 8, 12, 16, 20, 24, 27)  # 1-based, Kimi Linear's public config


def kimi_pattern(layers: int, mla_layers) -> str:
    """Kimi Linear's layer rule in pattern symbols: MLA ('+') at `mla_layers`, KDA ('G')
    elsewhere, each followed by the dense MLP ('-') for layer 1 and MoE ('E') after."""
    return "".join(
        ("+" if i in mla_layers else "G") + ("-" if i == 1 else "E") for i in range(1, layers + 1)
    )


CUT_FREE = kimi_pattern(27, MLA_LAYERS)  # the 48B pattern without its pipeline cut


def _json(capsys, *argv: str) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_48b_totals_match_the_kimi_linear_shape(capsys):
    report = _json(capsys, "--config", str(ATTNRES), "--gpus", "64")
    total, active = report["parameters"]["total"], report["parameters"]["active"]
    assert 47e9 <= total <= 50e9 and 2.8e9 <= active <= 3.4e9  # the acceptance ranges
    # The independent figures of docs/architecture.md section 7.
    assert abs(total - 49.1e9) < 0.05e9 and abs(active - 3.1e9) < 0.05e9
    # The public config's layer rule, the cut after layer 15 (30 symbols, a depth-block boundary)
    assert report["pattern"] == CUT_FREE[:30] + "|" + CUT_FREE[30:]
    # Per KDA layer, by hand from the public config: q/k/v/o 4 x 2304 x 4096, short convs
    # 3 x 4096 x 4, gate low-ranks 2 x (2304 + 4096) x 128, beta 2304 x 32, A_log 32, dt_bias 4096,
    # o_norm 128; per MLA layer: q 2304 x 32 x 192, KV down 2304 x (512 + 64), KV up
    # 512 x 32 x 256, out 4096 x 2304, latent norm 512.
    kda = 4 * 2304 * 4096 + 3 * 4096 * 4 + 2 * (2304 + 4096) * 128 + 2304 * 32 + 32 + 4096 + 128
    mla = 2304 * 32 * 192 + 2304 * 576 + 512 * 32 * 256 + 4096 * 2304 + 512
    breakdown = report["parameters"]["breakdown"]
    assert breakdown["kda"]["total"] == breakdown["kda"]["active"] == 20 * kda
    assert breakdown["mla"]["total"] == breakdown["mla"]["active"] == 7 * mla
    assert breakdown["attention"]["total"] == 0
    assert breakdown["routed_experts"]["active"] * 256 == breakdown["routed_experts"]["total"] * 8
    assert breakdown["embedding"]["active"] == 0
    assert breakdown["lm_head"]["active"] == breakdown["lm_head"]["total"] == 163840 * 2304
    plan = report["parallelism"]
    assert (plan["tp"], plan["pp"], plan["ep"], plan["dp"], plan["edp"]) == (2, 2, 8, 16, 4)


def test_48b_report_breaks_the_count_down_and_states_the_convention(capsys):
    assert main(["--config", str(ATTNRES), "--gpus", "64"]) == 0
    text = capsys.readouterr().out
    rows = {
        line[:16].strip(): line.split()[-2:]
        for line in text.splitlines()
        if line.startswith("  ") and len(line.split()) >= 3
    }
    report = model_size(load_run_config(ATTNRES), gpus=64)["parameters"]
    labels = {
        "KDA G": "kda",
        "MLA +": "mla",
        "routed experts": "routed_experts",
        "shared expert": "shared_expert",
        "MoE router": "router",
        "dense MLP -": "dense_mlp",
        "embedding": "embedding",
        "LM head": "lm_head",
        "norms": "norms",
        "AttnRes w, g": "attnres",
    }
    for label, key in labels.items():
        b = report["breakdown"][key]
        assert rows[label] == [f"{b['total']:,d}", f"{b['active']:,d}"], label
    assert "(49.12B total, 3.11B active)" in text
    assert "LM head included, input embedding not" in " ".join(text.split())
    assert "routed experts as top-k / num_experts" in " ".join(text.split())


def _hf_kimi_linear_breakdown() -> dict[str, int]:
    """transformers' Kimi Linear model for the public config (no AttnRes), built on the meta
    device, its parameters summed by our categories."""
    from transformers import KimiLinearConfig, KimiLinearForCausalLM

    kda_layers = [i for i in range(1, 28) if i not in MLA_LAYERS]
    config = KimiLinearConfig(
        linear_attn_config=dict(
            kda_layers=kda_layers,
            full_attn_layers=list(MLA_LAYERS),
            num_heads=32,
            head_dim=128,
            short_conv_kernel_size=4,
        ),
        first_k_dense_replace=1,
    )
    with torch.device("meta"):
        model = KimiLinearForCausalLM(config)
    out = dict.fromkeys(
        (
            "kda",
            "mla",
            "routed_experts",
            "shared_expert",
            "router",
            "dense_mlp",
            "norms",
            "embedding",
            "lm_head",
        ),
        0,
    )
    for name, param in model.named_parameters():
        parts = name.split(".")
        if "self_attn" in parts:
            kind = config.layer_types[int(parts[2])]
            key = "kda" if kind == "linear_attention" else "mla"
        elif "experts" in parts:
            key = "routed_experts"
        elif "shared_experts" in parts:
            key = "shared_expert"
        elif "gate" in parts:
            key = "router"
        elif "mlp" in parts:
            key = "dense_mlp"
        else:
            key = {"model.embed_tokens.weight": "embedding", "lm_head.weight": "lm_head"}.get(
                name, "norms"
            )
        out[key] += param.numel()
    return out


def test_48b_baseline_equals_transformers_kimi_linear():
    """The baseline (AttnRes off) has exactly the parameters of transformers' Kimi Linear for
    the public config, category by category; the active count follows from them (all but the
    input embedding, 8 of 256 routed experts)."""
    hf = _hf_kimi_linear_breakdown()
    ours = model_size(load_run_config(BASELINE), gpus=64)["parameters"]
    assert {k: ours["breakdown"][k]["total"] for k in hf} == hf
    assert ours["breakdown"]["attnres"]["total"] == 0
    assert ours["total"] == sum(hf.values())
    active = sum(hf.values()) - hf["embedding"] - hf["routed_experts"] * (256 - 8) // 256
    assert ours["active"] == active


def _hf_kda(heads: int, head_dim: int, hidden: int, kernel: int):
    from transformers import KimiLinearConfig
    from transformers.models.kimi_linear.modeling_kimi_linear import KimiLinearDeltaAttention

    config = KimiLinearConfig(
        hidden_size=hidden,
        num_hidden_layers=1,
        linear_attn_config=dict(
            kda_layers=[1],
            full_attn_layers=[],
            num_heads=heads,
            head_dim=head_dim,
            short_conv_kernel_size=kernel,
        ),
    )
    return KimiLinearDeltaAttention(config, layer_idx=0)


KDA_SIZES = dict(
    hidden_size=48, linear_num_key_heads=3, linear_key_head_dim=8, linear_conv_kernel_dim=3
)


def test_kda_count_matches_transformers_kimi_delta_attention():
    """Our KDA shapes (the contract) against transformers' module at a toy size: the same
    numbers of parameters overall and per part (transformers fuses the three convolutions and
    keeps A_log as [1, 1, H, 1] inside its forget gate)."""
    from megatron_attnres.config.flops import kda_parameter_shapes
    from megatron_attnres.study.model_size import sublayer_params

    run = load_run_config(None, KDA_SIZES)
    hf = {n: p.numel() for n, p in _hf_kda(3, 8, 48, 3).named_parameters()}
    hf_total = sum(hf.values())
    kda = [p for p in sublayer_params(run, "G") if p.category == "kda"]
    assert sum(p.count for p in kda) == hf_total
    assert [p.category for p in sublayer_params(run, "G")] == ["norms"] + ["kda"] * len(kda)
    ours = {n: torch.Size(s).numel() for n, s in kda_parameter_shapes(run).items()}
    convs = sum(ours.pop(f"{x}_conv1d.weight") for x in "qkv")
    assert convs == hf.pop("conv1d.weight")
    for name in ("f_a_proj.weight", "f_b_proj.weight", "A_log", "dt_bias"):
        assert ours.pop(name) == hf.pop(f"forget_gate.{name}"), name
    assert ours == hf


def test_kda_flops_count_the_modules_weights_and_the_state_update():
    """FLOPs of one KDA sublayer: 2 per multiply-accumulate of every Linear and Conv1d weight of
    transformers' module (one use per token), plus Megatron-LM's GDN approximation of the
    delta-rule state update (4 H D^2 multiply-accumulates); training = 3 x forward."""
    run = load_run_config(None, KDA_SIZES)
    module = _hf_kda(3, 8, 48, 3)
    weights = sum(
        m.weight.numel()
        for m in module.modules()
        if isinstance(m, torch.nn.Linear | torch.nn.Conv1d)
    )
    assert flops_per_token(run, 0, "G", []) == 3 * (2 * weights + 2 * 4 * 3 * 8**2)
    # each mixer symbol is sized as itself, whatever multi_latent_attention says
    one = {m: flops_per_token(run, 0, m, []) for m in "G+*"}
    assert flops_per_token(run, 0, "G+|*", []) == sum(one.values()) and one["+"] != one["*"]


def test_debug_config_keeps_the_48b_rule_and_features():
    debug, big = load_run_config(DEBUG), load_run_config(ATTNRES)
    assert debug.hybrid_layer_pattern == kimi_pattern(8, (4, 8))
    assert debug.attn_res_block_layers == 2 and debug.enable_attention_residuals
    for key in (
        "mla_use_nope",
        "qk_layernorm",
        "moe_first_k_dense",
        "moe_router_score_function",
        "moe_router_enable_expert_bias",
        "moe_router_topk_scaling_factor",
        "moe_aux_loss_coeff",
        "attn_res_mode",
        "linear_conv_kernel_dim",
        "untie_embeddings_and_output_weights",
        "q_lora_rank",
    ):
        assert getattr(debug, key) == getattr(big, key), key
    assert debug.qk_pos_emb_head_dim > 0 and debug.moe_shared_expert_intermediate_size
    assert debug.moe_router_topk == 2 < debug.num_experts


def test_baseline_differs_only_by_the_attnres_parameters(capsys):
    attnres = _json(capsys, "--config", str(ATTNRES), "--gpus", "64")
    baseline = _json(capsys, "--config", str(BASELINE), "--gpus", "64")
    reads = 54 + 1  # one read per sublayer and the output read, 2 x hidden each
    assert attnres["parameters"]["total"] - baseline["parameters"]["total"] == reads * 2 * 2304
    assert baseline["parameters"]["breakdown"]["attnres"]["total"] == 0
    assert baseline["pattern"] == attnres["pattern"]


@pytest.mark.parametrize(
    "layout",
    [
        dict(),  # the config's own plan: TP 2, PP 2, EP 8
        dict(
            hybrid_layer_pattern=CUT_FREE,
            tensor_model_parallel_size=1,
            sequence_parallel=False,
            pipeline_model_parallel_size=4,
            expert_model_parallel_size=16,
        ),
        dict(
            hybrid_layer_pattern=CUT_FREE,
            pipeline_model_parallel_size=2,
            virtual_pipeline_model_parallel_size=2,
            untie_embeddings_and_output_weights=False,
        ),
        dict(
            hybrid_layer_pattern=CUT_FREE,
            tensor_model_parallel_size=4,
            sequence_parallel=True,
            pipeline_model_parallel_size=1,
            expert_model_parallel_size=32,
            use_distributed_optimizer=True,
            optimizer="adam",
        ),
    ],
)
def test_per_gpu_shards_cover_the_model_once(layout):
    run = load_run_config(ATTNRES, layout)
    report = model_size(run, gpus=64)
    s, total = report["parallelism"], report["parameters"]["total"]
    covered = 0
    for rank in report["memory_per_gpu"]:
        split = rank["params_by_sharding"]
        covered += split["replicated"] + split["tensor"] * s["tp"]
        covered += split["expert"] * s["ep"] * s["etp"]
        assert rank["weights_bytes"] == pytest.approx(2 * rank["params"])  # bf16
        assert rank["grads_bytes"] == pytest.approx(4 * rank["params"])  # fp32 main grads
    tied_copy = 0 if run.untie_embeddings_and_output_weights else report["vocab_size"] * 2304
    assert covered == pytest.approx(total + tied_copy, abs=1)
    assert sum(len(r["chunks"]) for r in report["memory_per_gpu"]) == s["pp"] * s["vp"]


def test_attnres_stage_bytes_split_the_schedules_overhead():
    run = load_run_config(ATTNRES, {"hybrid_layer_pattern": CUT_FREE})
    schedule = transformer_config(run).depth_block_schedule()
    tokens, hidden = 4096, 2304
    for recompute in (True, False):
        whole = schedule.saved_activation_overhead_bytes(tokens, hidden, 2, recompute)
        assert attnres_stage_bytes(schedule, 1, 54, True, tokens, hidden, 2, recompute) == whole
        stages = [(1, 18), (19, 30), (31, 42), (43, 54)]
        parts = sum(
            attnres_stage_bytes(schedule, a, b, b == 54, tokens, hidden, 2, recompute)
            for a, b in stages
        )
        received = sum(schedule.summaries_entering(a) for a, _ in stages[1:]) * tokens * hidden * 2
        assert parts - received == whole


def test_a_plan_that_does_not_fit_the_gpus_is_refused(capsys):
    assert main(["--config", str(ATTNRES), "--gpus", "40"]) == 2  # 20 per stage, EP 8
    err = capsys.readouterr().err
    assert "--gpus 40" in err and "EP=8" in err
    assert main(["--config", str(ATTNRES), "--gpus", "48"]) == 2  # DP 12 does not divide 2048
    assert "global_batch_size=2048" in capsys.readouterr().err
    inside_a_block = CUT_FREE[:28] + "|" + CUT_FREE[28:]  # cut after sublayer 28
    assert main(["--config", str(ATTNRES), "--hybrid-layer-pattern", inside_a_block]) == 2
    assert "inside a depth block" in capsys.readouterr().err
