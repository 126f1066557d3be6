"""Pipeline stages that exchange only depth-block summaries (DESIGN section 5).

Stages are cut at depth-block boundaries, so the partial summary is empty at every cut and the
payload from stage p to p + 1 is exactly the completed summaries [b_0 .. b_m], packed along the
sequence dimension into one [(m + 1) * s, b, h] tensor: Megatron-Core's schedules move one tensor
per micro-batch (with `variable_seq_lengths=True` the packed length may differ per boundary).
The backward pass sends the gradient of that tensor, i.e. of every summary, back exactly once.
"""

import contextlib
from collections import defaultdict

import torch

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


def payload_bytes(schedule: DepthBlockSchedule, cut: int, tokens: int, hidden: int,
                  act_bytes: int) -> int:  # fmt: skip
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


class P2PTrafficCounter(contextlib.AbstractContextManager):
    """Counts the bytes Megatron's pipeline p2p calls send and receive (activation and
    gradient tensors only: the shape messages of variable_seq_lengths go another way).

    `sent[("next", n)]` lists the bytes of every tensor sent forward (activations) and
    `sent[("prev", n)]` backward (gradients); `received` likewise.
    """

    def __init__(self):
        self.sent = defaultdict(list)
        self.received = defaultdict(list)
        self._patched = {}

    def _wrap(self, fn):
        def counted(*, tensor_send_prev, tensor_recv_prev, tensor_send_next, tensor_recv_next,
                    **kwargs):  # fmt: skip
            flows = (("next", tensor_send_next, tensor_recv_prev),
                     ("prev", tensor_send_prev, tensor_recv_next))  # fmt: skip
            for direction, send, recv in flows:
                if send is not None:
                    self.sent[direction].append(send.numel() * send.element_size())
                if recv is not None:
                    self.received[direction].append(recv.numel() * recv.element_size())
            return fn(tensor_send_prev=tensor_send_prev, tensor_recv_prev=tensor_recv_prev,
                      tensor_send_next=tensor_send_next, tensor_recv_next=tensor_recv_next,
                      **kwargs)  # fmt: skip

        return counted

    def __enter__(self):
        from megatron.core.pipeline_parallel import p2p_communication as p2p

        for name in ("_p2p_ops", "_batched_p2p_ops"):
            self._patched[name] = getattr(p2p, name)
            setattr(p2p, name, self._wrap(self._patched[name]))
        return self

    def __exit__(self, *exc):
        from megatron.core.pipeline_parallel import p2p_communication as p2p

        for name, fn in self._patched.items():
            setattr(p2p, name, fn)
        self._patched.clear()
        return False
