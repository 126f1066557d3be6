"""The MLA latent norms (kv_layernorm, and q_layernorm under q-LoRA) use mla_latent_norm_epsilon
(Kimi Linear's 1e-6), every other norm layernorm_epsilon (issue 21). The eps are varied (1e-5 vs
1e-6) and the norms' inputs made small enough for eps to matter, so the formula test fails under
Megatron's convention (one eps for all) or with the two swapped; the checkpoint signature records
the value and still accepts checkpoints written before it existed."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megatron_attnres.attnres import tolerance
from megatron_attnres.checkpoint.format import check_signature, model_signature
from megatron_attnres.config.load import load_run_config
from megatron_attnres.config.megatron import layer_pattern, transformer_config
from megatron_attnres.mcore.model import build_model
from tests.mcore.test_mla import HEADS, HIDDEN, KV_RANK, QK_DIM, SEQ, V_DIM, VOCAB, mla_config

pytestmark = pytest.mark.mcore
TOL = tolerance(torch.float32)
BATCH, Q_RANK = 2, 12
NORM_EPS, LATENT_EPS = 1e-5, 1e-6
DEBUG = Path(__file__).resolve().parents[2] / "configs" / "kimi_linear_debug.yaml"
LATENT_NORMS = ("kv_layernorm", "q_layernorm")


def norm_eps(model) -> dict[str, float]:
    """eps of every module that has one (RMS norms, depth reads, KDA's output norm)."""
    return {
        name: m.eps
        for name, m in model.named_modules()
        if isinstance(getattr(m, "eps", None), float)
    }


@pytest.mark.parametrize("q_lora_rank", [None, Q_RANK], ids=["no_q_lora", "q_lora"])
def test_latent_norms_get_their_eps_and_every_other_norm_keeps_norm_epsilon(q_lora_rank):
    config = mla_config(layernorm_epsilon=NORM_EPS, q_lora_rank=q_lora_rank)
    assert config.mla_latent_norm_epsilon == LATENT_EPS  # the default, as in Kimi Linear
    model = build_model(config, "+E+E", VOCAB, SEQ)
    found = norm_eps(model)
    latent = {n: e for n, e in found.items() if n.rsplit(".", 1)[-1] in LATENT_NORMS}
    others = {n: e for n, e in found.items() if n not in latent}
    assert len(latent) == 2 * (1 if q_lora_rank is None else 2), latent
    assert set(latent.values()) == {LATENT_EPS}, latent
    assert set(others.values()) == {NORM_EPS}, others
    for part in ("input_layernorm", "pre_mlp_layernorm", "final_norm", "depth_reads.0"):
        assert any(part in n for n in others), (part, sorted(others))


def test_the_run_config_field_reaches_the_latent_norms_of_the_kimi_debug_model():
    run = load_run_config(DEBUG, {"mla_latent_norm_epsilon": 3e-6})
    assert run.norm_epsilon == NORM_EPS
    model = build_model(transformer_config(run), layer_pattern(run), VOCAB, run.seq_length)
    found = norm_eps(model)
    latent = {n: e for n, e in found.items() if n.endswith(".kv_layernorm")}
    assert len(latent) == 2 and set(latent.values()) == {3e-6}, latent  # MLA at layers 4 and 8
    others = {e for n, e in found.items() if n not in latent}
    assert others == {NORM_EPS}  # KDA's o_norm included


def q_lora_formula(x, w: dict, eps: float, latent_eps: float):
    """MLA with q-LoRA, without RoPE, written out: both latents RMS-normed with `latent_eps`."""
    s, b, _ = x.shape
    a = "self_attention."
    n = F.rms_norm(x, (HIDDEN,), w["input_layernorm.weight"], eps)
    q_latent = n @ w[a + "linear_q_down_proj.weight"].T
    q_latent = F.rms_norm(q_latent, (Q_RANK,), w[a + "q_layernorm.weight"], latent_eps)
    q = (q_latent @ w[a + "linear_q_up_proj.weight"].T).view(s, b, HEADS, QK_DIM)
    latent = n @ w[a + "linear_kv_down_proj.weight"].T
    latent = F.rms_norm(latent, (KV_RANK,), w[a + "kv_layernorm.weight"], latent_eps)
    kv = (latent @ w[a + "linear_kv_up_proj.weight"].T).view(s, b, HEADS, -1)
    k, v = kv[..., :QK_DIM], kv[..., QK_DIM:]
    scores = torch.einsum("qbhd,kbhd->bhqk", q, k) / QK_DIM**0.5
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    out = torch.einsum("bhqk,kbhd->qbhd", weights, v).reshape(s, b, HEADS * V_DIM)
    return out @ w[a + "linear_proj.weight"].T


def eps_sensitive_layer():
    """An MLA layer with q-LoRA whose inputs and down projections are so small that the mean
    square reaching each norm is ~1e-6: there eps 1e-5 and 1e-6 give O(1) different outputs."""
    torch.manual_seed(3)
    config = mla_config(num_layers=2, layernorm_epsilon=NORM_EPS, q_lora_rank=Q_RANK)
    layer = build_model(config, "+E", VOCAB, SEQ).decoder.layers[0]
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            elif "down_proj" in name:
                param.normal_(0.0, 1e-3 / HIDDEN**0.5)  # latents of RMS ~1e-3
            else:
                param.normal_(0.0, 0.5)  # sharp attention
    weights = {k: v.detach().clone().requires_grad_() for k, v in layer.named_parameters()}
    x = 1e-3 * torch.randn(SEQ, BATCH, HIDDEN)  # the input norm sees RMS ~1e-3 too
    return layer, weights, x


def test_q_lora_mla_layer_matches_the_formula_with_its_two_eps():
    layer, weights, x = eps_sensitive_layer()
    x = x.requires_grad_()
    out = layer(hidden_states=x, attention_mask=None)[0]  # raw output: no residual added
    x_ref = x.detach().clone().requires_grad_()
    expected = q_lora_formula(x_ref, weights, NORM_EPS, LATENT_EPS)
    assert expected.abs().max() > 1e-2
    TOL.assert_close(out, expected)
    probe = torch.randn_like(out)
    (out * probe).sum().backward()
    (expected * probe).sum().backward()
    TOL.assert_close(x.grad, x_ref.grad, "input gradient")
    for name, param in layer.named_parameters():
        TOL.assert_close(param.grad, weights[name].grad, f"gradient of {name}")


@pytest.mark.parametrize(
    ("eps", "latent_eps"),
    [(NORM_EPS, NORM_EPS), (LATENT_EPS, LATENT_EPS), (LATENT_EPS, NORM_EPS)],
    ids=["megatron_convention", "all_latent_eps", "swapped"],
)
def test_negative_control_other_eps_conventions_miss_the_layer(eps, latent_eps):
    layer, weights, x = eps_sensitive_layer()
    with torch.no_grad():
        out = layer(hidden_states=x, attention_mask=None)[0]
        TOL.assert_close(out, q_lora_formula(x, weights, NORM_EPS, LATENT_EPS))
        wrong = q_lora_formula(x, weights, eps, latent_eps)
    with pytest.raises(AssertionError):
        TOL.assert_close(out, wrong)


def _signature(**overrides) -> dict:
    run = load_run_config(DEBUG, overrides)
    return model_signature(transformer_config(run), layer_pattern(run), 1024, False)


def test_signature_records_the_latent_eps_and_refuses_another(tmp_path):
    saved, expected = _signature(mla_latent_norm_epsilon=1e-5), _signature()
    assert saved["mla_latent_norm_epsilon"] == 1e-5 and expected["mla_latent_norm_epsilon"] == 1e-6
    with pytest.raises(ValueError, match="mla_latent_norm_epsilon: checkpoint 1e-05"):
        check_signature(saved, expected, tmp_path)
    assert check_signature(expected, expected, tmp_path) is None  # negative control


def test_a_checkpoint_from_before_the_latent_eps_still_loads(tmp_path):
    expected = _signature()
    old = {k: v for k, v in expected.items() if k != "mla_latent_norm_epsilon"}
    assert check_signature(old, expected, tmp_path) is None
