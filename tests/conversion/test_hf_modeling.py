"""The exported Hugging Face modeling code (megatron_attnres/conversion/hf) against independent
oracles: the eager reference model (the executable spec), transformers' own Kimi Linear and
DeepSeek-V3 implementations, and itself after a trust_remote_code save/load round trip."""

import ast
import re
import shutil
import sys

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from megatron_attnres.attnres.reference import ReferenceConfig, ReferenceModel
from megatron_attnres.attnres.tolerances import Tolerance, tolerance
from megatron_attnres.conversion.hf import AUTO_MAP, MODELING_FILES
from megatron_attnres.conversion.hf.configuration_attnres import AttnResConfig
from megatron_attnres.conversion.hf.modeling_attnres import (
    AttnResForCausalLM,
    depth_read,
    depth_read_phase1,
    depth_read_phase2,
)
from tests.conversion.helpers import randomise_hf
from tests.reference_helpers import randomise

FP32 = tolerance(torch.float32)
# Two-phase and one-shot reads are the same arithmetic in a different summation order.
TWO_PHASE_FP32 = Tolerance(rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- reference -> HF
def reference_config(mode: str, router: str = "sigmoid") -> ReferenceConfig:
    """3 layers (a dense first layer, then MoE with a shared expert), GQA with RoPE; block mode
    has 2 layers per depth block, so the last depth block is shorter."""
    return ReferenceConfig(
        num_layers=3,
        num_query_groups=2,
        first_k_dense=1,
        num_experts=4,
        moe_router_topk=2,
        moe_ffn_hidden_size=32,
        moe_shared_expert_intermediate_size=64,
        moe_router_score_function=router,
        moe_router_enable_expert_bias=router == "sigmoid",
        moe_router_topk_scaling_factor=2.5,
        residual_mode=mode,
        layers_per_block=2,
    )


def hf_config_for(rc: ReferenceConfig, **overrides) -> AttnResConfig:
    assert rc.position_embedding_type == "rope" and not rc.tie_embeddings
    assert rc.moe_shared_expert_intermediate_size % rc.moe_ffn_hidden_size == 0
    fields = dict(
        vocab_size=rc.vocab_size,
        hidden_size=rc.hidden_size,
        num_hidden_layers=rc.num_layers,
        num_attention_heads=rc.num_attention_heads,
        num_key_value_heads=rc.num_query_groups,
        intermediate_size=rc.ffn_hidden_size,
        moe_intermediate_size=rc.moe_ffn_hidden_size,
        num_experts=rc.num_experts,
        num_experts_per_token=rc.moe_router_topk,
        num_shared_experts=rc.moe_shared_expert_intermediate_size // rc.moe_ffn_hidden_size,
        first_k_dense_replace=rc.first_k_dense,
        moe_router_activation_func=rc.moe_router_score_function,
        routed_scaling_factor=rc.moe_router_topk_scaling_factor or 1.0,
        moe_renormalize=rc.moe_router_score_function == "sigmoid" or not rc.moe_router_pre_softmax,
        use_expert_bias=rc.moe_router_enable_expert_bias,
        rms_norm_eps=rc.norm_eps,
        rope_theta=rc.rotary_base,
        mixer_types=["full_attention"] * rc.num_layers,
        attn_res_mode=rc.residual_mode,
        attn_res_block_size=rc.layers_per_block,
    )
    return AttnResConfig(**{**fields, **overrides})


_TOP_LEVEL = {
    "embedding.weight": "model.embed_tokens.weight",
    "output_layer.weight": "lm_head.weight",
    "final_norm.weight": "model.norm.weight",
}
# Reference sublayer function names (after "fn.") -> HF names inside model.layers.{i}.
_FN_NAMES = [
    (r"w([qkvo])\.weight", r"self_attn.\1_proj.weight"),
    (r"(gate|up|down)\.weight", r"mlp.\1_proj.weight"),
    (r"router\.weight", r"block_sparse_moe.gate.weight"),
    (r"expert_bias", r"block_sparse_moe.gate.e_score_correction_bias"),
    (r"experts\.(\d+)\.gate\.weight", r"block_sparse_moe.experts.\1.w1.weight"),
    (r"experts\.(\d+)\.up\.weight", r"block_sparse_moe.experts.\1.w3.weight"),
    (r"experts\.(\d+)\.down\.weight", r"block_sparse_moe.experts.\1.w2.weight"),
    (r"shared_expert\.(gate|up|down)\.weight", r"block_sparse_moe.shared_experts.\1_proj.weight"),
]


def _depth_read_entry(prefix: str, field: str, tensor):
    if field == "pseudo_query":  # w as the weight of Linear(h, 1): [1, h]
        return f"{prefix}_proj.weight", tensor[None]
    assert field == "key_norm_weight", field
    return f"{prefix}_norm.weight", tensor


def _hf_entry(name: str, tensor):
    if name in _TOP_LEVEL:
        return _TOP_LEVEL[name], tensor
    if match := re.fullmatch(r"output_read\.(\w+)", name):
        return _depth_read_entry("model.output_attn_res", match[1], tensor)
    kind, j, rest = re.fullmatch(r"(sublayers|depth_reads)\.(\d+)\.(.+)", name).groups()
    j = int(j)
    layer, is_mixer = f"model.layers.{j // 2}.", j % 2 == 0  # sublayer 2i: mixer, 2i+1: MLP
    if kind == "depth_reads":
        return _depth_read_entry(
            layer + ("self_attention_res" if is_mixer else "mlp_res"), rest, tensor
        )
    if rest == "norm.weight":
        return layer + (
            "input_layernorm" if is_mixer else "post_attention_layernorm"
        ) + ".weight", tensor
    for pattern, replacement in _FN_NAMES:
        if re.fullmatch(pattern, rest.removeprefix("fn.")):
            return layer + re.sub(pattern, replacement, rest.removeprefix("fn.")), tensor
    raise KeyError(f"no HF name for reference tensor {name}")


def reference_to_hf(state: dict, expert_bias: bool) -> dict:
    """Reference state dict -> HF names. The per-expert token counter is training state; the HF
    model has no bias buffer when the expert bias is off (the reference keeps zeros)."""
    skip = ("tokens_per_expert",) if expert_bias else ("tokens_per_expert", "expert_bias")
    return dict(_hf_entry(n, t) for n, t in state.items() if not n.endswith(skip))


def hf_twin(ref: ReferenceModel, **overrides) -> AttnResForCausalLM:
    model = AttnResForCausalLM(hf_config_for(ref.cfg, **overrides)).eval()
    state = reference_to_hf(ref.state_dict(), ref.cfg.moe_router_enable_expert_bias)
    model.load_state_dict(state, strict=True)
    return model


def mla_config(**overrides) -> AttnResConfig:
    fields = dict(
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_experts=4,
        num_experts_per_token=2,
        num_shared_experts=1,
        routed_scaling_factor=2.5,
        num_key_value_heads=2,
        mixer_types=["mla", "full_attention", "mla"],
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=16,
        mla_use_nope=False,
        attn_res_mode="block",
        attn_res_block_size=2,
    )
    return AttnResConfig(**{**fields, **overrides})


def tokens(batch=2, seq=10):
    return torch.randint(0, 256, (batch, seq))


# ----------------------------------------------------------------------------- 1. vs reference
@pytest.mark.parametrize(
    "mode,router",
    [("none", "sigmoid"), ("full", "sigmoid"), ("block", "sigmoid"), ("block", "softmax")],
)
@pytest.mark.parametrize("two_phase", [False, True], ids=["one_shot", "two_phase"])
def test_logits_match_the_reference_model(mode, router, two_phase):
    ref = randomise(ReferenceModel(reference_config(mode, router))).eval()
    model = hf_twin(ref)
    ids = tokens()
    with torch.no_grad():
        expected, _ = ref(ids)
        actual = model(ids, use_cache=False, attn_res_two_phase=two_phase).logits
    FP32.assert_close(actual, expected, msg=f"mode={mode} router={router}")


def test_weight_names_follow_kimi_and_the_attnres_export_names():
    names = set(AttnResForCausalLM(mla_config(q_lora_rank=24)).state_dict())
    for expected in [
        "model.layers.0.self_attention_res_proj.weight",
        "model.layers.0.self_attention_res_norm.weight",
        "model.layers.0.mlp_res_proj.weight",
        "model.layers.0.mlp_res_norm.weight",
        "model.output_attn_res_proj.weight",
        "model.output_attn_res_norm.weight",
        "model.layers.0.self_attn.q_a_proj.weight",
        "model.layers.0.self_attn.q_a_layernorm.weight",
        "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
        "model.layers.2.self_attn.kv_b_proj.weight",
        "model.layers.0.self_attn.kv_a_layernorm.weight",
        "model.layers.1.self_attn.k_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.1.block_sparse_moe.gate.weight",
        "model.layers.1.block_sparse_moe.gate.e_score_correction_bias",
        "model.layers.1.block_sparse_moe.experts.3.w1.weight",
        "model.layers.1.block_sparse_moe.shared_experts.down_proj.weight",
    ]:
        assert expected in names, expected
    plain = AttnResForCausalLM(mla_config(attn_res_mode="none")).state_dict()
    assert not [n for n in plain if "attn_res" in n or "_res_" in n]


def test_pseudo_queries_start_at_zero():
    model = AttnResForCausalLM(mla_config())
    queries = [p for n, p in model.named_parameters() if "res_proj" in n]
    assert len(queries) == 2 * 3 + 1 and all(torch.count_nonzero(q) == 0 for q in queries)


# ----------------------------------------------------------------------------- 2. generation
def greedy_reference(ref: ReferenceModel, ids, new_tokens: int):
    with torch.no_grad():
        for _ in range(new_tokens):
            ids = torch.cat([ids, ref(ids)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def generate(model, ids, use_cache: bool, new_tokens=12, attention_mask=None):
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask
    return model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        do_sample=False,
        use_cache=use_cache,
        pad_token_id=0,
    )


def test_greedy_generation_with_cache_matches_the_reference_and_no_cache():
    ref = randomise(ReferenceModel(reference_config("block"))).eval()
    model = hf_twin(ref)  # two-phase reads (the config default) while decoding
    ids = tokens(seq=7)
    cached = generate(model, ids, use_cache=True)
    assert torch.equal(cached, greedy_reference(ref, ids, 12))
    assert torch.equal(cached, generate(model, ids, use_cache=False))


def test_mla_generation_with_cache_and_left_padding():
    model = randomise_hf(AttnResForCausalLM(mla_config())).eval()
    ids = tokens(seq=7)
    cached = generate(model, ids, use_cache=True)
    assert torch.equal(cached, generate(model, ids, use_cache=False))
    padded = torch.cat([torch.full((2, 3), 5), ids], dim=1)
    mask = torch.cat([torch.zeros(2, 3, dtype=torch.long), torch.ones_like(ids)], dim=1)
    assert torch.equal(generate(model, padded, True, attention_mask=mask)[:, 3:], cached)


# ----------------------------------------------------------------------------- 3. two-phase
@pytest.mark.parametrize("mode", ["full", "block"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_two_phase_equals_the_one_shot_depth_read(mode, dtype):
    ref = randomise(ReferenceModel(reference_config(mode))).eval()
    model = hf_twin(ref).to(dtype)
    ids = tokens()
    with torch.no_grad():
        one_shot = model(ids, use_cache=False, attn_res_two_phase=False).logits
        two_phase = model(ids, use_cache=False, attn_res_two_phase=True).logits
    tol = TWO_PHASE_FP32 if dtype == torch.float32 else tolerance(torch.float64)
    tol.assert_close(two_phase, one_shot)


@pytest.mark.parametrize(
    "dtype,query_scale", [(torch.float32, 1.0), (torch.float64, 200.0)], ids=["fp32", "fp64_large"]
)
def test_two_phase_reads_equal_one_shot_reads(dtype, query_scale):
    """Phase 1 over 5 completed summaries for 3 reads, then phase 2 with and without a partial
    summary. fp64_large: scores in the thousands, where exp() without the running max would
    overflow."""
    completed = [torch.randn(2, 6, 64, dtype=dtype) * (i + 1) for i in range(5)]
    partial = torch.randn(2, 6, 64, dtype=dtype) * 3
    queries = torch.randn(3, 64, dtype=dtype) * query_scale
    stats = depth_read_phase1(completed, queries, eps=1e-5)
    tol = TWO_PHASE_FP32 if dtype == torch.float32 else tolerance(dtype)
    for r in range(3):
        for extra in ([], [partial]):
            expected = depth_read(completed + extra, queries[r], eps=1e-5)
            p = extra[0] if extra else None
            actual = depth_read_phase2(stats, r, p, queries[r], 1e-5, like=completed[0])
            assert torch.isfinite(actual).all()
            tol.assert_close(actual, expected)


# ----------------------------------------------------------------------------- 4. MLA
@pytest.mark.parametrize("nope", [False, True], ids=["rope", "nope"])
@pytest.mark.parametrize("q_lora_rank", [None, 24], ids=["q_proj", "q_lora"])
def test_mla_model_is_finite_and_causal(nope, q_lora_rank):
    model = randomise_hf(AttnResForCausalLM(mla_config(mla_use_nope=nope, q_lora_rank=q_lora_rank)))
    ids = tokens()
    changed = ids.clone()
    changed[:, 6] = (changed[:, 6] + 1) % 256
    with torch.no_grad():
        before, after = (model.eval()(x, use_cache=False).logits for x in (ids, changed))
    assert torch.isfinite(before).all()
    FP32.assert_close(after[:, :6], before[:, :6])
    assert (after[:, 6:] - before[:, 6:]).abs().amax() > 1e-3  # the change is visible later on


def save_then_load(model, tmp_path, foreign_config, foreign_class):
    """Save our weights, then load them with a transformers class and its own config."""
    model.save_pretrained(tmp_path)
    foreign_config.save_pretrained(tmp_path)
    loaded, info = foreign_class.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return loaded.eval()


def test_attnres_off_mla_export_loads_in_transformers_kimi_linear(tmp_path):
    """attn_res_mode 'none' with MLA (NoPE) mixers, a dense first layer and a sigmoid MoE with
    expert bias and a shared expert is a Kimi Linear checkpoint (docs/architecture.md section 3)."""
    kimi = pytest.importorskip("transformers.models.kimi_linear")
    shape = dict(
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_experts=4,
        num_experts_per_token=2,
        num_shared_experts=2,
        first_k_dense_replace=1,
        routed_scaling_factor=2.5,
        moe_renormalize=True,
        rms_norm_eps=1e-6,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=16,
        tie_word_embeddings=False,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
    )
    ours = AttnResConfig(**shape, mixer_types=["mla"] * 3, mla_use_nope=True, attn_res_mode="none")
    model = randomise_hf(AttnResForCausalLM(ours)).eval()
    kimi_config = kimi.KimiLinearConfig(
        **shape, linear_attn_config={"full_attn_layers": [1, 2, 3], "kda_layers": []}
    )
    theirs = save_then_load(model, tmp_path, kimi_config, kimi.KimiLinearForCausalLM)
    ids = tokens()
    with torch.no_grad():
        FP32.assert_close(model(ids).logits, theirs(ids).logits)


@pytest.mark.parametrize("q_lora_rank", [None, 24], ids=["q_proj", "q_lora"])
def test_mla_rope_matches_transformers_deepseek_v3(tmp_path, q_lora_rank):
    """Megatron's MLA RoPE (de-interleave, then rotate-half) is DeepSeek-V3's interleaved RoPE."""
    deepseek = pytest.importorskip("transformers.models.deepseek_v3")
    shape = dict(
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        rms_norm_eps=1e-6,
        kv_lora_rank=16,
        q_lora_rank=q_lora_rank,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=16,
        tie_word_embeddings=False,
    )
    ours = AttnResConfig(
        **shape, num_experts=0, mixer_types=["mla"] * 2, mla_use_nope=False, attn_res_mode="none"
    )
    model = randomise_hf(AttnResForCausalLM(ours)).eval()
    ds_config = deepseek.DeepseekV3Config(
        **shape,
        num_key_value_heads=4,
        first_k_dense_replace=2,
        n_routed_experts=4,
        n_group=1,
        topk_group=1,
        rope_interleave=True,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
    )
    theirs = save_then_load(model, tmp_path, ds_config, deepseek.DeepseekV3ForCausalLM)
    ids = tokens()
    with torch.no_grad():
        expected = theirs(ids).logits
        FP32.assert_close(model(ids).logits, expected)
        model.config.mla_use_nope = True  # negative control: without RoPE the logits differ
        nope = AttnResForCausalLM(model.config).eval()
        nope.load_state_dict(model.state_dict())
        assert (nope(ids).logits - expected).abs().amax() > 1e-4


# ----------------------------------------------------------------------------- 5. round trip
def test_save_and_reload_with_trust_remote_code(tmp_path, monkeypatch):
    modules_cache = tmp_path / "hf_modules"  # keep the dynamic-module copies out of $HF_HOME
    monkeypatch.setattr(transformers.dynamic_module_utils, "HF_MODULES_CACHE", str(modules_cache))
    monkeypatch.setattr(sys, "path", list(sys.path))
    model = randomise_hf(AttnResForCausalLM(mla_config())).eval()
    model.config.auto_map = dict(AUTO_MAP)
    export = tmp_path / "export"
    model.save_pretrained(export)
    for source in MODELING_FILES:
        shutil.copy(source, export / source.name)
    loaded = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True).eval()
    assert type(loaded).__module__.startswith("transformers_modules")  # the folder's own code
    assert type(loaded).__name__ == "AttnResForCausalLM"
    assert loaded.config.mixer_types == model.config.mixer_types
    assert loaded.config.attn_res_block_size == 2
    ids = tokens()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("path", MODELING_FILES, ids=lambda p: p.name)
def test_shipped_files_import_only_torch_transformers_and_the_standard_library(path):
    """Relative imports stay inside the shipped files; fla-core (KDA's operator) is imported
    only by modeling_kda.py and triton only by depth_read_triton.py, each under a try, so models
    load without them."""
    shipped = {p.stem for p in MODELING_FILES}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            assert node.module in shipped, ast.unparse(node)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names = (
                [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            )
            for name in names:
                top = name.split(".")[0]
                allowed = {"torch", "transformers"} | sys.stdlib_module_names
                if path.name == "modeling_kda.py":
                    allowed |= {"fla"}
                if path.name == "depth_read_triton.py":
                    allowed |= {"triton"}
                assert top in allowed, ast.unparse(node)


@pytest.mark.parametrize(
    ("name", "package"), [("modeling_kda.py", "fla"), ("depth_read_triton.py", "triton")]
)
def test_optional_imports_are_guarded(name, package):
    (shipped_file,) = [p for p in MODELING_FILES if p.name == name]
    tree = ast.parse(shipped_file.read_text())
    imports = [
        node
        for node in ast.walk(tree)
        if (isinstance(node, ast.ImportFrom) and (node.module or "").startswith(package))
        or (isinstance(node, ast.Import) and any(a.name.startswith(package) for a in node.names))
    ]
    guarded = [n for t in ast.walk(tree) if isinstance(t, ast.Try) for n in ast.walk(t)]
    assert imports and all(node in guarded for node in imports)


def test_kda_mixer_without_sizes_is_refused_by_name():
    with pytest.raises(ValueError, match="linear_attn_config"):
        AttnResForCausalLM(mla_config(mixer_types=["mla", "kda", "mla"]))


@pytest.mark.parametrize(
    "bad",
    [
        dict(attn_res_mode="blocks"),
        dict(attn_res_block_size=4),
        dict(mixer_types=["mla"]),
        dict(moe_router_activation_func="relu"),
        dict(num_expert_group=2),
    ],
)
def test_config_refuses_bad_values_by_name(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        mla_config(**bad)
