"""Shared pieces of the KDA conversion tests: a toy Kimi-Linear-shaped config (KDA, MLA NoPE with
rope channels, dense then MoE) and transformers' Kimi Linear on its PyTorch KDA path."""

import pytest
import torch

from megatron_attnres.conversion.hf.configuration_attnres import AttnResConfig
from megatron_attnres.conversion.hf.modeling_attnres import AttnResForCausalLM
from tests.conversion.helpers import randomise_hf

H, D, K = 2, 8, 4
KDA = {"num_heads": H, "head_dim": D, "short_conv_kernel_size": K}
VOCAB = 128


# Keys both AttnResConfig and transformers' KimiLinearConfig read the same way.
SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=2,
    num_key_value_heads=2,
    intermediate_size=48,
    moe_intermediate_size=16,
    num_experts=4,
    num_experts_per_token=2,
    num_shared_experts=1,
    first_k_dense_replace=1,
    routed_scaling_factor=2.5,
    moe_renormalize=True,
    rms_norm_eps=1e-6,
    kv_lora_rank=8,
    q_lora_rank=None,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
    tie_word_embeddings=False,
    pad_token_id=None,
    bos_token_id=None,
    eos_token_id=None,
    linear_attn_config={"full_attn_layers": [2], "kda_layers": [1, 3], **KDA},
)


def kda_config(**overrides) -> AttnResConfig:
    """KDA, MLA (NoPE with rope channels), KDA: a dense first layer, then a sigmoid MoE."""
    fields = dict(SHAPE, mla_use_nope=True, attn_res_mode="block", attn_res_block_size=1)
    return AttnResConfig(**{**fields, **overrides})


def kda_model(**overrides) -> AttnResForCausalLM:
    torch.manual_seed(0)
    return randomise_hf(AttnResForCausalLM(kda_config(**overrides))).eval()


def tokens(length: int = 21, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


def torch_kda_paths(monkeypatch):
    """transformers picks fla's Triton kernels when fla is installed, which cannot run on CPU:
    route its KDA calls to its own PyTorch implementations and count them."""
    kimi = pytest.importorskip("transformers.models.kimi_linear.modeling_kimi_linear")
    calls = {"chunk": 0, "recurrent": 0}
    for name, kind in (
        ("chunk_kimi_delta_attention", "chunk"),
        ("recurrent_kimi_delta_attention", "recurrent"),
    ):
        torch_path = getattr(kimi, name).__wrapped__

        def counted(*args, _path=torch_path, _kind=kind, **kwargs):
            calls[_kind] += 1
            return _path(*args, **kwargs)

        monkeypatch.setattr(kimi, name, counted)
    return kimi, calls
