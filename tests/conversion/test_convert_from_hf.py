"""attnres-convert-from-hf against independent oracles: the imported checkpoint, loaded by
Megatron's own dist_checkpointing into Megatron's model, computes the Hugging Face model's
logits; HF -> Megatron -> HF is bitwise; a Kimi Linear folder (transformers' own kimi_linear
implementation as the oracle) imports, and an export with AttnRes off loads back into it."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from megatron_attnres.conversion.from_hf import convert_from_hf
from megatron_attnres.conversion.hf.configuration_attnres import AttnResConfig
from megatron_attnres.conversion.hf.modeling_attnres import AttnResForCausalLM
from megatron_attnres.conversion.to_hf import convert_to_hf
from tests.conversion.helpers import load_megatron_model, megatron_logits, randomise_hf

pytestmark = pytest.mark.mcore
QUIET = dict(log=lambda _: None)
MAX_ABS_DIFF = 1e-4


def hf_config(**overrides) -> AttnResConfig:
    """3 layers (dense first, then MoE with a sigmoid router, expert bias and a shared expert)."""
    fields = dict(
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_experts=4,
        num_experts_per_token=2,
        num_shared_experts=2,
        first_k_dense_replace=1,
        routed_scaling_factor=2.5,
        mixer_types=["full_attention"] * 3,
        attn_res_mode="block",
        attn_res_block_size=2,
        max_position_embeddings=64,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
    )
    return AttnResConfig(**{**fields, **overrides})


MLA = dict(
    mixer_types=["mla"] * 3,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=16,
    mla_use_nope=False,
)
CASES = {
    "gqa_block": {},
    "gqa_full_softmax": dict(
        attn_res_mode="full", moe_router_activation_func="softmax", use_expert_bias=False
    ),
    "mla_qlora_block": dict(MLA, q_lora_rank=24),
    "mla_none_tied": dict(MLA, attn_res_mode="none", tie_word_embeddings=True),
}


def hf_folder(path, cfg: AttnResConfig, tokenizer_model=None):
    model = randomise_hf(AttnResForCausalLM(cfg)).eval()
    model.save_pretrained(path, max_shard_size="100KB")  # several shards with an index
    if tokenizer_model:
        shutil.copyfile(tokenizer_model, path / "tokenizer.model")
    return model


def tokens():
    return torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("case", list(CASES))
def test_import_computes_the_hf_logits_and_round_trips_bitwise(
    case, tmp_path, tokenizer_model, megatron_one_rank
):
    hf = hf_folder(tmp_path / "hf", hf_config(**CASES[case]), tokenizer_model)
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 1
    out = convert_from_hf(tmp_path / "hf", tmp_path / "megatron", **QUIET)
    model = load_megatron_model(out / "iter_0000000", out / "config.yaml", 512)
    with torch.no_grad():
        expected = hf(tokens()).logits
    diff = (megatron_logits(model, tokens()) - expected).abs().max().item()
    assert diff < MAX_ABS_DIFF, f"{case}: max |Megatron - HF| = {diff}"

    convert_to_hf(out, tmp_path / "again", **QUIET)
    before = {
        k: v for f in (tmp_path / "hf").glob("*.safetensors") for k, v in load_file(f).items()
    }
    after = {
        k: v for f in (tmp_path / "again").glob("*.safetensors") for k, v in load_file(f).items()
    }
    assert sorted(before) == sorted(after)
    for key, tensor in before.items():
        assert after[key].dtype == tensor.dtype and torch.equal(after[key], tensor), key


def test_kimi_linear_imports_and_attnres_off_exports_back(
    tmp_path, tokenizer_model, megatron_one_rank
):
    """Kimi Linear (MLA layers, NoPE, no KDA) through Megatron and back, with transformers'
    kimi_linear as the oracle on both ends."""
    kimi = pytest.importorskip("transformers.models.kimi_linear")
    shape = dict(
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=96,
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
        qk_rope_head_dim=0,
        v_head_dim=16,
        mla_use_nope=True,
        tie_word_embeddings=False,
        max_position_embeddings=64,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        linear_attn_config={"full_attn_layers": [1, 2, 3], "kda_layers": []},
    )
    theirs = kimi.KimiLinearForCausalLM(kimi.KimiLinearConfig(**shape)).eval()
    randomise_hf(theirs)  # non-trivial norm gains and expert biases
    theirs.save_pretrained(tmp_path / "kimi")
    shutil.copyfile(tokenizer_model, tmp_path / "kimi" / "tokenizer.model")
    with torch.no_grad():
        expected = theirs(tokens()).logits

    out = convert_from_hf(tmp_path / "kimi", tmp_path / "megatron", **QUIET)
    model = load_megatron_model(out / "iter_0000000", out / "config.yaml", 512)
    assert (megatron_logits(model, tokens()) - expected).abs().max() < MAX_ABS_DIFF

    export = convert_to_hf(out, tmp_path / "export", **QUIET)
    values = json.loads((export / "config.json").read_text())
    assert values["attn_res_mode"] == "none"
    assert values["linear_attn_config"] == {"full_attn_layers": [1, 2, 3], "kda_layers": []}
    kimi_keys = {k: v for k, v in values.items() if k not in ("model_type", "auto_map")}
    loaded, info = kimi.KimiLinearForCausalLM.from_pretrained(
        export, config=kimi.KimiLinearConfig(**kimi_keys), output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        assert (loaded.eval()(tokens()).logits - expected).abs().max() < MAX_ABS_DIFF


def test_negative_control_a_gate_up_swap_breaks_parity(
    tmp_path, tokenizer_model, megatron_one_rank, monkeypatch
):
    """The parity bound is tight enough to catch a converter that swaps SwiGLU's gate and up
    halves of the dense and shared-expert MLPs."""
    from megatron_attnres.conversion import key_table

    def swapped(megatron, hf_gate, hf_up):
        return key_table.Row(
            megatron, (hf_gate, hf_up), lambda t: t.chunk(2), lambda ts: torch.cat([ts[1], ts[0]])
        )

    monkeypatch.setattr(key_table, "_swiglu", swapped)
    hf = hf_folder(tmp_path / "hf", hf_config(), tokenizer_model)
    out = convert_from_hf(tmp_path / "hf", tmp_path / "megatron", **QUIET)
    model = load_megatron_model(out / "iter_0000000", out / "config.yaml", 512)
    with torch.no_grad():
        diff = (megatron_logits(model, tokens()) - hf(tokens()).logits).abs().max().item()
    assert diff > 100 * MAX_ABS_DIFF, diff
