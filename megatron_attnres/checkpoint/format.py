"""The on-disk checkpoint format the trainer writes and the converters read and write.

    SAVE/config.yaml                          the resolved run config (CONFIG)
    SAVE/latest_checkpointed_iteration.txt   Megatron-LM's tracker file (checkpoint.files)
    SAVE/iter_0000010/                        one megatron.core dist checkpoint (torch_dist):
        model | model0, model1 ...            the model chunks' sharded state (model_state_key)
        optimizer, scheduler, rng             (trainer checkpoints only)
        progress                              Progress: iteration, consumed samples, skipped steps
        model_config                          the model signature (model_signature)
        model_only: true                      (MODEL_ONLY) weights alone, as the HF import writes

Tensors are stored under their global names and shapes, so any TP/PP/EP layout loads them.
"""

import queue
from dataclasses import dataclass
from pathlib import Path

from megatron.core.dist_checkpointing.strategies import filesystem_async

CONFIG = "config.yaml"  # the run config attnres-train writes beside its checkpoints
MODEL_ONLY = "model_only"  # common-state key of a weights-only checkpoint

# TransformerConfig fields that decide the checkpoint's tensors and what they compute.
SIGNATURE_FIELDS = (
    "hidden_size",
    "num_layers",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "normalization",
    "gated_linear_unit",
    "num_moe_experts",
    "moe_router_topk",
    "moe_ffn_hidden_size",
    "moe_shared_expert_intermediate_size",
    "moe_router_score_function",
    "moe_router_enable_expert_bias",
    "enable_attention_residuals",
    "attn_res_mode",
    "attn_res_block_layers",
    "multi_latent_attention",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_head_dim",
    "qk_pos_emb_head_dim",
    "v_head_dim",
    "qk_layernorm",
    "mla_use_nope",
    "mla_latent_norm_epsilon",
    "linear_num_key_heads",
    "linear_key_head_dim",
    "linear_conv_kernel_dim",
)


@dataclass
class Progress:
    iteration: int = 0  # optimizer steps done (skipped steps included, as in Megatron-LM)
    consumed_samples: int = 0  # global samples consumed by those steps
    skipped_steps: int = 0  # steps whose update was skipped for a non-finite loss or gradient


def model_signature(config, pattern: str, vocab_size: int, tied_embeddings: bool) -> dict:
    """The model-defining fields recorded in every checkpoint and compared on load: the
    TransformerConfig's SIGNATURE_FIELDS, the hybrid pattern without pipeline cuts, the padded
    vocabulary and whether the output layer shares the embedding."""
    signature = {}
    for name in SIGNATURE_FIELDS:
        value = getattr(config, name, None)
        signature[name] = value if isinstance(value, int | float | str | None) else str(value)
    return signature | {
        "hybrid_layer_pattern": pattern.replace("|", ""),
        "vocab_size": vocab_size,
        "tied_embeddings": tied_embeddings,
    }


def check_signature(saved: dict | None, expected: dict | None, path: Path) -> str | None:
    """Raise when the checkpoint was written for another model; a note for old checkpoints."""
    if expected is None:
        return None
    if saved is None:
        return (
            f"WARNING: checkpoint {path} records no model config (written before checkpoints "
            "carried one); loading it without checking that it fits this model"
        )
    wrong = [
        f"{k}: checkpoint {saved[k]!r}, this run {v!r}"
        for k, v in expected.items()
        if k in saved and saved[k] != v
    ]
    if wrong:
        raise ValueError(
            f"checkpoint {path} was saved from a different model ({'; '.join(wrong)}); run "
            "with the config it was trained with (config.yaml beside it), or point load/save at "
            "another directory to start a new run"
        )
    return None


def model_state_key(index: int, num_chunks: int) -> str:
    """The state key of model chunk INDEX: "model" for one chunk, else "model0", "model1"..."""
    return "model" if num_chunks == 1 else f"model{index}"


def use_in_process_writer() -> None:
    """Make dist_checkpointing.save collect its writer threads' results in this process. Call
    it before any synchronous save (save_checkpoint does; so should a converter).

    megatron-core 0.19.2 collects them through a spawn-context multiprocessing Manager queue,
    created on the first save (~10 s: the child re-imports everything) and left running as an
    orphan, holding the parent's stdout, when the trainer is killed. In a synchronous save the
    writer threads run in this process, so a thread-safe queue does the same job
    (test_checkpoint_integrity checks that no helper process is started)."""
    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()
