"""A Kimi Linear model (KDA 'G', NoPE MLA '+', dense and MoE MLPs, Block AttnRes) trains the same
on TP=2 over gloo, with and without sequence parallelism, as on one rank: losses, gathered
gradients and weights of 3 optimizer steps match at rtol 1e-5. Negative controls, bugs a layer
could have, must break parity at the first step:
- `unsummed_o_norm_grad`: KDA's replicated output-norm weight sees only its rank's heads; if its
  gradient is not summed over the tensor-parallel ranks, parity breaks there (and only there);
- `megatron_mla_down_projection`: megatron-core's own MLA KV down projection, whose shared
  k_pos_emb gradient is not summed over the ranks' heads (mcore/mla.py fixes it)."""

import pytest
import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps

from megatron_attnres.mcore.compat import activate_cpu_compat, model_parallel_manual_seed
from megatron_attnres.mcore.config import UNFUSED_KERNELS, AttnResMLATransformerConfig
from megatron_attnres.mcore.model import build_model_chunks
from megatron_attnres.testing.launcher import run_distributed
from megatron_attnres.testing.sharding import gather_full, load_full_state
from megatron_attnres.train.engine import make_optimizer, train_step, wrap_ddp
from tests.distributed.parity_harness import SEQ, STEPS, TOL, VOCAB, global_batch, mismatched

pytestmark = [pytest.mark.distributed, pytest.mark.mcore]
PATTERN, EXPERTS = "G-+EGE", 4
KDA_PARAMS = ("q_", "k_", "v_", "f_", "b_", "g_", "o_", "A_log", "dt_bias")
DENSE_PATTERN = "G-+-G-"  # Megatron refuses MoE with TP but without sequence parallelism


def kimi_config(tp: int, sp: bool) -> AttnResMLATransformerConfig:
    return AttnResMLATransformerConfig(
        num_layers=len(PATTERN),
        hidden_size=32,
        num_attention_heads=4,
        ffn_hidden_size=48,
        num_moe_experts=EXPERTS,
        moe_router_topk=2,
        moe_ffn_hidden_size=24,
        moe_shared_expert_intermediate_size=16,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_topk_scaling_factor=2.446,
        moe_token_dispatcher_type="allgather",
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_head_dim=8,
        qk_pos_emb_head_dim=4,
        v_head_dim=8,
        rope_type="rope",
        qk_layernorm=True,
        mla_use_nope=True,
        linear_num_key_heads=4,
        linear_key_head_dim=8,
        linear_conv_kernel_dim=4,
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="RMSNorm",
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        is_hybrid_model=True,
        enable_attention_residuals=True,
        attn_res_mode="block",
        attn_res_block_layers=1,
        tensor_model_parallel_size=tp,
        sequence_parallel=sp and tp > 1,
        expert_tensor_parallel_size=tp,
        pipeline_dtype=torch.float32,
        **UNFUSED_KERNELS,
    )


def _randomise(full: dict) -> dict:
    """Megatron's init for the matrices (as parity_harness keeps them); random non-trivial
    values for what starts trivial: norm gains, pseudo-queries, expert biases, and the decay
    parameters A_log and dt_bias (faster and more varied forgetting than at init)."""
    generator = torch.Generator().manual_seed(99)
    out = {}
    for name, value in full.items():
        noise = torch.randn(value.shape, generator=generator)
        if name.endswith(("A_log", "dt_bias")):
            out[name] = value + 0.5 * noise
        elif name.endswith("pseudo_query"):
            out[name] = 0.5 * noise
        elif "norm" in name:
            out[name] = 1.0 + 0.25 * noise
        elif name.endswith("expert_bias"):
            out[name] = 0.1 * noise
        else:
            out[name] = value
    return out


def _unsummed_o_norm_grad():
    from megatron_attnres.mcore import kda

    original = kda.copy_to_tensor_model_parallel_region
    kda.copy_to_tensor_model_parallel_region = lambda x, group=None: x
    return lambda: setattr(kda, "copy_to_tensor_model_parallel_region", original)


def _megatron_mla_down_projection():
    """Megatron-core's own KV down projection under TP: the shared k_pos_emb gradient is not
    summed over the ranks' heads (what AttnResMLASelfAttention._qkv_down_projection fixes)."""
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    from megatron_attnres.mcore.mla import AttnResMLASelfAttention

    original = AttnResMLASelfAttention._qkv_down_projection
    AttnResMLASelfAttention._qkv_down_projection = MLASelfAttention._qkv_down_projection
    return lambda: setattr(AttnResMLASelfAttention, "_qkv_down_projection", original)


SABOTAGES = {
    "none": lambda: lambda: None,
    "unsummed_o_norm_grad": _unsummed_o_norm_grad,
    "megatron_mla_down_projection": _megatron_mla_down_projection,
}


