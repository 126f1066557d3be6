"""Every check of a run config that needs neither a process group nor the data: run by
`load_run_config`, so `attnres-train` refuses a bad config before it starts anything.

Per-field constraints (a minimum, a bound, an interval, a set of choices) live beside the fields
in config/run.py as dataclass field metadata and are read from there; the rules that relate fields
to each other live here, in one place. Each rule is a constraint of this code or of megatron-core
0.19.2 (the comment or the message says which), and each message names the value, the constraint
and what to set instead. The rules run in order: types, ranges (at-least, above, then intervals),
choices, each over the fields in declaration order, then the relations between fields; last, the
AttnResTransformerConfig and the pipeline pattern are built (cheap, no modules), so megatron.core's
own checks and the depth-block cut rules run here too rather than after start-up.
The batch split over data-parallel ranks needs the world size and is checked by the trainer.
"""

import importlib.util
import math
import types
import typing
from dataclasses import fields
from pathlib import Path

from megatron_attnres.config.megatron import (
    expert_tensor_parallel_size,
    layer_pattern,
    transformer_config,
)
from megatron_attnres.config.run import RunConfig
from megatron_attnres.data.datasets import parse_blend, parse_split
from megatron_attnres.mcore.config import experts_split_problem
from megatron_attnres.mcore.kda import check_kda_tensor_parallel
from megatron_attnres.mcore.model import check_pattern, pipeline_pattern, qk_layernorm_problem
from megatron_attnres.mcore.pipeline import batched_p2p_problem

# The per-field constraints, from the metadata beside each field in run.py (declaration order).
_FIELDS = fields(RunConfig)
AT_LEAST = [(f.name, f.metadata["at_least"]) for f in _FIELDS if "at_least" in f.metadata]
ABOVE = [(f.name, f.metadata["above"]) for f in _FIELDS if "above" in f.metadata]
HALF_OPEN = [(f.name, f.metadata) for f in _FIELDS if "half_open" in f.metadata]
CHOICES = {f.name: f.metadata for f in _FIELDS if "one_of" in f.metadata}
_HINTS = typing.get_type_hints(RunConfig)
_DEFAULTS = RunConfig()


def check_config(run: RunConfig) -> None:
    """Raise ValueError naming the value, the constraint and the fix for the first bad field."""
    _check_types(run)
    _check_ranges(run)
    _check_choices(run)
    _check_attention(run)
    _check_kda(run)
    _check_moe(run)
    _check_parallelism(run)
    _check_schedule(run)
    _check_data_settings(run)
    _check_model(run)
    check_checkpoint_options(run)
    check_nan_policy(run)
    check_implementation(run)


def _type_ok(value, kind) -> bool:
    args = typing.get_args(kind)
    if isinstance(kind, types.UnionType):
        return any(_type_ok(value, a) for a in args)
    if kind is type(None):
        return value is None
    if typing.get_origin(kind) is list:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _check_types(run) -> None:
    for f in fields(run):
        value, kind = getattr(run, f.name), _HINTS[f.name]
        if not _type_ok(value, kind):
            shown = getattr(kind, "__name__", str(kind))
            raise ValueError(
                f"{f.name}={value!r} is a {type(value).__name__}, not a {shown}; give a "
                f"{shown} (e.g. {f.name}: {getattr(_DEFAULTS, f.name)!r})"
            )


def _check_ranges(run) -> None:
    for name, minimum in AT_LEAST:
        value = getattr(run, name)
        if value is not None and not value >= minimum:  # `not >=` also catches NaN
            default = ", or null for the default" if _optional(name) else ""
            raise ValueError(f"{name}={value} must be >= {minimum}; use {minimum} or more{default}")
    for name, bound in ABOVE:
        value = getattr(run, name)
        if value is not None and not value > bound:
            fix = "use a positive value" if bound == 0 else f"use a value above {bound}"
            raise ValueError(f"{name}={value} must be > {bound}; {fix}")
    for name, meta in HALF_OPEN:
        value, (low, high) = getattr(run, name), meta["half_open"]
        if not low <= value < high:
            raise ValueError(f"{name}={value} must be in [{low}, {high}); use {meta['hint']}")


def _optional(name: str) -> bool:
    return type(None) in typing.get_args(_HINTS[name])


def _check_choices(run) -> None:
    for name in CHOICES:
        _check_choice(name, getattr(run, name))


def _check_choice(name: str, value) -> None:
    allowed, fix = CHOICES[name]["one_of"], CHOICES[name]["fix"]
    if value in allowed:
        return
    if fix:
        raise ValueError(f"{name}={value!r}; use {fix}")
    names = ["null" if a is None else str(a) for a in allowed]
    raise ValueError(
        f"{name}={value!r} is not supported; use {', '.join(names[:-1])} or {names[-1]}"
    )


