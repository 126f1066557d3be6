"""RunConfig's fields document themselves and carry their own range or choice.

The oracle is the tables below: the per-field constraints as config/rules.py listed them before
they moved beside the fields (AT_LEAST, ABOVE_ZERO, CHOICES and the Adam beta interval, plus
nan_policy's choices from check_nan_policy). A constraint dropped or changed by accident fails
`test_constrained_fields_are_exactly_the_listed_ones`; the other tests give values just outside
and at each limit to `load_run_config` and expect it to refuse or accept them.
"""

import ast
import dataclasses
import math
import typing
from pathlib import Path

import pytest

import megatron_attnres.config.run as run_module
from megatron_attnres.config.host import IMPLEMENTATION_KEYS, resolve_implementation
from megatron_attnres.config.load import load_run_config
from megatron_attnres.config.run import RunConfig, above, at_least, half_open, one_of

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
HINTS = typing.get_type_hints(RunConfig)

AT_LEAST_1 = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "kv_channels", "seq_length", "vocab_size", "make_vocab_size_divisible_by", "rotary_base",
    "kv_lora_rank", "qk_head_dim", "v_head_dim", "q_lora_rank", "moe_ffn_hidden_size",
    "moe_shared_expert_intermediate_size", "attn_res_block_layers",
    "tensor_model_parallel_size", "pipeline_model_parallel_size",
    "virtual_pipeline_model_parallel_size", "expert_model_parallel_size", "micro_batch_size",
    "global_batch_size", "train_iters", "lr_decay_iters", "lr_wsd_decay_iters",
    "tokenizer_vocab_size", "save_interval", "eval_interval", "log_interval",
    "diagnostics_interval", "exit_interval", "linear_num_key_heads", "linear_key_head_dim",
    "linear_conv_kernel_dim",
)  # fmt: skip
AT_LEAST_0 = (
    "qk_pos_emb_head_dim", "num_experts", "moe_first_k_dense", "seed", "lr_warmup_iters",
    "num_workers", "eval_iters", "lr", "min_lr", "weight_decay", "sgd_momentum", "clip_grad",
    "moe_aux_loss_coeff", "moe_router_bias_update_rate",
)  # fmt: skip
ABOVE_ZERO = (
    "norm_epsilon", "init_method_std", "adam_eps", "moe_router_topk_scaling_factor",
    "exit_duration_in_mins", "peak_tflops", "mla_latent_norm_epsilon",
)  # fmt: skip
UNIT_INTERVAL = ("adam_beta1", "adam_beta2")  # [0, 1)
CHOICES = {
    "position_embedding_type": ("rope", "none", "learned_absolute"),
    "attn_res_mode": ("block", "full"),
    "moe_router_score_function": ("softmax", "sigmoid", "sqrtsoftplus"),
    "moe_token_dispatcher_type": ("allgather", "alltoall", "flex"),
    "moe_router_dtype": (None, "fp32", "fp64"),
    "transformer_impl": (None, "local", "transformer_engine"),
    "muon_tp_mode": ("duplicated", "distributed", "blockwise"),
    "optimizer": ("adam", "sgd", "muon"),
    "lr_decay_style": ("constant", "linear", "cosine", "inverse-square-root", "WSD"),
    "lr_wsd_decay_style": ("linear", "cosine", "exponential", "minus_sqrt"),
    "wandb_mode": ("offline", "online", "disabled"),
    "nan_policy": ("skip", "stop"),
}
MINIMUM = {name: 1 for name in AT_LEAST_1} | {name: 0 for name in AT_LEAST_0}

# Values at the limit that tiny.yaml's other fields refuse (a cross-field rule, not the range).
DEPENDENT = {
    "num_layers": "moe_first_k_dense=1 leaves no MoE layer",
    "hidden_size": "not divisible by the 4 heads",
    "num_attention_heads": "num_query_groups=2 does not divide it",
    "global_batch_size": "not a multiple of micro_batch_size=8",
    "train_iters": "shorter than the warmup",
    "lr_decay_iters": "shorter than the warmup",
    "virtual_pipeline_model_parallel_size": "needs pipeline parallelism",
    "lr": "below min_lr",
    ("moe_router_score_function", "softmax"): "tiny.yaml enables the expert bias",
}


def _typed(name: str, value):
    """`value` as the field's number type (the message shows 0.0 for a float field)."""
    kind = HINTS[name]
    return float(value) if float in (kind, *typing.get_args(kind)) else value


