"""Non-finite losses and gradients: the per-step check, and where a bad value came from.

The check runs every step and is cheap: the loss is already a float on every rank, and each
gradient buffer is summed once (a NaN or Inf anywhere makes the sum non-finite); one all-reduce
makes every rank agree. Megatron-Core's optimizer does not do this for fp32/bf16 (it only skips
on fp16 loss-scale overflow), so without it a NaN would reach the weights.

The location is searched only after a detection: the step's micro-batches are run forward again
(no gradients, so nothing is accumulated; RNG states restored afterwards) with a forward hook on
every module; each rank notes the first module, in execution order, whose output is non-finite,
and the earliest one over all ranks (lowest sublayer, the most specific module) is reported: a
sublayer (global 1-based number, as in diagnostics), an expert, a depth read, the embedding or
the output layer. When every forward output is finite the fault is in the backward pass, and the
parameters with non-finite gradients are reported instead (backward runs last sublayer first, so
the highest such sublayer is where it started).
"""

import math
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from megatron_attnres.train.checkpointing import rng_state, set_rng_state


def _unwrap(chunk):
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _any_nonfinite(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.is_floating_point() and not bool(torch.isfinite(value).all())
    if isinstance(value, tuple | list):
        return any(_any_nonfinite(v) for v in value)
    if isinstance(value, dict):
        return any(_any_nonfinite(v) for v in value.values())
    return False


def step_is_finite(chunks, loss: float) -> bool:
    """Whether the loss and every gradient are finite, agreed over all ranks (collective)."""
    bad = 0.0 if math.isfinite(loss) else 1.0
    for chunk in chunks:
        for buffer in chunk.buffers + chunk.expert_parallel_buffers:
            if not bool(torch.isfinite(buffer.grad_data.sum())):
                bad = 1.0
    flag = torch.tensor([bad])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0.0


def expert_biases(chunks) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(router expert bias, a copy): finalize_model_grads updates the bias from the step's token
    counts before the optimizer runs, so a skipped step puts the copies back."""
    return [
        (m.expert_bias, m.expert_bias.detach().clone())
        for chunk in chunks
        for m in _unwrap(chunk).modules()
        if getattr(m, "expert_bias", None) is not None
    ]


@dataclass
class Location:
    where: str  # e.g. "sublayer 4 (MoE), expert 1"
    module: str  # the module's qualified name in its model chunk
    sublayer: int | None  # global 1-based; 0 the embedding, None after the last sublayer
    expert: int | None  # global expert index
    phase: str  # forward | backward
    rank: int

    def sort_key(self) -> tuple:
        order = self.sublayer if self.sublayer is not None else math.inf
        # Backward runs last sublayer first: the highest sublayer saw the fault first.
        order = -order if self.phase == "backward" else order
        return (self.phase == "backward", order, self.expert is None, -self.module.count("."))


def _sublayer_kind(layer) -> str:
    if hasattr(getattr(layer, "mlp", None), "experts"):
        return "MoE"
    attention = type(getattr(layer, "self_attention", None)).__name__
    if "MLA" in attention:
        return "MLA"
    return "attention" if attention.endswith("Attention") else "MLP"


def module_places(chunk) -> dict[str, tuple[str, int | None, int | None]]:
    """Qualified module name -> (description, sublayer, expert) for one model chunk."""
    model = _unwrap(chunk)
    places = {
        name: ("embedding", 0, None)
        for name, _ in model.named_modules()
        if name.startswith("embedding")
    }
    places.update(
        {
            name: ("output layer", None, None)
            for name, _ in model.named_modules()
            if name.startswith("output_layer") or name == ""
        }
    )
    stack = model.decoder
    places["decoder"] = ("the stack", None, None)
    for name, _ in stack.named_modules(prefix="decoder"):
        if name.startswith(("decoder.final_norm", "decoder.output_read")):
            places[name] = ("the output depth read and final norm", None, None)
    for i, layer in enumerate(stack.layers):
        number = layer.layer_number
        base = f"sublayer {number} ({_sublayer_kind(layer)})"
        experts = getattr(getattr(layer, "mlp", None), "local_expert_indices", None)
        for name, _ in layer.named_modules(prefix=f"decoder.layers.{i}"):
            places[name] = (base, number, None)
            if experts is not None and ".experts.local_experts." in name:
                index = experts[int(name.split(".experts.local_experts.")[1].split(".")[0])]
                places[name] = (f"{base}, expert {index}", number, index)
        if getattr(stack, "depth_reads", None) is not None:
            for name, _ in stack.depth_reads[i].named_modules(prefix=f"decoder.depth_reads.{i}"):
                places[name] = (f"the depth read before sublayer {number}", number, None)
    return places


def _place(places: dict, name: str, phase: str) -> Location:
    where, sublayer, expert = places.get(name, (name, None, None))
    return Location(where, name, sublayer, expert, phase, dist.get_rank())


def _first_forward(chunks, run_forward) -> Location | None:
    found, handles = [], []
    for chunk in chunks:
        places = module_places(chunk)
        for name, module in _unwrap(chunk).named_modules():

            def hook(module, args, output, name=name, places=places):
                if not found and _any_nonfinite(output):
                    found.append(_place(places, name, "forward"))

            handles.append(module.register_forward_hook(hook))
    saved = rng_state()
    try:
        with torch.no_grad():
            run_forward()
    finally:
        for handle in handles:
            handle.remove()
        set_rng_state(saved)
    return found[0] if found else None


def _first_backward(chunks) -> Location | None:
    bad = []
    for chunk in chunks:
        places = module_places(chunk)
        for name, param in _unwrap(chunk).named_parameters():
            grad = getattr(param, "main_grad", param.grad)
            if grad is not None and not bool(torch.isfinite(grad).all()):
                bad.append(_place(places, name.rsplit(".", 1)[0], "backward"))
    return min(bad, key=Location.sort_key) if bad else None


def locate(chunks, run_forward) -> dict:
    """Where this step's non-finite value came from, the same dict on every rank (collective):
    {"where": ..., "module": ..., "sublayer": ..., "expert": ..., "phase": ..., "rank": ...},
    or {"where": "not found", ...}. Call it before the gradients are zeroed."""
    mine = _first_forward(chunks, run_forward) or _first_backward(chunks)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    forward = [loc for loc in everyone if loc is not None and loc.phase == "forward"]
    candidates = forward or [loc for loc in everyone if loc is not None]
    if not candidates:
        nowhere = dict.fromkeys(("module", "sublayer", "expert", "phase", "rank"))
        return {"where": "not found (forward outputs and gradients finite on re-run)"} | nowhere
    return asdict(min(candidates, key=Location.sort_key))


def describe(location: dict) -> str:
    if location["phase"] is None:
        return location["where"]
    produced = "output" if location["phase"] == "forward" else "gradient"
    return (
        f"{location['where']} (first non-finite {produced}: {location['module']} on rank "
        f"{location['rank']})"
    )


@dataclass
class Verdict:
    record: dict  # the metrics.jsonl "nonfinite" record
    message: str  # printed by rank 0
    stop_reason: str | None  # None: the step is skipped and training goes on


def decide(run, skipped: int, step: int, location: dict) -> Verdict:
    """Skip STEP (SKIPPED steps were skipped before) or stop, as nan_policy and
    max_skipped_steps say: at most max_skipped_steps are skipped, the next one stops."""
    stop = run.nan_policy == "stop" or skipped >= run.max_skipped_steps
    record = {"action": "stop" if stop else "skip", "skipped_steps": skipped + (not stop)}
    text = f"step {step}: non-finite loss or gradient, from {describe(location)}"
    if not stop:
        message = (
            f"{text}; update skipped ({skipped + 1} of max_skipped_steps={run.max_skipped_steps})"
        )
        return Verdict(record | location, message, None)
    if run.nan_policy == "stop":
        why = "nan_policy=stop"
    else:
        why = f"max_skipped_steps={run.max_skipped_steps} reached"
    message = f"{text}; stopping ({why}) and saving the last good state (step {step - 1})"
    reason = f"non-finite values at step {step} from {location['where']} ({why})"
    return Verdict(record | location, message, reason)