def _check_attention(run) -> None:
    heads, groups, tp = (
        run.num_attention_heads,
        run.num_query_groups,
        run.tensor_model_parallel_size,
    )
    if not run.multi_latent_attention:
        if run.kv_channels is None and run.hidden_size % heads:
            raise ValueError(
                f"hidden_size={run.hidden_size} is not divisible by num_attention_heads={heads} "
                f"(the head size is hidden_size / heads unless kv_channels is set, as in "
                f"Megatron-LM); change one of them or set kv_channels"
            )
        if groups is not None and heads % groups:
            raise ValueError(
                f"num_query_groups={groups} does not divide num_attention_heads={heads} "
                f"(grouped-query attention shares each key/value head among heads / groups query "
                f"heads); use a divisor of {heads}"
            )
    if heads % tp:
        raise ValueError(
            f"num_attention_heads={heads} is not divisible by tensor_model_parallel_size={tp} "
            f"(each tensor-parallel rank holds whole heads); use a TP size that divides {heads}"
        )
    groups = groups or heads
    if groups % tp and tp % groups:
        raise ValueError(
            f"num_query_groups={groups} and tensor_model_parallel_size={tp}: one must divide the "
            "other (megatron.core splits or replicates key/value heads across TP ranks); change "
            "num_query_groups or the TP size"
        )
    pattern = layer_pattern(run)
    problem = qk_layernorm_problem(pattern, run.qk_layernorm)
    if problem:
        raise ValueError(problem)
    vocab = run.vocab_size
    if vocab is not None and vocab % tp:
        raise ValueError(
            f"vocab_size={vocab} is not divisible by tensor_model_parallel_size={tp} (the "
            f"embedding is split by rows); use {math.ceil(vocab / tp) * tp} or null to pad the "
            "tokenizer's vocabulary automatically"
        )
    _check_tp_divides("ffn_hidden_size", run.ffn_hidden_size, tp, "-" in pattern)


# fla-core's chunk_kda (Triton) takes key head dims up to this (fla/ops/kda/chunk.py asserts it)
KDA_MAX_HEAD_DIM = 256


def _check_kda(run) -> None:
    """KDA ('G') mixers: heads split over TP, fla-core's head-size limit and its presence; MLA's
    NoPE switch only where there is MLA."""
    pattern = layer_pattern(run)
    if run.mla_use_nope and "+" not in pattern:
        raise ValueError(
            f"mla_use_nope=true but the pattern {pattern!r} has no MLA ('+') layer, so it would "
            "be ignored; set mla_use_nope: false, or multi_latent_attention: true (or '+' mixers "
            "in hybrid_layer_pattern)"
        )
    if "G" not in pattern:
        return
    heads, dim, tp = (
        run.linear_num_key_heads,
        run.linear_key_head_dim,
        run.tensor_model_parallel_size,
    )
    check_kda_tensor_parallel(heads, dim, tp)
    if run.linear_key_head_dim > KDA_MAX_HEAD_DIM:
        raise ValueError(
            f"linear_key_head_dim={run.linear_key_head_dim} is above {KDA_MAX_HEAD_DIM}, the "
            f"largest KDA head fla-core's chunk_kda kernel supports; use at most "
            f"{KDA_MAX_HEAD_DIM} (more KDA heads instead)"
        )
    if importlib.util.find_spec("fla") is None:
        raise ValueError(
            f"the pattern {pattern!r} has KDA ('G') layers, whose operator comes from fla-core "
            "(fla.ops.kda), which is not installed; pip install fla-core (or use '*' or '+' "
            "mixers)"
        )


def _check_tp_divides(name: str, size: int, ranks: int, used: bool, what: str = "TP") -> None:
    if used and size % ranks:
        raise ValueError(
            f"{name}={size} is not divisible by the {what} size {ranks} (megatron.core splits "
            f"MLP columns evenly across those ranks); use a multiple of {ranks}"
        )


