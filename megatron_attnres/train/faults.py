"""Test-only fault injection, driven by environment variables; inert unless they are set.

ATTNRES_FAULT="point=backward,step=7[,rank=0][;point=...,step=...]"
ATTNRES_FAULT_MARKERS=DIR
    SIGKILL this process the first time it reaches POINT during STEP on global RANK (default
    0), after creating DIR/POINT-stepSTEP-rankRANK, so that the process torchrun restarts
    does not die there again. Points:
      forward           in the forward pass, as this rank's first sublayer returns
      backward          in the backward pass, as that sublayer's output gradient arrives
      optimizer         after the first inner optimizer's step (parameters partly updated)
      checkpoint_write  while dist_checkpointing writes iter_STEP.tmp: the data files are
                        written, the .metadata not yet
      tracker           after iter_STEP.tmp is renamed, before the tracker names it

ATTNRES_INJECT_NAN="step=3,sublayer=4,expert=1[,into=output|grad]"
    Put a NaN into one element of the output (or of the output's gradient) of expert 1 of
    global sublayer 4 (1-based, as in diagnostics) at step 3; `step=3-4` covers a range;
    without `expert`, into the sublayer's own output. It fires again when that step's
    micro-batches are re-run to locate the fault (nonfinite.locate). An expert that receives
    no token at that step has an empty output and nothing is injected.
"""

import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.optim.optimizer import register_optimizer_step_post_hook

POINTS = ("forward", "backward", "optimizer", "checkpoint_write", "tracker")
_current_step = 0


def _parse(text: str, variable: str) -> dict[str, str]:
    try:
        return dict(item.split("=", 1) for item in text.split(",") if item.strip())
    except ValueError:
        raise ValueError(
            f"{variable}={text!r}: write key=value pairs separated by commas"
        ) from None


def _kill_specs() -> list[dict]:
    text = os.environ.get("ATTNRES_FAULT", "")
    specs = [_parse(part, "ATTNRES_FAULT") for part in text.split(";") if part.strip()]
    for spec in specs:
        if spec.get("point") not in POINTS or not spec.get("step", "").isdigit():
            raise ValueError(
                f"ATTNRES_FAULT entry {spec}: needs point= one of {', '.join(POINTS)} and step=N"
            )
    if specs and not os.environ.get("ATTNRES_FAULT_MARKERS"):
        raise ValueError("ATTNRES_FAULT is set without ATTNRES_FAULT_MARKERS=DIR (marker files)")
    return specs


_KILLS = _kill_specs()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def begin_step(step: int) -> None:
    """The step (1-based) the trainer is computing now."""
    global _current_step
    _current_step = step


def kill_point(point: str, step: int | None = None) -> None:
    """SIGKILL here if ATTNRES_FAULT asks for it (once per marker directory)."""
    step = _current_step if step is None else step
    for spec in _KILLS:
        if spec["point"] != point or int(spec["step"]) != step:
            continue
        if int(spec.get("rank", 0)) != _rank():
            continue
        marker = Path(os.environ["ATTNRES_FAULT_MARKERS"]) / f"{point}-step{step}-rank{_rank()}"
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.open("x").close()
        except FileExistsError:
            continue  # this fault already happened; the restarted process carries on
        print(f"ATTNRES_FAULT: killing rank {_rank()} at {point}, step {step}", flush=True)
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def _on_open(event: str, args: tuple) -> None:
    # An audit hook: torch.distributed.checkpoint writes .metadata.tmp after every data file.
    if event == "open" and args and isinstance(args[0], str | os.PathLike):
        path = Path(os.fspath(args[0]))
        mode = args[1] if len(args) > 1 and isinstance(args[1], str) else ""
        if path.name.startswith(".metadata") and "w" in mode:
            from megatron_attnres.checkpoint.files import staged_iteration

            iteration = staged_iteration(path.parent)
            if iteration is not None:
                kill_point("checkpoint_write", iteration)


def _unwrap(chunk):
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def install(chunks) -> None:
    """Install the hooks the environment asks for on this rank's model chunks."""
    points = {spec["point"] for spec in _KILLS if int(spec.get("rank", 0)) == _rank()}
    layers = [layer for chunk in chunks for layer in _unwrap(chunk).decoder.layers]
    if points & {"forward", "backward"} and layers:
        layers[0].register_forward_hook(_forward_kill)
    if "optimizer" in points:
        register_optimizer_step_post_hook(lambda *_: kill_point("optimizer"))
    if "checkpoint_write" in points:
        sys.addaudithook(_on_open)
    text = os.environ.get("ATTNRES_INJECT_NAN", "")
    if text:
        _install_nan(_parse(text, "ATTNRES_INJECT_NAN"), layers)


def _forward_kill(module, args, output):
    kill_point("forward")
    out = output[0] if isinstance(output, tuple) else output
    if out.requires_grad:
        out.register_hook(lambda grad: kill_point("backward"))


def _install_nan(spec: dict, layers) -> None:
    try:
        first, _, last = spec["step"].partition("-")
        steps = range(int(first), int(last or first) + 1)
        sublayer, into = int(spec["sublayer"]), spec.get("into", "output")
        expert = int(spec["expert"]) if "expert" in spec else None
    except (KeyError, ValueError):
        raise ValueError(
            f"ATTNRES_INJECT_NAN={spec}: needs step=N (or N-M) and sublayer=K, optionally "
            "expert=E and into=output|grad"
        ) from None
    for layer in layers:
        if layer.layer_number != sublayer:
            continue
        target = layer
        if expert is not None:
            experts = getattr(getattr(layer, "mlp", None), "local_expert_indices", None)
            if experts is None:
                raise ValueError(f"ATTNRES_INJECT_NAN: sublayer {sublayer} is not an MoE sublayer")
            if expert not in experts:
                return  # another expert-parallel rank holds it
            target = layer.mlp.experts.local_experts[experts.index(expert)]
        target.register_forward_hook(_nan_hook(steps, into))


def _nan_hook(steps: range, into: str):
    def poison(tensor):
        nan = torch.zeros_like(tensor)
        nan.view(-1)[:1] = float("nan")
        return tensor + nan

    def hook(module, args, output):
        if _current_step not in steps:
            return None
        out, rest = (output[0], output[1:]) if isinstance(output, tuple) else (output, None)
        if into == "grad":
            if out.requires_grad:
                out.register_hook(poison)
            return None
        out = poison(out)
        return (out, *rest) if rest is not None else out

    return hook