def _checkpoint_shards_match(model, full: dict) -> int:
    """Every dist-checkpoint shard of a mixer parameter is the global tensor's slice at its
    offset, with the global shape of the single-rank model; returns how many KDA shards."""
    kda_shards = 0
    for key, shard in model.sharded_state_dict().items():
        if ".self_attention." not in key or key not in full:
            continue
        assert tuple(shard.global_shape) == tuple(full[key].shape), key
        region = tuple(
            slice(o, o + n) for o, n in zip(shard.global_offset, shard.local_shape, strict=True)
        )
        assert torch.equal(full[key][region], shard.data), key
        kda_shards += key.split(".self_attention.")[1].startswith(KDA_PARAMS)
    return kda_shards


def _train(tp: int, sp: bool, pattern: str, full: dict | None, sabotage: str) -> dict:
    model_parallel_manual_seed(1234)
    undo = SABOTAGES[sabotage]()
    try:
        chunks = build_model_chunks(kimi_config(tp, sp), pattern, VOCAB, SEQ)
        full = full if full is not None else _randomise(gather_full(chunks, EXPERTS))
        load_full_state(chunks, full, EXPERTS)
        shards = _checkpoint_shards_match(chunks[0], full)
        ddp = wrap_ddp(chunks)
        optimizer = make_optimizer(ddp, optimizer="sgd", lr=0.2, sgd_momentum=0.9, clip_grad=0.5)
        config, grads, losses, weights = chunks[0].config, [], [], []
        finalize = config.finalize_model_grads_func

        def finalize_and_capture(*args, **kwargs):
            finalize(*args, **kwargs)
            grads.append(gather_full(chunks, EXPERTS, lambda n, p: getattr(p, "main_grad", None)))

        config.finalize_model_grads_func = finalize_and_capture
        for step in range(STEPS):
            result = train_step(ddp, optimizer, global_batch(step, 2))
            assert not result.skipped
            losses.append(result.loss)
            weights.append(gather_full(chunks, EXPERTS))
        return {
            "initial": full,
            "kda_shards": shards,
            "losses": losses,
            "grads": grads,
            "weights": weights,
        }
    finally:
        undo()


def train_kimi(rank, world_size, full, sabotages=("none",), sp=True, pattern=PATTERN):
    activate_cpu_compat()
    ps.initialize_model_parallel(world_size, 1, expert_tensor_parallel_size=world_size)
    try:
        runs = {name: _train(world_size, sp, pattern, full, name) for name in sabotages}
    finally:
        ps.destroy_model_parallel()
    return runs if rank == 0 else None


@pytest.fixture(scope="module")
def single_rank():
    return run_distributed(train_kimi, 1, args=(None,))[0]["none"]


def assert_trains_like(run: dict, oracle: dict) -> None:
    for step in range(STEPS):
        TOL.assert_close(torch.tensor(run["losses"][step]), torch.tensor(oracle["losses"][step]))
        assert mismatched(run["grads"][step], oracle["grads"][step]) == [], step
        assert mismatched(run["weights"][step], oracle["weights"][step]) == [], step


@pytest.mark.slow
def test_kimi_linear_tp2_sp_trains_like_one_rank(single_rank):
    oracle = single_rank
    runs = run_distributed(train_kimi, 2, args=(oracle["initial"], tuple(SABOTAGES)))[0]
    assert_trains_like(runs["none"], oracle)
    assert runs["none"]["kda_shards"] == 2 * 15  # two KDA layers, all split or replicated
    kda_names = [k for k in oracle["initial"] if ".self_attention.f_b_proj." in k]
    assert len(kda_names) == 2  # both KDA layers took part
    broken = mismatched(runs["unsummed_o_norm_grad"]["grads"][0], oracle["grads"][0])
    assert broken and all(name.endswith("self_attention.o_norm.weight") for name in broken)
    broken = mismatched(runs["megatron_mla_down_projection"]["grads"][0], oracle["grads"][0])
    assert "decoder.layers.2.self_attention.linear_kv_down_proj.weight" in broken


@pytest.mark.slow
def test_kimi_linear_tp2_without_sp_trains_like_one_rank():
    oracle = run_distributed(train_kimi, 1, args=(None, ("none",), False, DENSE_PATTERN))[0]
    sabotages = ("none", "unsummed_o_norm_grad", "megatron_mla_down_projection")
    args = (oracle["none"]["initial"], sabotages, False, DENSE_PATTERN)
    runs = run_distributed(train_kimi, 2, args=args)[0]
    assert_trains_like(runs["none"], oracle["none"])
    broken = mismatched(runs["unsummed_o_norm_grad"]["grads"][0], oracle["none"]["grads"][0])
    assert broken and all(name.endswith("self_attention.o_norm.weight") for name in broken)
    broken = mismatched(
        runs["megatron_mla_down_projection"]["grads"][0], oracle["none"]["grads"][0]
    )
    assert "decoder.layers.2.self_attention.linear_kv_down_proj.weight" in broken