def _check_moe(run) -> None:
    experts, topk, ep = run.num_experts or 0, run.moe_router_topk, run.expert_model_parallel_size
    pattern = layer_pattern(run)
    if not experts:
        if ep > 1:
            raise ValueError(
                f"expert_model_parallel_size={ep} without experts (num_experts is unset); set "
                "num_experts or use expert_model_parallel_size: 1"
            )
        if "E" in pattern:
            raise ValueError(
                f"hybrid_layer_pattern={pattern!r} has MoE layers ('E') but num_experts is unset; "
                "set num_experts or use '-' (dense MLP) symbols"
            )
        return
    problem = experts_split_problem(experts, ep, name="num_experts")
    if problem:
        raise ValueError("; ".join(problem))
    if not 1 <= topk <= experts:
        raise ValueError(
            f"moe_router_topk={topk} must be between 1 and num_experts={experts}; route each "
            f"token to 1..{experts} experts"
        )
    score = run.moe_router_score_function
    if topk == 1 and score == "softmax":
        raise ValueError(
            "moe_router_topk=1 with moe_router_score_function='softmax' has a zero router "
            "gradient (megatron.core refuses it without pre-softmax, which this trainer does not "
            "expose); use moe_router_score_function: sigmoid or moe_router_topk >= 2"
        )
    if run.moe_router_enable_expert_bias and score not in ("sigmoid", "sqrtsoftplus"):
        raise ValueError(
            f"moe_router_enable_expert_bias=true with moe_router_score_function={score!r}: "
            "megatron.core's aux-loss-free expert bias needs sigmoid or sqrtsoftplus scores; set "
            "moe_router_score_function: sigmoid or moe_router_enable_expert_bias: false"
        )
    if not run.hybrid_layer_pattern and run.moe_first_k_dense >= run.num_layers:
        raise ValueError(
            f"moe_first_k_dense={run.moe_first_k_dense} with num_layers={run.num_layers} leaves "
            f"no MoE layer, so num_experts={experts} is never used; use moe_first_k_dense < "
            f"{run.num_layers}, or num_experts: null for a dense model"
        )
    tp = run.tensor_model_parallel_size
    etp = expert_tensor_parallel_size(run)
    moe_ffn = run.moe_ffn_hidden_size or run.ffn_hidden_size
    _check_tp_divides("moe_ffn_hidden_size", moe_ffn, etp, "E" in pattern, "expert-TP")
    shared = run.moe_shared_expert_intermediate_size
    _check_tp_divides("moe_shared_expert_intermediate_size", shared or 0, tp, bool(shared))


def _check_parallelism(run) -> None:
    tp, pp, vpp = (
        run.tensor_model_parallel_size,
        run.pipeline_model_parallel_size,
        run.virtual_pipeline_model_parallel_size,
    )
    if run.sequence_parallel and tp == 1:
        raise ValueError(
            "sequence_parallel=true with tensor_model_parallel_size=1: sequence parallelism "
            "splits activations across TP ranks (megatron.core refuses it without TP); set "
            "sequence_parallel: false or a TP size > 1"
        )
    if run.num_experts and tp > 1 and not run.sequence_parallel:
        raise ValueError(
            f"num_experts={run.num_experts} with tensor_model_parallel_size={tp} and "
            "sequence_parallel=false: megatron.core's MoE layer refuses to train with TP but "
            "without sequence parallelism; set sequence_parallel: true"
        )
    if run.sequence_parallel and run.seq_length % tp:
        raise ValueError(
            f"seq_length={run.seq_length} is not divisible by tensor_model_parallel_size={tp}, "
            "which sequence parallelism splits it across; use a multiple of "
            f"{tp} (e.g. {math.ceil(run.seq_length / tp) * tp})"
        )
    if vpp is not None and pp == 1:
        raise ValueError(
            f"virtual_pipeline_model_parallel_size={vpp} with pipeline_model_parallel_size=1: "
            "virtual stages interleave a pipeline; set pipeline_model_parallel_size > 1 or "
            "virtual_pipeline_model_parallel_size: null"
        )


def _check_schedule(run) -> None:
    microbatches_per_step(run)
    if run.min_lr > run.lr:
        raise ValueError(
            f"min_lr={run.min_lr} is above lr={run.lr} (the schedule decays from lr down to "
            f"min_lr); use min_lr <= {run.lr}"
        )
    decay = run.lr_decay_iters or run.train_iters
    if run.lr_warmup_iters >= decay:
        raise ValueError(
            f"lr_warmup_iters={run.lr_warmup_iters} must be below lr_decay_iters (default "
            f"train_iters) = {decay}; shorten the warmup or lengthen the run"
        )
    if run.lr_decay_style == "WSD" and (run.lr_wsd_decay_iters or 0) > decay:
        raise ValueError(
            f"lr_wsd_decay_iters={run.lr_wsd_decay_iters} is longer than the decay phase "
            f"({decay} iterations); use at most {decay}"
        )
    if run.optimizer == "muon" and run.use_distributed_optimizer:
        raise ValueError(
            "optimizer=muon with use_distributed_optimizer=true lets data-parallel replicas "
            "drift apart in megatron-core 0.19.2 (measured, no error); set "
            "use_distributed_optimizer: false for Muon"
        )


def _check_data_settings(run) -> None:
    """The data settings' syntax (the files themselves are checked by data.check_data)."""
    fractions = parse_split(run.split)
    if fractions[0] == 0:
        raise ValueError(
            f"split={run.split!r} gives the train split no documents; give it a positive "
            "weight, e.g. '98,2,0' (train, valid, test)"
        )
    if run.data_path != ["builtin"]:
        parse_blend(run.data_path)


