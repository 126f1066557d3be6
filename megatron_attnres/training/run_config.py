"""The run configuration of `attnres-train`: one flat YAML mapping, Megatron-LM's argument names.

    attnres-train --config configs/tiny.yaml --train-iters 50 --lr 3e-4

Keys are Megatron-LM's command-line names with underscores (`--micro-batch-size` ->
`micro_batch_size`) wherever Megatron has one; command-line overrides accept either spelling.
Unknown keys are refused with the closest known names. Values are converted to the field's type
(so `--lr 3e-4` is a float even though YAML 1.1 would read it as a string).
"""

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass
class RunConfig:
    # -- model: the hybrid pattern is built from these unless hybrid_layer_pattern is given
    num_layers: int = 4  # transformer layers (each a mixer sublayer + an MLP/MoE sublayer)
    hidden_size: int = 64
    ffn_hidden_size: int = 128  # dense MLP layers
    num_attention_heads: int = 4
    num_query_groups: int | None = None
    kv_channels: int | None = None
    seq_length: int = 128
    vocab_size: int | None = None  # model vocab; default: tokenizer vocab padded (below)
    make_vocab_size_divisible_by: int = 128
    position_embedding_type: str = "rope"  # rope | none (MLA patterns use MLA's own RoPE)
    rotary_base: int = 10000
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    untie_embeddings_and_output_weights: bool = True
    hybrid_layer_pattern: str | None = None  # e.g. "*E*E|*E*E"; overrides num_layers' pattern
    multi_latent_attention: bool = False  # mixers are MLA ('+') instead of attention ('*')
    q_lora_rank: int | None = None
    kv_lora_rank: int = 32
    qk_head_dim: int = 16
    qk_pos_emb_head_dim: int = 8  # 0 = NoPE
    v_head_dim: int = 16
    qk_layernorm: bool = False
    mla_use_nope: bool = False  # Kimi Linear: keep the qk_pos_emb_head_dim channels, never rotate
    # -- KDA, Kimi Delta Attention: the 'G' pattern symbol (Megatron-LM's linear-attention names)
    linear_num_key_heads: int = 4  # KDA heads (queries, keys and values have the same count)
    linear_key_head_dim: int = 16  # KDA head dim (keys, values and the low-rank gate width)
    linear_conv_kernel_dim: int = 4  # the short causal convolutions on q, k and v
    # -- MoE (num_experts null/0: every MLP sublayer is dense)
    num_experts: int | None = None
    moe_first_k_dense: int = 0  # the first k transformer layers keep a dense MLP
    moe_router_topk: int = 2
    moe_ffn_hidden_size: int | None = None
    moe_shared_expert_intermediate_size: int | None = None
    moe_router_score_function: str = "softmax"  # softmax | sigmoid
    moe_router_enable_expert_bias: bool = False
    moe_router_bias_update_rate: float = 1e-3
    moe_router_topk_scaling_factor: float | None = None
    moe_aux_loss_coeff: float = 0.0
    moe_token_dispatcher_type: str = "allgather"
    moe_router_dtype: str | None = None  # fp32 | fp64: router logits and weights (null: params)
    # -- AttnRes (names of Megatron-LM PR #6840)
    enable_attention_residuals: bool = True
    attn_res_mode: str = "block"  # block | full
    attn_res_block_layers: int = 1
    attn_res_recompute_read: bool = True  # rebuild each read's result in backward, not saved
    # -- parallelism
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    expert_model_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    # -- batch and schedule
    micro_batch_size: int = 4
    global_batch_size: int = 8
    train_iters: int = 100
    seed: int = 1234
    bf16: bool = False
    # -- optimizer (Megatron-Core's): adam (AdamW: decoupled weight decay), sgd, muon
    optimizer: str = "adam"
    lr: float = 3e-3
    min_lr: float = 3e-4
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    sgd_momentum: float = 0.9
    clip_grad: float = 1.0
    lr_decay_style: str = "WSD"  # constant | linear | cosine | inverse-square-root | WSD
    lr_warmup_iters: int = 10
    lr_decay_iters: int | None = None  # default: train_iters
    lr_wsd_decay_iters: int | None = None  # WSD: final decay length; default: 20% of the run
    lr_wsd_decay_style: str = "linear"  # linear | cosine | exponential | minus_sqrt
    # -- data
    data_path: list[str] = field(default_factory=lambda: ["builtin"])  # blend or "builtin"
    split: str = "95,5,0"
    tokenizer_model: str | None = None  # sentencepiece .model; built for "builtin"
    tokenizer_vocab_size: int = 1024  # when the tokenizer is trained for "builtin"
    data_cache_path: str | None = None  # default: <run_dir>/data_cache
    num_workers: int = 0
    # -- checkpoints, evaluation, logging
    run_dir: str = "runs/default"
    save: str | None = None  # default: <run_dir>/checkpoints
    load: str | None = None  # resume from here (the latest checkpoint in it)
    save_interval: int | None = None  # also saved at the end
    eval_interval: int = 25
    eval_iters: int = 2
    log_interval: int = 1
    diagnostics_interval: int = 25
    wandb_project: str | None = None
    wandb_exp_name: str | None = None
    wandb_mode: str = "offline"  # offline | online | disabled
    plots: bool = True  # write <run_dir>/plots at the end (attnres-plot)
    peak_tflops: float | None = None  # per rank, for MFU (e.g. 989 for an H100 in bf16)
    exit_signal_handler: bool = True  # SIGTERM/SIGUSR1: save at the end of the step and exit
    exit_interval: int | None = None  # save and exit once the step count is a multiple of this
    exit_duration_in_mins: float | None = None  # save and exit after this much wall-clock time
    # -- fault tolerance (checked by checkpointing.check_checkpoint_options and
    #    nonfinite.check_nan_policy; see README "Fault tolerance")
    keep_last_checkpoints: int | None = 3  # older iter_* removed after each save; null keeps all
    finetune: bool = False  # load model weights only from `load`, start at step 0 (Megatron-LM)
    nan_policy: str = "skip"  # NaN/Inf loss or gradient: skip (drop the update) | stop
    max_skipped_steps: int = 10  # skip: the next non-finite step after this many stops the run

    def __post_init__(self):
        if isinstance(self.data_path, str):
            self.data_path = self.data_path.split()


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}


