"""The converters with KDA ('G') and MLA NoPE layers, against independent oracles: the shared KDA
contract's Megatron names and global shapes, transformers' own KimiLinearForCausalLM (a folder
it saved is imported; Megatron's model, loaded by Megatron's dist_checkpointing, gives its
logits), and bitwise round trips."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_attnres.config.run import RunConfig
from megatron_attnres.conversion.config_map import hf_config, run_fields
from megatron_attnres.conversion.from_hf import DENSE_ALIAS, convert_from_hf
from megatron_attnres.conversion.hf.modeling_attnres import AttnResForCausalLM
from megatron_attnres.conversion.key_table import key_table
from megatron_attnres.conversion.to_hf import convert_to_hf
from tests.conversion.helpers import load_megatron_model, megatron_logits, randomise_hf
from tests.conversion.kda_helpers import SHAPE, VOCAB, D, H, K, kda_config, tokens, torch_kda_paths

QUIET = dict(log=lambda _: None)
MAX_ABS_DIFF = 1e-4  # the conversion tests' bound (fp32 on CPU)
h = SHAPE["hidden_size"]

# The contract's Megatron parameters of a KDA layer: suffix -> global shape.
CONTRACT = {
    "input_layernorm.weight": [h],
    **{f"self_attention.{n}_proj.weight": [H * D, h] for n in "qkv"},
    **{f"self_attention.{n}_conv1d.weight": [H * D, 1, K] for n in "qkv"},
    "self_attention.f_a_proj.weight": [D, h],
    "self_attention.f_b_proj.weight": [H * D, D],
    "self_attention.b_proj.weight": [H, h],
    "self_attention.A_log": [H],
    "self_attention.dt_bias": [H * D],
    "self_attention.g_a_proj.weight": [D, h],
    "self_attention.g_b_proj.weight": [H * D, D],
    "self_attention.o_norm.weight": [D],
    "self_attention.o_proj.weight": [h, H * D],
}


def megatron_tensors(model: AttnResForCausalLM) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    return {r.megatron: r.to_megatron([state[n] for n in r.hf]) for r in key_table(model.config)}


@pytest.mark.parametrize("mode", ["none", "block"])
def test_key_table_gives_the_contract_names_and_round_trips_bitwise(mode):
    model = randomise_hf(AttnResForCausalLM(kda_config(attn_res_mode=mode)))
    tensors = megatron_tensors(model)
    for j in (0, 4):  # sublayers 0 and 4: the mixers of HF layers 0 and 2 (KDA)
        prefix = f"decoder.layers.{j}."
        found = {
            k.removeprefix(prefix): list(v.shape)
            for k, v in tensors.items()
            if k.startswith(prefix)
        }
        assert found == CONTRACT, j
    hf_a_log = model.model.layers[2].self_attn.A_log
    assert hf_a_log.shape == (1, 1, H, 1)
    assert torch.equal(tensors["decoder.layers.4.self_attention.A_log"], hf_a_log.flatten())
    state = model.state_dict()
    for row in key_table(model.config):
        for name, tensor in zip(row.hf, row.to_hf(tensors[row.megatron]), strict=True):
            assert tensor.shape == state[name].shape and torch.equal(tensor, state[name]), name


def test_config_map_carries_kda_and_mla_nope_both_ways():
    run = RunConfig(
        hidden_size=h,
        num_attention_heads=2,
        hybrid_layer_pattern="G-+EGE",
        num_layers=3,
        num_experts=4,
        moe_first_k_dense=1,
        moe_ffn_hidden_size=16,
        moe_shared_expert_intermediate_size=16,
        moe_router_score_function="sigmoid",
        qk_layernorm=True,
        kv_lora_rank=8,
        qk_head_dim=8,
        qk_pos_emb_head_dim=4,
        v_head_dim=8,
        mla_use_nope=True,
        linear_num_key_heads=H,
        linear_key_head_dim=D,
        linear_conv_kernel_dim=K,
        enable_attention_residuals=False,
    )
    cfg = hf_config(run, VOCAB)
    assert cfg.mixer_types == ["kda", "mla", "kda"] and cfg.mla_use_nope
    assert cfg.qk_rope_head_dim == 4 and cfg.attn_res_mode == "none"
    assert cfg.linear_attn_config == SHAPE["linear_attn_config"]
    fields = run_fields(cfg)
    assert fields["hybrid_layer_pattern"] == "G-+EGE" and fields["mla_use_nope"] is True
    for key in (
        "linear_num_key_heads",
        "linear_key_head_dim",
        "linear_conv_kernel_dim",
        "qk_pos_emb_head_dim",
        "kv_lora_rank",
        "num_experts",
    ):
        assert fields[key] == getattr(run, key), key
    rotated = hf_config(dataclasses.replace(run, mla_use_nope=False), VOCAB)
    assert not rotated.mla_use_nope and run_fields(rotated)["mla_use_nope"] is False
    kda_only = hf_config(dataclasses.replace(run, hybrid_layer_pattern="G-GEGE"), VOCAB)
    assert run_fields(kda_only)["hybrid_layer_pattern"] == "G-GEGE"  # not rebuilt as '*'


# ----------------------------------------------------------------------------- with Megatron
def kimi_folder(path, tokenizer_model, monkeypatch):
    """A folder saved by transformers' KimiLinearForCausalLM (KDA, MLA NoPE, dense then MoE) and
    its logits, computed by its PyTorch KDA (fla's Triton kernels need a GPU)."""
    kimi, calls = torch_kda_paths(monkeypatch)
    torch.manual_seed(0)
    config = kimi.KimiLinearConfig(**SHAPE, initializer_range=0.1)  # O(1) logits
    theirs = randomise_hf(kimi.KimiLinearForCausalLM(config).eval())  # norms, expert biases
    with torch.no_grad():
        expected = theirs(tokens()).logits
    assert calls["chunk"] == 2
    theirs.save_pretrained(path)
    shutil.copyfile(tokenizer_model, path / "tokenizer.model")
    return expected


def weights(folder) -> dict[str, torch.Tensor]:
    return {
        DENSE_ALIAS.sub(r".mlp.\1_proj.", k): v
        for f in folder.glob("*.safetensors")
        for k, v in load_file(f).items()
    }


@pytest.mark.mcore
def test_kimi_linear_with_kda_imports_and_round_trips_bitwise(
    tmp_path, tokenizer_model, megatron_one_rank, monkeypatch
):
    expected = kimi_folder(tmp_path / "kimi", tokenizer_model, monkeypatch)
    out = convert_from_hf(tmp_path / "kimi", tmp_path / "megatron", **QUIET)
    model = load_megatron_model(out / "iter_0000000", out / "config.yaml", VOCAB)
    diff = (megatron_logits(model, tokens()) - expected).abs().max().item()
    assert diff < MAX_ABS_DIFF, f"max |Megatron - transformers| = {diff}"
    assert expected.abs().max() > 1e-2

    again = convert_to_hf(out, tmp_path / "again", **QUIET)
    before, after = weights(tmp_path / "kimi"), weights(again)
    assert sorted(before) == sorted(after)
    for key, tensor in before.items():
        assert after[key].dtype == tensor.dtype and torch.equal(after[key], tensor), key


def kda_run(**overrides) -> RunConfig:
    """KDA, MLA (NoPE with rope channels), KDA; dense then MoE; Block AttnResidual."""
    fields = dict(
        hidden_size=h,
        num_attention_heads=2,
        hybrid_layer_pattern="G-+EGE",
        num_layers=3,
        num_experts=4,
        moe_first_k_dense=1,
        moe_ffn_hidden_size=16,
        ffn_hidden_size=48,
        moe_shared_expert_intermediate_size=16,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_topk_scaling_factor=2.5,
        qk_layernorm=True,
        kv_lora_rank=8,
        qk_head_dim=8,
        qk_pos_emb_head_dim=4,
        v_head_dim=8,
        mla_use_nope=True,
        linear_num_key_heads=H,
        linear_key_head_dim=D,
        linear_conv_kernel_dim=K,
        norm_epsilon=1e-6,
        seq_length=32,
        vocab_size=VOCAB,
        init_method_std=0.1,  # O(1) logits
        enable_attention_residuals=True,
        attn_res_mode="block",
        attn_res_block_layers=1,
    )
    return RunConfig(**{**fields, **overrides})


def save_megatron(model, run: RunConfig, save_dir, tokenizer_model):
    """The trainer's layout: SAVE/iter_0000000 (Megatron's dist_checkpointing), the tracker,
    SAVE/config.yaml and the tokenizer beside it."""
    from megatron.core import dist_checkpointing

    from megatron_attnres.checkpoint.files import checkpoint_dir, write_tracker
    from megatron_attnres.config.load import dump
    from megatron_attnres.conversion.from_hf import signature
    from tests.conversion.helpers import model_template

    target = checkpoint_dir(save_dir, 0)
    target.mkdir(parents=True)
    state = {"model": model_template(model), "model_only": True, "model_config": signature(run)}
    dist_checkpointing.save(state, str(target))
    write_tracker(save_dir, 0)
    (save_dir / "config.yaml").write_text(dump(run))
    shutil.copyfile(tokenizer_model, save_dir / "tokenizer.model")


def debug_run(**overrides) -> RunConfig:
    """configs/kimi_linear_debug.yaml (8 layers 'G-GEGE+EGEGEGE+E', MLA NoPE, Block AttnRes)."""
    from megatron_attnres.config.load import load_run_config

    path = Path(__file__).parents[2] / "configs" / "kimi_linear_debug.yaml"
    return dataclasses.replace(load_run_config(path), vocab_size=VOCAB, **overrides)


RUNS = {"toy": kda_run, "debug": debug_run}


@pytest.mark.mcore
@pytest.mark.parametrize("attnres", [False, True], ids=["attnres_off", "block"])
@pytest.mark.parametrize("which", list(RUNS))
def test_megatron_kda_model_exports_with_its_logits(
    which, attnres, tmp_path, tokenizer_model, megatron_one_rank, hf_modules_cache, monkeypatch
):
    """A Megatron 'G' model (its own init; random norms, pseudo-queries and expert biases)
    exported to HF: the folder's own code gives Megatron's logits, with and without the cache;
    with AttnRes off, transformers' kimi_linear gives them too."""
    from transformers import AutoModelForCausalLM

    from tests.conversion.helpers import build_one_rank_model

    run = RUNS[which](enable_attention_residuals=attnres)
    model = build_one_rank_model(run, VOCAB)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "pseudo_query" in name:
                param.normal_(0.0, 0.5)
            elif "norm" in name and param.dim() == 1:
                param.uniform_(0.5, 1.5)
        for name, buffer in model.named_buffers():
            if name.endswith("expert_bias"):
                buffer.normal_(0.0, 0.1)
    save_megatron(model, run, tmp_path / "save", tokenizer_model)
    exported = convert_to_hf(tmp_path / "save", tmp_path / "hf", **QUIET)
    assert (exported / "modeling_kda.py").is_file()
    hf = AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True).eval()
    assert hf.config.mixer_types[:2] == ["kda", "kda" if which == "debug" else "mla"]
    expected = megatron_logits(model, tokens())
    assert expected.abs().max() > 1e-2
    with torch.no_grad():
        diff = (hf(tokens(), use_cache=False).logits - expected).abs().max().item()
        assert diff < MAX_ABS_DIFF, f"max |HF - Megatron| = {diff}"
        cache = hf(tokens()[:, :-1], use_cache=True).past_key_values
        last = hf(tokens()[:, -1:], past_key_values=cache, use_cache=True).logits
    assert (last[:, 0] - expected[:, -1]).abs().max().item() < MAX_ABS_DIFF
    if not attnres:  # a Kimi Linear checkpoint: transformers' own kimi_linear loads it
        kimi, calls = torch_kda_paths(monkeypatch)
        values = json.loads((exported / "config.json").read_text())
        kimi_keys = {k: v for k, v in values.items() if k not in ("model_type", "auto_map")}
        theirs, info = kimi.KimiLinearForCausalLM.from_pretrained(
            exported, config=kimi.KimiLinearConfig(**kimi_keys), output_loading_info=True
        )
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
        with torch.no_grad():
            diff = (theirs.eval()(tokens()).logits - expected).abs().max().item()
        assert calls["chunk"] == hf.config.mixer_types.count("kda") and diff < MAX_ABS_DIFF, diff


@pytest.mark.mcore
def test_negative_control_swapped_kda_gates_break_the_import_parity(
    tmp_path, tokenizer_model, megatron_one_rank, monkeypatch
):
    """The bound catches an importer that swaps the forget and output gates' down projections
    (same shape [D, h], so no shape check can)."""
    from megatron_attnres.conversion import key_table as table

    original = table._kda_rows

    def swapped(m, a):
        rows = original(m, a)
        swap = {"f_a_proj.weight": "g_a_proj.weight", "g_a_proj.weight": "f_a_proj.weight"}
        return [
            dataclasses.replace(r, hf=(a + swap[r.hf[0][len(a) :]],))
            if r.hf[0][len(a) :] in swap
            else r
            for r in rows
        ]

    monkeypatch.setattr(table, "_kda_rows", swapped)
    expected = kimi_folder(tmp_path / "kimi", tokenizer_model, monkeypatch)
    out = convert_from_hf(tmp_path / "kimi", tmp_path / "megatron", **QUIET)
    model = load_megatron_model(out / "iter_0000000", out / "config.yaml", VOCAB)
    diff = (megatron_logits(model, tokens()) - expected).abs().max().item()
    assert diff > 100 * MAX_ABS_DIFF, diff