def _refused(name: str, value) -> str:
    with pytest.raises(ValueError) as err:
        load_run_config(TINY, {name: value})
    return str(err.value)


def test_every_field_has_a_docstring():
    tree = ast.parse(Path(run_module.__file__).read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "RunConfig"]
    documented, body = [], cls.body
    for stmt, after in zip(body, [*body[1:], None], strict=True):
        if not isinstance(stmt, ast.AnnAssign):
            continue
        name = stmt.target.id
        is_doc = isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
        assert is_doc and isinstance(after.value.value, str), f"{name} has no docstring after it"
        assert len(after.value.value.split()) >= 3, f"{name}'s docstring says nothing"
        documented.append(name)
    assert documented == [f.name for f in dataclasses.fields(RunConfig)]


def test_constrained_fields_are_exactly_the_listed_ones():
    expected = (
        {name: at_least(1) for name in AT_LEAST_1}
        | {name: at_least(0) for name in AT_LEAST_0}
        | {name: above(0) for name in ABOVE_ZERO}
        | {name: half_open(0, 1, "e.g. 0.9 or 0.95") for name in UNIT_INTERVAL}
        | {name: one_of(*allowed) for name, allowed in CHOICES.items()}
    )
    found = {}
    for f in dataclasses.fields(RunConfig):
        if f.metadata:
            meta = dict(f.metadata)
            found[f.name] = dict(meta, fix=None) if "fix" in meta else meta
    assert found == expected


def test_defaults_and_tiny_yaml_load():
    # Loading resolves the null GPU implementation keys for this host (config/host.py).
    assert load_run_config(None) == resolve_implementation(RunConfig())
    assert load_run_config(TINY).num_experts == 4


@pytest.mark.parametrize("name", sorted(MINIMUM))
def test_below_minimum_is_refused(name):
    minimum = MINIMUM[name]
    bad = _typed(name, minimum - 1)
    message = _refused(name, bad)
    assert f"{name}={bad} must be >= {minimum}; use {minimum} or more" in message
    optional = type(None) in typing.get_args(HINTS[name])
    assert ("or null for the default" in message) == optional
    if isinstance(bad, float):  # a NaN compares false with everything: refused too
        assert f"{name}=nan must be >= {minimum}" in _refused(name, math.nan)


@pytest.mark.parametrize("name", sorted(set(MINIMUM) - set(DEPENDENT)))
def test_minimum_itself_is_accepted(name):
    run = load_run_config(TINY, {name: _typed(name, MINIMUM[name])})
    assert getattr(run, name) == MINIMUM[name]


@pytest.mark.parametrize("name", ABOVE_ZERO)
def test_non_positive_is_refused_and_positive_accepted(name):
    for bad in (0.0, -1.0, math.nan):
        assert f"{name}={bad} must be > 0; use a positive value" in _refused(name, bad)
    assert getattr(load_run_config(TINY, {name: 1e-6}), name) == 1e-6


@pytest.mark.parametrize("name", UNIT_INTERVAL)
def test_adam_beta_outside_unit_interval_is_refused(name):
    for bad in (1.0, -0.1, 1.5):
        assert f"{name}={bad} must be in [0, 1); use e.g. 0.9 or 0.95" in _refused(name, bad)
    for good in (0.0, 0.999):
        assert getattr(load_run_config(TINY, {name: good}), name) == good


@pytest.mark.parametrize("name", sorted(CHOICES))
def test_value_outside_the_choices_is_refused_naming_them(name):
    message = _refused(name, "bogus")
    assert message.startswith(f"{name}='bogus'")
    fix = message.split("; use ", 1)[1]
    for allowed in CHOICES[name]:
        assert ("null" if allowed is None else allowed) in fix


@pytest.mark.parametrize(
    ("name", "value"),
    [(n, v) for n, allowed in sorted(CHOICES.items()) for v in allowed if (n, v) not in DEPENDENT],
)
def test_every_choice_is_accepted(name, value):
    loaded = getattr(load_run_config(TINY, {name: value}), name)
    if name in IMPLEMENTATION_KEYS and value is None:
        assert loaded is not None  # null means "this host's choice", resolved at load
    else:
        assert loaded == value


def test_nan_policy_message_explains_the_choices():
    assert _refused("nan_policy", "ignore") == (
        "nan_policy='ignore'; use skip (drop the step's update, up to max_skipped_steps times) "
        "or stop (save the last good state and exit)"
    )