def _key(name: str) -> str:
    key = name.lstrip("-").replace("-", "_")
    if key not in FIELDS:
        close = difflib.get_close_matches(key, FIELDS, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "see configs/tiny.yaml"
        raise ValueError(f"unknown config key {name!r}; {hint}")
    return key


def _convert(key: str, value):
    """`value` (from YAML or the command line) as the type declared for `key`."""
    kind = typing.get_type_hints(RunConfig)[key]
    args = typing.get_args(kind)
    optional = isinstance(kind, types.UnionType) and type(None) in args
    if value is None or (optional and isinstance(value, str) and value.lower() in ("null", "none")):
        if optional:
            return None
        raise ValueError(f"config key {key!r} cannot be null; give a {kind.__name__}")
    base = next(a for a in args if a is not type(None)) if optional else kind
    if typing.get_origin(base) is list:
        return value.split() if isinstance(value, str) else [str(v) for v in value]
    try:
        if base is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return base(float(value)) if base is int and isinstance(value, str) else base(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"config key {key!r}: {value!r} is not a {base.__name__}; give a {base.__name__} "
            f"(e.g. {key}: {getattr(RunConfig(), key)!r})"
        ) from None


def parse_overrides(argv: list[str]) -> dict:
    """['--lr', '3e-4', '--bf16=true'] -> {'lr': 3e-4, 'bf16': True}."""
    out, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}; overrides are --key value pairs")
        if "=" in arg:
            name, value = arg.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ValueError(f"override {arg} has no value; write {arg} VALUE")
            name, value = arg, argv[i + 1]
            i += 2
        key = _key(name)
        out[key] = _convert(key, value)
    return out


def load_run_config(path: str | Path | None, overrides: dict | None = None) -> RunConfig:
    values = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist; see configs/ for examples")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must be a YAML mapping of key: value")
        values = {_key(k): _convert(_key(k), v) for k, v in loaded.items()}
    values.update(overrides or {})
    run = RunConfig(**values)
    check_run_config(run)
    return run


def check_run_config(run: RunConfig) -> None:
    """Refuse a bad config before anything is started (config_checks.py lists the rules); the
    batch split over data-parallel ranks is checked once the world size is known."""
    # Imported here: config_checks builds the model config and so imports this module.
    from megatron_attnres.training.config_checks import check_config

    check_config(run)


def as_dict(run: RunConfig) -> dict:
    return dataclasses.asdict(run)


def dump(run: RunConfig) -> str:
    return yaml.safe_dump(as_dict(run), sort_keys=False)