def _check_model(run) -> None:
    """Build the AttnResTransformerConfig and the cut pattern: megatron.core's config checks,
    validate_attnres and the depth-block cut rules (no modules are built)."""
    try:
        config = transformer_config(run)
        check_pattern(config, pipeline_pattern(config, layer_pattern(run)))
    except AssertionError as err:  # megatron.core's divisibility asserts carry no fix
        raise ValueError(
            f"megatron.core refused the model config: {err or type(err).__name__}; change the "
            "sizes it names (see configs/tiny.yaml for a consistent set)"
        ) from err


def check_checkpoint_options(run) -> None:
    """keep_last_checkpoints and finetune (train/checkpointing.py carries them out)."""
    if run.keep_last_checkpoints is not None and run.keep_last_checkpoints < 1:
        raise ValueError(
            f"keep_last_checkpoints={run.keep_last_checkpoints} must be >= 1 (the checkpoint "
            "just written is always kept); use null to keep every checkpoint"
        )
    if run.finetune and not run.load:
        raise ValueError(
            "finetune=true needs load: the checkpoint directory whose model weights to start "
            "from (set load, or drop finetune)"
        )
    save = Path(run.save or Path(run.run_dir) / "checkpoints")
    if run.finetune and Path(run.load).resolve() == save.resolve():
        raise ValueError(
            f"finetune=true with load = save = {save}: every restart would load the run's own "
            "latest weights and reset it to step 0; save the fine-tuning run elsewhere"
        )


NAN_POLICIES = CHOICES["nan_policy"]["one_of"]


def check_nan_policy(run) -> None:
    """nan_policy and max_skipped_steps (train/nonfinite.py carries them out)."""
    _check_choice("nan_policy", run.nan_policy)
    if run.max_skipped_steps < 0:
        raise ValueError(
            f"max_skipped_steps={run.max_skipped_steps} must be >= 0 (0 stops at the first "
            "non-finite step, like nan_policy=stop)"
        )


def microbatches_per_step(run, data_parallel_size: int | None = None) -> int:
    """Micro-batches each rank runs per step: global_batch_size / (micro_batch_size x DP). The
    one batch-split rule: checked at load time without the DP size (the world size is not known
    yet), then by the trainer and the planners with it."""
    if data_parallel_size is None:
        if run.global_batch_size % run.micro_batch_size:
            raise ValueError(
                f"global_batch_size={run.global_batch_size} is not a multiple of micro_batch_size="
                f"{run.micro_batch_size}; make it micro_batch_size x data-parallel size x k"
            )
        return run.global_batch_size // run.micro_batch_size
    per_step = run.micro_batch_size * data_parallel_size
    if run.global_batch_size % per_step:
        raise ValueError(
            f"global_batch_size={run.global_batch_size} is not divisible by micro_batch_size x "
            f"data-parallel size = {run.micro_batch_size} x {data_parallel_size}; use a multiple "
            f"of {per_step}"
        )
    return run.global_batch_size // per_step


def check_implementation(run) -> None:
    """The GPU implementation keys among themselves (host-independent, checked at load)."""
    if run.overlap_param_gather and not run.use_distributed_optimizer:
        raise ValueError(
            "overlap_param_gather=true without use_distributed_optimizer: only the distributed "
            "optimizer gathers parameters; set use_distributed_optimizer: true or "
            "overlap_param_gather: false"
        )
    if run.moe_grouped_gemm and run.transformer_impl != "transformer_engine":
        raise ValueError(
            f"moe_grouped_gemm=true with transformer_impl={run.transformer_impl!r}: the grouped "
            "GEMM is TransformerEngine's; set transformer_impl: transformer_engine (on a GPU "
            "host with TE) or moe_grouped_gemm: false"
        )


def check_host_support(run, host) -> None:
    """What this host must offer for the run's implementation keys; checked when a run is built
    (train/build.py), not at load, so that a config written on a GPU cluster still loads on a
    laptop for conversion or sizing."""
    if run.transformer_impl == "transformer_engine" and not (host.cuda and host.transformer_engine):
        raise ValueError(
            f"transformer_impl=transformer_engine on a host with {host.describe()}: "
            "TransformerEngine's modules need both; install transformer-engine on a CUDA host, "
            "or set transformer_impl: local (or null to choose by host)"
        )
    interleaved = (run.virtual_pipeline_model_parallel_size or 1) > 1
    problem = batched_p2p_problem(bool(run.batch_p2p_comm), interleaved, host.backend)
    if problem:
        raise ValueError(problem)
