"""When a run stops before `train_iters`: a signal, `exit_interval`, `exit_duration_in_mins`.
Each decision is agreed by every rank (an all-reduce) so that all of them save and stop at the
same step."""

import signal
import time

import torch
import torch.distributed as dist


class StopRequest:
    """SIGTERM / SIGUSR1 (Slurm's --signal, preemption) ask for a save at the end of the
    current step; every rank agrees before acting (an all-reduce of the flag)."""

    def __init__(self, enabled: bool):
        self.flag = False
        if enabled:
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.flag = True

    def agreed(self) -> bool:
        flag = torch.tensor([1.0 if self.flag else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def should_stop(run, step: int, stop: StopRequest, started: float) -> str | None:
    """Why the run stops after STEP ("done" at train_iters), or None to go on."""
    if stop.agreed():
        return "signal received"
    if run.exit_interval and step % run.exit_interval == 0 and step < run.train_iters:
        return f"exit_interval={run.exit_interval}"
    if run.exit_duration_in_mins is not None:
        over = torch.tensor([float(time.monotonic() - started > 60 * run.exit_duration_in_mins)])
        dist.all_reduce(over, op=dist.ReduceOp.MAX)
        if over.item():
            return f"exit_duration_in_mins={run.exit_duration_in_mins}"
    return "done" if step >= run.train_iters else None
