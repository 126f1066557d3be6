"""Loading the run configuration of `attnres-train`: one flat YAML mapping plus overrides.

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
from pathlib import Path

import yaml

from megatron_attnres.config.host import resolve_implementation
from megatron_attnres.config.rules import check_config
from megatron_attnres.config.run import RunConfig

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
    run = resolve_implementation(RunConfig(**values))  # null GPU choices -> this host's
    check_run_config(run)
    return run


def check_run_config(run: RunConfig) -> None:
    """Refuse a bad config before anything is started (config/rules.py lists the rules); the
    batch split over data-parallel ranks is checked once the world size is known."""
    check_config(run)


def as_dict(run: RunConfig) -> dict:
    return dataclasses.asdict(run)


def dump(run: RunConfig) -> str:
    return yaml.safe_dump(as_dict(run), sort_keys=False)
