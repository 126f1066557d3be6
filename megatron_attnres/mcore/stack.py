"""`AttnResHybridStack`: Megatron's HybridStack with the residual path of AttnRes
(docs/architecture.md sections 3 and 4).

The layers come from the spec with `raw_output_bda`, so each returns its raw output
y = f(pre_norm(x)). This stack forms every layer's input and carries the state between layers
explicitly (never on `self`: activation recompute re-runs layer forwards):

    none : x <- x + y                                        (the standard residual)
    block: completed summaries [b_0 = embedding, b_1, ...] and the partial summary of the current
           depth block; input = depth_read(completed [+ partial]); partial += y; at a depth-block
           boundary the partial joins the completed summaries. Full AttnRes is S = 1.

The output read (its own parameters) sits before the final norm on the last stage. Under
pipeline parallelism a stage starts and ends at depth-block boundaries: it receives the completed
summaries packed into one tensor and sends on its completed summaries the same way
(`mcore/pipeline.py`); the partial summary never crosses a stage.
"""

from functools import partial as partial_fn

import torch
from megatron.core.dist_checkpointing.utils import apply_prefix_mapping
from megatron.core.models.hybrid.hybrid_block import HybridStack
from megatron.core.utils import WrappedTensor, make_viewless_tensor
from torch import nn

from megatron_attnres.attnres.module import DepthAttention
from megatron_attnres.kernels.depth_read_triton import depth_read_auto
from megatron_attnres.mcore.pipeline import pack_summaries, unpack_summaries
from megatron_attnres.mcore.read_recompute import (
    ReadResultScope,
    entry_module,
    recomputed_read_result,
)


