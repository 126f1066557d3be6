"""Pipeline stages that exchange only depth-block summaries (docs/architecture.md section 5).

Stages are cut at depth-block boundaries, so the partial summary is empty at every cut and the
payload from stage p to p + 1 is exactly the completed summaries [b_0 .. b_m], packed along the
sequence dimension into one [(m + 1) * s, b, h] tensor: Megatron-Core's schedules move one tensor
per micro-batch (with `variable_seq_lengths=True` the packed length may differ per boundary).
The backward pass sends the gradient of that tensor, i.e. of every summary, back exactly once.
"""

import torch
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
from megatron.core.pipeline_parallel.p2p_communication import _p2p_ops as _ordered_p2p_ops

from megatron_attnres.attnres.schedule import DepthBlockSchedule


def pack_summaries(summaries: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(summaries, dim=0)


def unpack_summaries(packed: torch.Tensor, count: int) -> list[torch.Tensor]:
    if packed.shape[0] % count:
        raise ValueError(
            f"a stage payload of {packed.shape[0]} rows cannot hold {count} equal summaries; "
            "the sending stage's cut does not match this stage's first layer"
        )
    return list(torch.chunk(packed, count, dim=0))


def payload_bytes(
    schedule: DepthBlockSchedule, cut: int, tokens: int, hidden: int, act_bytes: int
) -> int:
    """Bytes crossing the cut after sublayer `cut` per micro-batch (each direction):
    (number of completed summaries, b_0 included) x tokens x hidden x bytes."""
    return schedule.summaries_entering(cut + 1) * tokens * hidden * act_bytes


def balanced_cuts(schedule: DepthBlockSchedule, num_segments: int) -> list[int]:
    """Sublayer counts before each '|' for `num_segments` stages of whole depth blocks."""
    stages = schedule.split_stages(num_segments)
    return [stage[-1] for stage in stages[:-1]]


def insert_cuts(pattern: str, cuts: list[int]) -> str:
    """Put '|' after the given numbers of sublayer symbols of a cut-free pattern."""
    if "|" in pattern:
        raise ValueError(f"pattern {pattern!r} already has pipeline cuts")
    pieces, start = [], 0
    for cut in [*cuts, len(pattern)]:
        pieces.append(pattern[start:cut])
        start = cut
    return "|".join(pieces)


def check_cuts(pattern: str, schedule: DepthBlockSchedule, num_segments: int) -> None:
    """Refuse a pattern whose '|' cuts are not depth-block boundaries or are too few/many."""
    segments = pattern.split("|")
    if len(segments) != num_segments:
        example = insert_cuts(pattern.replace("|", ""), balanced_cuts(schedule, num_segments))
        raise ValueError(
            f"hybrid pattern {pattern!r} has {len(segments)} pipeline segments but pipeline "
            f"size x virtual stages = {num_segments}; put {num_segments - 1} '|' cuts at "
            f"depth-block boundaries, e.g. {example!r}"
        )
    valid = schedule.valid_pipeline_cuts()
    done = 0
    for segment in segments[:-1]:
        done += len(segment)
        if done not in valid:
            nearest = sorted(valid, key=lambda c: abs(c - done))[:2]
            raise ValueError(
                f"hybrid pattern {pattern!r}: a pipeline cut after sublayer {done} (transformer "
                f"layer {(done + 1) // 2}) falls inside a depth block of "
                f"{schedule.sublayers_per_block} sublayers; cut after sublayer "
                f"{' or '.join(map(str, sorted(nearest)))} instead"
            )


def batched_p2p_problem(batch_p2p_comm: bool, interleaved: bool, backend: str) -> str | None:
    """Why batched p2p cannot be used, or None. Measured on megatron-core 0.19.2 over gloo
    (docs/architecture.md section 4): batched p2p with an interleaved pipeline gives wrong losses
    and gradients without any error; NCCL is not affected. The one definition of this rule (the
    engine and the run-config host check both ask here)."""
    if batch_p2p_comm and interleaved and backend == "gloo":
        return (
            "batch_p2p_comm=true with an interleaved pipeline (virtual_pipeline_model_parallel_"
            "size > 1) over gloo gives wrong gradients silently; set batch_p2p_comm: false "
            "(NCCL is not affected)"
        )
    return None


def chunk_first_layers(pattern: str) -> list[int]:
    """1-based first sublayer of every '|'-separated segment (pipeline chunk) of `pattern`."""
    firsts, done = [], 0
    for segment in pattern.split("|"):
        firsts.append(done + 1)
        done += len(segment)
    return firsts


class SummaryCache:
    """Cross-stage summary cache of one rank's interleaved (virtual) pipeline chunks
    (docs/architecture.md section 5).

    Global chunk c = v * P + pp_rank runs on rank c mod P. With `entering[c]` summaries (b_0
    included) entering chunk c, the rank of chunk c already holds, for the same micro-batch,

        known(c) = entering[c - P + 1]   (c >= P; 0 in the first round)

    summaries: everything it received at its previous chunk c - P plus what that chunk produced.
    So the transition into chunk c carries only summaries known(c) .. entering[c] - 1, i.e. the
    ones produced by the P - 1 chunks on other ranks since this rank's last visit (plus b_0 in the
    first round). Per micro-batch and token that is exactly

        sum over c = 1 .. C-1 of (entering[c] - known(c)) summaries of d values
        = (P - 1) b_0 + P(P - 1)/2 Np + (V - 1) P(P - 1) Np   for Np summaries per chunk,

    which (b_0 included, V >= 2) is at most the paper's P(P - 1)/2 Np + (V - 1) P^2 Np, since the
    receiver's own summaries are never sent back to it, and below the full history
    sum_c entering[c] (`cached_transfer_counts`).

    Every cached summary is a detached leaf sharing the storage of the summary it stands for, so
    no backward pass ever runs through another chunk's graph. Gradients reach each producer
    exactly once: when chunk c's backward starts, the gradients that this rank's later chunks put
    on the summaries c produced are added to c's output gradient, and when it ends, those on the
    summaries c received are added to the gradient Megatron sends back (`_AddCachedGradients`).
    Each part is released from the cache at that moment: every later chunk of the micro-batch has
    finished its backward by then (`events` records it).
    """

    PARTS = ("received", "produced")

    def __init__(self, entering: list[int], pipeline_size: int, pipeline_rank: int):
        self.entering, self.P, self.rank = list(entering), pipeline_size, pipeline_rank
        self.V = len(entering) // pipeline_size
        self.forward_only = False
        self._leaves = {}  # (micro-batch, virtual stage, part) -> detached summaries
        self._forwards = [0] * self.V
        self.live_bytes = self.peak_bytes = 0
        self.events = []  # ("store" | "release", micro-batch, virtual stage, part, live bytes)

    def known(self, chunk: int) -> int:
        return self.entering[chunk - self.P + 1] if chunk >= self.P else 0

    def begin_step(self, forward_only: bool = False) -> None:
        if self._leaves:
            raise RuntimeError(
                f"the summary cache still holds {sorted(self._leaves)} (micro-batch, virtual "
                "stage, part) entries from the previous step: a backward pass did not run"
            )
        self.forward_only, self._forwards = forward_only, [0] * self.V
        self.events.clear()

    def next_microbatch(self, vstage: int) -> int:
        """Micro-batch id of this chunk's next forward (each chunk runs them in order)."""
        microbatch = self._forwards[vstage]
        self._forwards[vstage] += 1
        return microbatch

    def cached(self, microbatch: int, chunk: int) -> list[torch.Tensor]:
        """The summaries 0 .. known(chunk) - 1 this rank holds for `microbatch`, in order."""
        vstage = chunk // self.P
        held = [
            leaf
            for v in range(vstage)
            for part in self.PARTS
            for leaf in self._leaves.get((microbatch, v, part), ())
        ]
        if len(held) != self.known(chunk):
            raise RuntimeError(
                f"summary cache holds {len(held)} summaries for chunk {chunk}, "
                f"expected {self.known(chunk)}"
            )
        if self.forward_only and vstage == self.V - 1:  # no backward will release them
            for key in [key for key in self._leaves if key[0] == microbatch]:
                self._release(*key)
        return held

    def store(self, microbatch: int, chunk: int, received: list, produced: list) -> None:
        """Keep what chunk `chunk` received and produced for this rank's later chunks (the last
        chunk on a rank keeps nothing)."""
        vstage = chunk // self.P
        if vstage == self.V - 1:
            return
        for part, summaries in zip(self.PARTS, (received, produced), strict=True):
            if summaries:
                leaves = [s.detach().requires_grad_(not self.forward_only) for s in summaries]
                self._leaves[(microbatch, vstage, part)] = leaves
                self.live_bytes += sum(_nbytes(leaf) for leaf in leaves)
                self.peak_bytes = max(self.peak_bytes, self.live_bytes)
                self.events.append(("store", microbatch, vstage, part, self.live_bytes))

    def _release(self, microbatch: int, vstage: int, part: str) -> list[torch.Tensor]:
        leaves = self._leaves.pop((microbatch, vstage, part), [])
        if leaves:
            self.live_bytes -= sum(_nbytes(leaf) for leaf in leaves)
            self.events.append(("release", microbatch, vstage, part, self.live_bytes))
        return leaves

    def add_cached_gradients(
        self, packed: torch.Tensor, microbatch: int, chunk: int, part: str
    ) -> torch.Tensor:
        """Identity in forward. In backward, adds the gradients of the cached copies of `part`
        (the summaries at the end of `packed`: chunk `chunk`'s received payload or the produced
        tail of its outgoing payload) and releases them."""
        if chunk // self.P == self.V - 1 or self.forward_only:
            return packed
        return _AddCachedGradients.apply(packed, self, (microbatch, chunk // self.P, part))


class _AddCachedGradients(torch.autograd.Function):
    @staticmethod
    def forward(ctx, packed, cache, key):
        ctx.cache, ctx.key = cache, key
        return packed.view_as(packed)

    @staticmethod
    def backward(ctx, grad):
        leaves = ctx.cache._release(*ctx.key)
        if any(leaf.grad is not None for leaf in leaves):
            grad = grad.clone()
            start = grad.shape[0] - sum(leaf.shape[0] for leaf in leaves)
            for leaf in leaves:
                if leaf.grad is not None:
                    grad[start : start + leaf.shape[0]] += leaf.grad
                start += leaf.shape[0]
        return grad, None, None


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def cached_transfer_counts(entering: list[int], pipeline_size: int) -> list[int]:
    """Summaries sent into each chunk c = 1 .. C-1 per micro-batch with the cache."""
    cache = SummaryCache(entering, pipeline_size, 0)
    return [entering[c] - cache.known(c) for c in range(1, len(entering))]


class SummaryP2PCommunicator(P2PCommunicator):
    """Megatron's P2PCommunicator for AttnRes stage payloads, whose length is a multiple of the
    schedule's (seq, micro-batch, hidden) shape that differs per boundary.

    With `payload_shapes=(from_prev, from_next)` (one model chunk per rank, the 1F1B schedule)
    the shapes are static: `from_prev` is the shape of every payload from the previous stage and
    `from_next` that of every gradient from the next stage (the shape of what this stage sends
    on), so no shape message is exchanged at all (`stage_payload_shapes`). Megatron's exchange
    costs one more p2p round trip per transfer, and on GPU a host synchronisation (`.tolist()`)
    that stalls the stream. Every rank must choose the same way: all know their shapes or none.

    Without them (interleaved chunks, whose payloads shrink with the summary cache) the shapes
    are exchanged, but through the same even/odd ordered p2p calls that Megatron uses for the
    tensors themselves (`_p2p_ops`): megatron-core 0.19.2 exchanges them with one
    batch_isend_irecv of [send_prev, recv_prev, send_next, recv_next], and with prev == next
    (PP = 2) over gloo the two sends pair up with the other rank's receives in posting order, so a
    gradient shape lands where an activation shape is expected and the transfer aborts (measured:
    "12288 vs 8192 bytes").
    """

    def __init__(self, pp_group, config, payload_shapes=None):
        super().__init__(pp_group, config)
        self.payload_shapes = payload_shapes

    def _communicate_shapes(self, tensor_send_next, tensor_send_prev, recv_prev, recv_next):
        if self.payload_shapes is not None:
            from_prev, from_next = self.payload_shapes
            return (
                list(from_prev) if recv_prev else [0, 0, 0],
                list(from_next) if recv_next else [0, 0, 0],
            )
        device = torch.cuda.current_device()

        def shape_of(t):
            return None if t is None else torch.tensor(t.size(), device=device, dtype=torch.int64)

        def empty_shape(wanted):
            return torch.empty(3, device=device, dtype=torch.int64) if wanted else None

        shapes = dict(
            tensor_send_next=shape_of(tensor_send_next),
            tensor_send_prev=shape_of(tensor_send_prev),
            tensor_recv_prev=empty_shape(recv_prev),
            tensor_recv_next=empty_shape(recv_next),
        )
        requests = _ordered_p2p_ops(
            **shapes,
            group=self.pp_group,
            prev_pipeline_rank=self.prev_rank,
            next_pipeline_rank=self.next_rank,
        )
        for request in requests.values():
            request.wait()
        received = (shapes["tensor_recv_prev"], shapes["tensor_recv_next"])
        return tuple([0, 0, 0] if t is None else t.tolist() for t in received)
