"""The exported model's KDA layers (conversion/hf/modeling_kda.py) against independent oracles:
one forward over the whole sequence (for cached prefill + decode, and for left padding) and
transformers' own Kimi Linear (KimiLinearDeltaAttention with its PyTorch KDA, its cache states),
loaded strictly from a folder our code saved."""

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from megatron_attnres.attnres.tolerances import tolerance
from megatron_attnres.conversion.hf import AUTO_MAP, MODELING_FILES
from megatron_attnres.conversion.hf.modeling_kda import AttnResCache
from tests.conversion.kda_helpers import (
    SHAPE,
    D,
    H,
    K,
    kda_config,
    kda_model,
    tokens,
    torch_kda_paths,
)

FP32 = tolerance(torch.float32)


def decode(model, ids, prefill: int):
    """Logits of a prefill of `prefill` tokens then one token at a time, and the cache."""
    out = model(ids[:, :prefill], use_cache=True)
    cache, logits = out.past_key_values, [out.logits]
    for i in range(prefill, ids.shape[1]):
        out = model(ids[:, i : i + 1], past_key_values=cache, use_cache=True)
        logits.append(out.logits)
    return torch.cat(logits, dim=1), cache


def test_config_reads_kimi_linear_layer_lists():
    assert kda_config().mixer_types == ["kda", "mla", "kda"]


@pytest.mark.parametrize("mode", ["none", "block", "full"])
def test_cached_decoding_equals_full_recomputation(mode):
    """Prefill 7 tokens (two conv windows), then decode 14 one by one: every position's logits
    and, at the end, every KDA layer's conv and recurrent states equal a full recomputation."""
    model, ids = kda_model(attn_res_mode=mode), tokens()
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        incremental, cache = decode(model, ids, prefill=7)
        _, recomputed = decode(model, ids, prefill=ids.shape[1])
    FP32.assert_close(incremental, full)
    assert isinstance(cache, AttnResCache) and cache.get_seq_length() == ids.shape[1]
    assert sorted(cache.kda) == [0, 2]
    for layer, state in cache.kda.items():
        expected = recomputed.kda[layer]
        assert state.recurrent.dtype == torch.float32 and state.recurrent.shape == (2, H, D, D)
        FP32.assert_close(state.recurrent, expected.recurrent, f"layer {layer} state")
        for name in "qkv":
            assert state.conv[name].shape == (2, H * D, K - 1)
            FP32.assert_close(state.conv[name], expected.conv[name], f"layer {layer} {name}")


def test_negative_control_a_lost_recurrent_state_changes_the_next_token():
    model, ids = kda_model(attn_res_mode="none"), tokens()
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = model(ids[:, :-1], use_cache=True).past_key_values
        cache.kda[0].recurrent = torch.zeros_like(cache.kda[0].recurrent)
        last = model(ids[:, -1:], past_key_values=cache, use_cache=True).logits
    assert (last[:, 0] - full[:, -1]).abs().max() > 1e3 * FP32.atol


def test_generate_uses_the_kda_cache_and_matches_greedy_recomputation():
    model, ids = kda_model(attn_res_mode="block"), tokens(length=5, batch=1)
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=6, do_sample=False)
        expected = ids
        for _ in range(6):
            next_token = model(expected, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            expected = torch.cat((expected, next_token), dim=1)
    assert torch.equal(generated, expected)


def test_left_padding_leaves_the_kda_output_unchanged():
    """Padded (zeroed) inputs never enter the KDA state or the short conv windows."""
    model, ids = kda_model(attn_res_mode="none"), tokens(length=9, batch=1)
    padded = torch.cat((torch.zeros(1, 3, dtype=ids.dtype), ids), dim=1)
    mask = torch.cat((torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)), dim=1)
    with torch.no_grad():
        alone = model(ids, use_cache=False).logits
        batched = model(padded, attention_mask=mask, use_cache=False).logits[:, 3:]
    FP32.assert_close(batched, alone)


def test_kda_layers_without_sizes_are_refused_by_name():
    with pytest.raises(ValueError, match="linear_attn_config.*num_heads"):
        kda_config(linear_attn_config={"full_attn_layers": [2], "kda_layers": [1, 3]})


