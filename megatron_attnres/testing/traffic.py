"""What crosses pipeline stages, counted where it is sent: Megatron's p2p calls.

Test support (docs/architecture.md section 5: the bytes per boundary must be
measured at the p2p send/recv calls, shape messages apart)."""

import contextlib
from collections import defaultdict

from megatron_attnres.mcore import pipeline


class P2PTrafficCounter(contextlib.AbstractContextManager):
    """Counts the bytes Megatron's pipeline p2p calls send and receive (activation and
    gradient tensors), and apart from them the shape messages `SummaryP2PCommunicator` sends and
    receives when payload shapes are not static.

    `sent["next"]` lists the bytes of every tensor sent forward (activations) and
    `sent["prev"]` backward (gradients); `received` likewise; `shape_messages` counts shape
    sends plus shape receives.
    """

    def __init__(self):
        self.sent = defaultdict(list)
        self.received = defaultdict(list)
        self.shape_messages = 0
        self._patched = {}
        self._shape_ops = None

    def _wrap(self, fn):
        def counted(
            *, tensor_send_prev, tensor_recv_prev, tensor_send_next, tensor_recv_next, **kwargs
        ):
            flows = (
                ("next", tensor_send_next, tensor_recv_prev),
                ("prev", tensor_send_prev, tensor_recv_next),
            )
            for direction, send, recv in flows:
                if send is not None:
                    self.sent[direction].append(send.numel() * send.element_size())
                if recv is not None:
                    self.received[direction].append(recv.numel() * recv.element_size())
            return fn(
                tensor_send_prev=tensor_send_prev,
                tensor_recv_prev=tensor_recv_prev,
                tensor_send_next=tensor_send_next,
                tensor_recv_next=tensor_recv_next,
                **kwargs,
            )

        return counted

    def __enter__(self):
        from megatron.core.pipeline_parallel import p2p_communication as p2p

        for name in ("_p2p_ops", "_batched_p2p_ops"):
            self._patched[name] = getattr(p2p, name)
            setattr(p2p, name, self._wrap(self._patched[name]))
        self._shape_ops = shape_ops = pipeline._ordered_p2p_ops

        def counted_shapes(**kwargs):
            names = ("tensor_send_prev", "tensor_recv_prev", "tensor_send_next", "tensor_recv_next")
            self.shape_messages += sum(kwargs[name] is not None for name in names)
            return shape_ops(**kwargs)

        pipeline._ordered_p2p_ops = counted_shapes
        return self

    def __exit__(self, *exc):
        from megatron.core.pipeline_parallel import p2p_communication as p2p

        for name, fn in self._patched.items():
            setattr(p2p, name, fn)
        self._patched.clear()
        pipeline._ordered_p2p_ops = self._shape_ops
        return False
