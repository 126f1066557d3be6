"""Training diagnostics of one step: depth-attention weights (the paper's Fig. 8), per-sublayer
output and gradient RMS (Fig. 5), MoE expert load and router entropy.

Used every N steps around one step's forward and backward, on every rank:

    diagnostics = ModelDiagnostics(model_chunks)
    with diagnostics.capture():
        ...forward and backward of every micro-batch...
    record = gather_diagnostics(diagnostics.summary())  # the merged dict on rank 0, else None

Hooks exist only inside `capture()`; outside it the model runs untouched. Statistics accumulate
on the device over all micro-batches of the captured step and become plain floats in `summary()`
(JSON-serialisable). Keys are global 1-based sublayer numbers as strings, plus OUTPUT_KEY:

    {"depth_attention": {"1": {"completed": [1.0], "partial": None},
                         "2": {"completed": [0.62], "partial": 0.38}, ...,
                         "output": {"completed": [0.2, 0.3], "partial": 0.5}},
     "output_norm": {"1": 0.81, ...},      # RMS of the sublayer's raw output y
     "grad_norm": {"1": 2.1e-4, ...},      # RMS of dLoss/dy as backpropagated (loss scaling and
                                           # the 1/micro-batches factor included)
     "moe": {"4": {"expert_load": [0.26, 0.24, ...], "router_entropy": 1.37,
                   "expert_bias_abs_mean": 0.003}, ...}}

depth_attention[k]["completed"][i] is the mean weight (over tokens) of summary b_i and
["partial"] that of the partial summary, None when the read has none (the depth-block schedule
decides; the output read's last source is the last block, counted as its partial like
`DepthBlockSchedule.final_sources`). A one-source read (the first sublayer) is the identity:
recorded as [1.0] without computing anything. The router entropy is that of each token's score
distribution normalised to sum to 1 (Megatron's aux-loss scores), averaged over tokens; input
jitter, if enabled, is not reproduced.
"""

import contextlib
import math
from collections import defaultdict

import torch
import torch.distributed as dist

from megatron_attnres.attnres.depth_read import depth_weights

OUTPUT_KEY = "output"  # the output read's key in "depth_attention"
SECTIONS = ("depth_attention", "output_norm", "grad_norm", "moe")


def sublayer_sort_key(key: str) -> tuple[int, int]:
    """Sublayers in model order, the output read last."""
    return (1, 0) if key == OUTPUT_KEY else (0, int(key))


class _Sum:
    """A running sum kept on the device (no host sync inside hooks) and the number of terms."""

    def __init__(self):
        self.total, self.count = None, 0

    def add(self, total: torch.Tensor, count: int) -> None:
        total = total.detach().double()
        self.total = total if self.total is None else self.total + total
        self.count += count


def _rms(stat: _Sum) -> float:
    return math.sqrt(stat.total.item() / stat.count)


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _unwrap(chunk):
    while hasattr(chunk, "module"):  # Megatron DDP, Float16Module
        chunk = chunk.module
    return chunk


