"""A toy-width twin of a large run config: the same recipe at sizes a CPU trains in seconds.

    twin = toy_twin(load_run_config("configs/kimi_linear_48b_attnres.yaml"))

Derived mechanically: every width is divided down to a small value of the same kind, the expert
count and top-k shrink, the hybrid pattern keeps its first `layers` transformer layers (so the
dense first layer, the KDA/MLA interleave and the depth-block size stay), and every other
setting is kept: precision, optimizer, schedule style, router (sigmoid, expert bias, scaling),
dispatcher, sequence parallelism, AttnRes mode and block size, MLA NoPE and latent-norm eps. The
GPU implementation keys go back to null (this host's choice), the parallel sizes to 1 (the
caller lays the twin out), and the data to the built-in corpus.
"""

import dataclasses

from megatron_attnres.config.host import IMPLEMENTATION_KEYS
from megatron_attnres.config.megatron import layer_pattern
from megatron_attnres.config.run import RunConfig

# field -> the twin's value (widths and counts; each keeps its role, e.g. heads still divide)
TOY_SIZES = dict(
    hidden_size=64,
    ffn_hidden_size=128,
    num_attention_heads=4,
    kv_lora_rank=32,
    qk_head_dim=16,
    qk_pos_emb_head_dim=8,
    v_head_dim=16,
    linear_num_key_heads=4,
    linear_key_head_dim=16,
    moe_ffn_hidden_size=32,
    seq_length=64,
    micro_batch_size=1,
    global_batch_size=8,
    vocab_size=None,
    tokenizer_vocab_size=256,
)
TOY_EXPERTS, TOY_TOPK = 8, 2


def toy_twin(run: RunConfig, layers: int = 6) -> RunConfig:
    """`run` at toy width with its first `layers` transformer layers (see the module doc)."""
    symbols = layer_pattern(run).replace("|", "")
    if 2 * layers > len(symbols):
        raise ValueError(
            f"layers={layers} but the run has {len(symbols) // 2} transformer layers; use at most "
            f"{len(symbols) // 2}"
        )
    sizes = dict(TOY_SIZES)
    if run.num_experts:
        sizes.update(num_experts=TOY_EXPERTS, moe_router_topk=min(run.moe_router_topk, TOY_TOPK))
        if run.moe_shared_expert_intermediate_size:
            # the shared expert keeps its width in routed-expert units (Kimi: one expert wide)
            units = run.moe_shared_expert_intermediate_size // (run.moe_ffn_hidden_size or 1)
            sizes["moe_shared_expert_intermediate_size"] = (
                max(1, units) * TOY_SIZES["moe_ffn_hidden_size"]
            )
    return dataclasses.replace(
        run,
        **sizes,
        num_layers=layers,
        hybrid_layer_pattern=symbols[: 2 * layers],
        num_query_groups=None,
        kv_channels=None,
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None,
        expert_model_parallel_size=1,
        sequence_parallel=False,
        **{key: None for key in IMPLEMENTATION_KEYS},
        data_path=["builtin"],
        tokenizer_model=None,
        train_iters=20,
        lr_warmup_iters=2,
        lr_wsd_decay_iters=4,
        lr_decay_iters=None,
        save_interval=None,
        run_dir="runs/toy_twin",
        peak_tflops=None,
    )