# ----------------------------------------------------------------------------- transformers
def load_in_transformers(model, folder, kimi):
    kimi_config = kimi.KimiLinearConfig(**SHAPE)
    model.save_pretrained(folder)
    kimi_config.save_pretrained(folder)
    theirs, info = kimi.KimiLinearForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert theirs.config.layer_types == ["linear_attention", "full_attention", "linear_attention"]
    return theirs.eval()


def test_attnres_off_kda_export_matches_transformers_kimi_linear(tmp_path, monkeypatch):
    """AttnRes off: our weights load strictly in transformers' KimiLinearForCausalLM (KDA with
    its A_log [1, 1, H, 1], MLA NoPE with rope channels, dense + MoE) and give our logits, on a
    prefill and on cached decoding; its cache holds our KDA states."""
    kimi, calls = torch_kda_paths(monkeypatch)
    model, ids = kda_model(attn_res_mode="none"), tokens(length=12)
    theirs = load_in_transformers(model, tmp_path, kimi)
    with torch.no_grad():
        FP32.assert_close(model(ids, use_cache=False).logits, theirs(ids).logits)
        assert calls["chunk"] == 2  # one call per KDA layer: their KDA really ran

        ours_out = model(ids[:, :-1], use_cache=True)
        their_out = theirs(ids[:, :-1], use_cache=True)
        for layer in (0, 2):
            ours = ours_out.past_key_values.kda[layer]
            cache = their_out.past_key_values
            FP32.assert_close(ours.recurrent, cache.get_recurrent_state(layer))
            conv = cache.get_conv_state(layer)[..., -(K - 1) :].split(H * D, dim=1)
            for name, their_conv in zip("qkv", conv, strict=True):
                FP32.assert_close(ours.conv[name], their_conv, f"layer {layer} {name}")
        last = ids[:, -1:]
        ours_next = model(last, past_key_values=ours_out.past_key_values, use_cache=True).logits
        their_next = theirs(last, past_key_values=their_out.past_key_values, use_cache=True).logits
        assert calls["recurrent"] == 2
        FP32.assert_close(ours_next, their_next)


def test_negative_control_an_unreshaped_a_log_breaks_transformers_parity(tmp_path, monkeypatch):
    """The parity bound catches a per-channel decay that reads A_log in the wrong head order."""
    kimi, _ = torch_kda_paths(monkeypatch)
    model, ids = kda_model(attn_res_mode="none"), tokens(length=12)
    with torch.no_grad():
        for layer in (0, 2):
            model.model.layers[layer].self_attn.A_log.copy_(
                torch.tensor([0.0, 2.5]).view(1, 1, H, 1)
            )
    theirs = load_in_transformers(model, tmp_path, kimi)
    with torch.no_grad():
        expected = theirs(ids).logits
        for layer in (0, 2):
            a_log = model.model.layers[layer].self_attn.A_log
            a_log.copy_(a_log.flip(2))
        assert (model(ids, use_cache=False).logits - expected).abs().max() > 1e3 * FP32.atol


def test_kda_folder_loads_with_trust_remote_code(tmp_path, hf_modules_cache):
    """The exported folder's own code (modeling_kda.py copied beside modeling_attnres.py and
    imported relatively) rebuilds the model: equal logits and cached decoding."""
    model, ids = kda_model(attn_res_mode="block"), tokens()
    model.config.auto_map = dict(AUTO_MAP)
    model.save_pretrained(tmp_path / "export")
    for source in MODELING_FILES:
        shutil.copy(source, tmp_path / "export" / source.name)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export", trust_remote_code=True)
    assert type(loaded).__module__.startswith("transformers_modules")
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        assert torch.equal(loaded.eval()(ids, use_cache=False).logits, expected)
        FP32.assert_close(decode(loaded, ids, prefill=5)[0], expected)


def test_beam_search_with_the_cache_equals_beam_search_without_it():
    """Beam search reorders the KDA states with the beams (AttnResCache.reorder_cache)."""
    model, ids = kda_model(attn_res_mode="none"), tokens(length=5, batch=1)
    options = dict(max_new_tokens=5, num_beams=3, do_sample=False, early_stopping=False)
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **options)
        recomputed = model.generate(ids, use_cache=False, **options)
    assert torch.equal(cached, recomputed)