class ModelDiagnostics:
    """Per-rank diagnostics of this rank's model chunks (HybridModels, possibly DDP-wrapped)."""

    def __init__(self, model_chunks):
        # Imported here so that attnres-plot, which reads this module's format, needs no megatron.
        from megatron.core.transformer.moe.router import TopKRouter

        self.reads, self.has_partial = {}, {}  # key -> DepthAttention, key -> bool
        self.layers = []  # (key, hybrid layer)
        self.routers = []  # (key, TopKRouter)
        for chunk in model_chunks:
            stack = _unwrap(chunk).decoder
            depth_reads = getattr(stack, "depth_reads", None) or [None] * len(stack.layers)
            for read, layer in zip(depth_reads, stack.layers, strict=True):
                key = str(layer.layer_number)
                self.layers.append((key, layer))
                if read is not None:
                    self.reads[key] = read
                    self.has_partial[key] = stack.schedule.sources(layer.layer_number).has_partial
                routers = [m for m in layer.modules() if isinstance(m, TopKRouter)]
                self.routers += [(key, router) for router in routers[:1]]
            if getattr(stack, "output_read", None) is not None:
                self.reads[OUTPUT_KEY] = stack.output_read
                self.has_partial[OUTPUT_KEY] = stack.schedule.final_sources().has_partial
        self._handles = []
        self._reset()

    def _reset(self):
        self._weights = defaultdict(_Sum)
        self._outputs = defaultdict(_Sum)
        self._grads = defaultdict(_Sum)
        self._load = defaultdict(_Sum)
        self._entropy = defaultdict(_Sum)
        self._bias = {}

    @contextlib.contextmanager
    def capture(self):
        """Record statistics of everything run inside the block (clears earlier ones)."""
        if self._handles:
            raise RuntimeError("ModelDiagnostics.capture() is already active; do not nest it")
        self._reset()
        try:
            for key, read in self.reads.items():
                self._handles.append(read.register_forward_pre_hook(self._depth_hook(key)))
            for key, layer in self.layers:
                self._handles.append(layer.register_forward_hook(self._layer_hook(key)))
            for key, router in self.routers:
                self._handles.append(router.register_forward_hook(self._router_hook(key)))
            yield self
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles = []

    def _depth_hook(self, key):
        def hook(read, args):
            sources = args[0]
            if len(sources) == 1:
                self._weights[key].add(torch.ones(1), 1)
                return
            with torch.no_grad():
                weights_N_ = depth_weights(
                    sources, read.pseudo_query, read.key_norm_weight, read.eps
                )
                tokens = weights_N_[0].numel()
                self._weights[key].add(weights_N_.reshape(len(sources), -1).sum(dim=1), tokens)

        return hook

    def _layer_hook(self, key):
        def record_grad(grad):
            self._grads[key].add(grad.detach().float().pow(2).sum(), grad.numel())

        def hook(layer, args, output):
            y = _first(output)
            self._outputs[key].add(y.detach().float().pow(2).sum(), y.numel())
            if y.requires_grad:
                y.register_hook(record_grad)

        return hook

    def _router_hook(self, key):
        from megatron.core.transformer.moe.moe_utils import compute_routing_scores_for_aux_loss

        def hook(router, args, output):
            # TopKRouter.forward(input, padding_mask) -> (probs, routing_map), both
            # [tokens, experts]; routing_map is the boolean top-k choice. The full score
            # distribution is not returned, so the (cheap) gating is recomputed for the entropy.
            hidden, padding_mask = args[0], args[1] if len(args) > 1 else None
            routing_map = output[1]
            with torch.no_grad():
                logits = router.gating(hidden).reshape(-1, routing_map.shape[-1])
                mask = None if padding_mask is None else padding_mask.reshape(-1).bool()
                _, scores = compute_routing_scores_for_aux_loss(
                    logits,
                    router.topk,
                    router.score_function,
                    fused=router.config.moe_router_fusion,
                    padding_mask=mask,
                )
                if mask is not None:  # Megatron's padding_mask is True at padding tokens
                    routing_map = routing_map & ~mask.unsqueeze(-1)
                tokens = logits.shape[0] - (0 if mask is None else int(mask.sum()))
                self._entropy[key].add(torch.special.entr(scores).sum(), tokens)
                self._load[key].add(routing_map.sum(dim=0), routing_map.shape[0])
                bias = getattr(router, "expert_bias", None)
                self._bias[key] = None if bias is None else bias.detach().abs().mean()

        return hook

    def summary(self) -> dict:
        """This rank's statistics of the last `capture()` as plain Python values."""
        depth = {}
        for key, stat in self._weights.items():
            mean_N = (stat.total / stat.count).tolist()
            partial = mean_N.pop() if self.has_partial[key] and len(mean_N) > 1 else None
            depth[key] = {"completed": mean_N, "partial": partial}
        moe = {}
        for key, load in self._load.items():
            bias = self._bias[key]
            moe[key] = {
                "expert_load": (load.total / load.total.sum()).tolist(),
                "router_entropy": self._entropy[key].total.item() / self._entropy[key].count,
                "expert_bias_abs_mean": None if bias is None else bias.item(),
            }
        return {
            "depth_attention": _ordered(depth),
            "output_norm": _ordered({k: _rms(s) for k, s in self._outputs.items()}),
            "grad_norm": _ordered({k: _rms(s) for k, s in self._grads.items()}),
            "moe": _ordered(moe),
        }


def _ordered(section: dict) -> dict:
    return {key: section[key] for key in sorted(section, key=sublayer_sort_key)}


def merge_summaries(summaries) -> dict:
    """One summary from every rank's: pipeline stages contribute different sublayers; tensor,
    expert and data-parallel replicas repeat a sublayer, and the first one seen is kept."""
    merged = {section: {} for section in SECTIONS}
    for summary in summaries:
        for section in SECTIONS:
            for key, value in summary.get(section, {}).items():
                merged[section].setdefault(key, value)
    return {section: _ordered(merged[section]) for section in SECTIONS}


def gather_diagnostics(summary: dict) -> dict | None:
    """Every rank's summary merged on global rank 0 (None on the other ranks); without a process
    group, the summary itself. Collective: call it on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return summary
    summaries = [None] * dist.get_world_size()
    dist.all_gather_object(summaries, summary)
    return merge_summaries(summaries) if dist.get_rank() == 0 else None