class AttnResHybridStack(HybridStack):
    def __init__(
        self, config, submodules, *args, final_norm_module=None, post_layer_norm=True, **kwargs
    ):
        # The parent would build TransformerEngine's norm; we build `final_norm_module` instead.
        super().__init__(config, submodules, *args, post_layer_norm=False, **kwargs)
        self.post_layer_norm = post_layer_norm
        self.schedule = config.depth_block_schedule()
        hidden, eps = config.hidden_size, config.layernorm_epsilon
        if self.post_process and post_layer_norm:
            if final_norm_module is None:
                raise ValueError("AttnResHybridStack needs final_norm_module in its spec params")
            self.final_norm = final_norm_module(config=config, hidden_size=hidden, eps=eps)
        self.stage_payload = None  # packed summaries from the previous pipeline stage
        # Interleaved pipelines: this rank's SummaryCache and this chunk's global index
        # (set by build_model_chunks; only summaries the receiver lacks cross a transition).
        self.summary_cache, self.chunk_index = None, None
        # 1-based number of this stage's first sublayer; a stage starts a depth block.
        self.first_layer_number = self.layers[0].layer_number if len(self.layers) else 1
        if self.schedule.uses_depth_reads:
            # One read per local sublayer (indexed like self.layers) and the output read; child
            # modules so that sharded_state_dict (which walks children) checkpoints them. Reads
            # run the fused Triton kernel on GPU (ATTNRES_DEPTH_READ=auto|torch|triton, kernels/).
            read = partial_fn(DepthAttention, read_fn=depth_read_auto, dtype=config.params_dtype)
            self.depth_reads = nn.ModuleList(read(hidden, eps) for _ in self.layers)
            self.output_read = read(hidden, eps) if self.post_process else None
            # Read-result recomputation scoped to each layer's pre-norm (read_recompute.py).
            self._read_scopes = [self._scope_for(entry_module(layer)) for layer in self.layers]
            for param in self._attnres_parameters():
                # Replicated across TP; under sequence parallelism each rank sees its own tokens,
                # so finalize_model_grads must all-reduce these grads like LayerNorm weights.
                param.sequence_parallel = bool(config.sequence_parallel)

    @staticmethod
    def _scope_for(entry):
        if entry is None:
            return None
        scope = ReadResultScope()
        scope.attach(entry)
        return scope

    def _summaries_received(self) -> int:
        if self.pre_process or not self.schedule.uses_depth_reads:
            return 1
        entering = self.schedule.summaries_entering(self.first_layer_number)
        if self.summary_cache is None:
            return entering
        return entering - self.summary_cache.known(self.chunk_index)

    def payload_summary_counts(self) -> tuple[int, int]:
        """Summaries in the payload this stage receives and in the one it sends on (0 where it
        has none): with one chunk per rank (1F1B) they are the same for every micro-batch."""
        received = 0 if self.pre_process else self._summaries_received()
        if self.post_process:
            return received, 0
        last = self.layers[-1].layer_number if len(self.layers) else self.first_layer_number - 1
        return received, self.schedule.summaries_entering(last + 1)

    def set_input_tensor(self, input_tensor):
        """Receive the previous stage's payload (the packed completed summaries).

        HybridModel sizes RoPE by `input_tensor.size(0)`, so that attribute shows one summary's
        rows; the whole payload is kept in `stage_payload` for forward().
        """
        self.stage_payload = input_tensor
        if input_tensor is not None:
            input_tensor = input_tensor[: input_tensor.shape[0] // self._summaries_received()]
        self.input_tensor = input_tensor

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Megatron's, with each depth read checkpointed under its global sublayer index (as the
        layers are), so pipeline stages do not collide and checkpoints reshard across PP."""
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.schedule.uses_depth_reads:
            apply_prefix_mapping(
                state,
                {
                    f"{prefix}depth_reads.{i}.": f"{prefix}depth_reads.{layer.layer_number - 1}."
                    for i, layer in enumerate(self.layers)
                },
            )
        return state

    def _attnres_parameters(self):
        yield from self.depth_reads.parameters()
        if self.output_read is not None:
            yield from self.output_read.parameters()

    def forward(
        self,
        hidden_states,
        attention_mask,
        inference_context=None,
        rotary_pos_emb=None,
        *,
        inference_params=None,
        packed_seq_params=None,
        padding_mask=None,
    ):
        if inference_context is not None or inference_params is not None:
            raise NotImplementedError(
                "AttnResHybridStack has no Megatron inference path; export to Hugging Face "
                "for generation"
            )
        if not self.pre_process:
            hidden_states = self.stage_payload  # set by the pipeline schedule
        if isinstance(hidden_states, WrappedTensor):
            hidden_states = hidden_states.unwrap()
        layer_kwargs = dict(
            attention_mask=attention_mask,
            rotary_pos_emb=rotary_pos_emb,
            packed_seq_params=packed_seq_params,
            padding_mask=padding_mask,
        )
        if self.schedule.uses_depth_reads:
            cache = self.summary_cache
            microbatch = cache.next_microbatch(self.chunk_index // cache.P) if cache else None
            if self.pre_process:
                completed = [hidden_states]  # b_0: the embedding, produced here
            else:
                if cache is not None:
                    hidden_states = cache.add_cached_gradients(
                        hidden_states, microbatch, self.chunk_index, "received"
                    )
                completed = unpack_summaries(hidden_states, self._summaries_received())
                if cache is not None:
                    completed = [*cache.cached(microbatch, self.chunk_index), *completed]
            inherited = 0 if self.pre_process else len(completed)
            out = self._forward_depth_attention(completed, layer_kwargs)  # final norm included
            if not self.post_process:
                out = self._stage_payload(out, inherited, microbatch)
        else:
            out = hidden_states
            for layer in self.layers:
                out = out + _raw_output(layer, out, **layer_kwargs)
            if self.post_process and self.post_layer_norm:
                out = self.final_norm(out)
        return make_viewless_tensor(inp=out, requires_grad=out.requires_grad, keep_graph=True)

    def _forward_depth_attention(self, completed, layer_kwargs):
        partial = None
        for read, layer, scope in zip(
            self.depth_reads, self.layers, self._read_scopes, strict=True
        ):
            if self.schedule.starts_block(layer.layer_number) and partial is not None:
                completed, partial = [*completed, partial], None
            sources = completed if partial is None else [*completed, partial]
            consumer = partial_fn(_raw_output, layer, **layer_kwargs)
            y = self._after_read(read, sources, consumer, scope)
            partial = y if partial is None else partial + y
        if partial is not None:
            completed = [*completed, partial]  # stages end at depth-block boundaries
        if not self.post_process:
            return completed
        if not self.post_layer_norm:
            return self.output_read(completed)
        return self._after_read(self.output_read, completed, self.final_norm)

    def _after_read(self, read, sources, consumer, scope=None):
        """consumer(read(sources)); the read's result is not among what the consumer (a
        sublayer, or the final norm) saves for backward but rebuilt from the sources then
        (read_recompute.py), unless attn_res_recompute_read is off or the read is the identity.
        With a `scope` only the sublayer's pre-norm saves under the recomputation hooks."""
        x = read(sources)
        if len(sources) == 1 and torch.is_grad_enabled():
            x = _ZeroGradients.apply(x, *read.parameters())
        if len(sources) == 1 or not self.config.attn_res_recompute_read or not x.requires_grad:
            return consumer(x)
        recompute = read.recompute_fn(sources, x)
        if scope is not None:
            return scope.run(x, recompute, partial_fn(consumer, x))
        with recomputed_read_result(x, recompute):
            return consumer(x)

    def _stage_payload(self, completed, inherited, microbatch):
        """The packed summaries for the next stage: all of them (1F1B), or under the interleaved
        schedule only those the next chunk's rank does not hold yet (`SummaryCache`)."""
        cache, chunk = self.summary_cache, self.chunk_index
        if cache is None:
            return pack_summaries(completed)
        cache.store(
            microbatch,
            chunk,
            received=completed[cache.known(chunk) : inherited],
            produced=completed[inherited:],
        )
        packed = pack_summaries(completed[cache.known(chunk + 1) :])
        return cache.add_cached_gradients(packed, microbatch, chunk, "produced")


class _ZeroGradients(torch.autograd.Function):
    """The identity on x that reports zero gradients for `params`. A one-source read (the model's
    first sublayer) is bypassed, so its pseudo-query and key-norm gain are not in the graph; this
    puts them there with the gradient they truly have, 0, so that every trainable parameter takes
    part in each backward as megatron-core's overlapped gradient reduce (overlap_grad_reduce)
    requires: it counts one gradient per parameter before a bucket is reduced."""

    @staticmethod
    def forward(ctx, x, *params):
        ctx.param_shapes = [(p.shape, p.dtype, p.device) for p in params]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        zeros = [torch.zeros(s, dtype=d, device=dev) for s, d, dev in ctx.param_shapes]
        return (grad, *zeros)


def _raw_output(layer, x, **layer_kwargs):
    out = layer(hidden_states=x, **layer_kwargs)
    return out[0] if isinstance(out, tuple) else out
