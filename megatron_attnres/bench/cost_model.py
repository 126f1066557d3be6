"""Memory traffic and FLOPs of the residual path: standard residual vs Block vs Full AttnRes.

Pure arithmetic (no tensors). Units: elements of one token's hidden vector are `d`; bytes are
elements x dtype bytes. Everything counts the residual path only, as the paper's Table 1 does
(docs/architecture.md section 6): the sublayers' own matmuls and norms are outside it.

1. The paper's per-token, per-sublayer figures, amortised over a depth block (`paper_elements`):
       standard residual          3d                      (read x and y, write x + y)
       Block AttnRes, two-phase   (N/S + 5)d              5.5d for N = 8 blocks, S = 16
       Full AttnRes, two-phase    (S + N)d                24d
       mHC, m streams             (8m + 2)d + 2m^2 + 4m   34d (+ 48) for m = 4
   `paper_items` itemises them with this accounting (our reconstruction; it reproduces the
   totals): phase 1 reads the block's sources once and writes each read's merged result o_i
   (1d per sublayer); phase 2 reads o_i back and merges the block's own sources with an
   online-softmax update; the merged input goes straight into the sublayer's pre-norm in the same
   kernel (as a fused add + norm does for the standard residual), so it is not written.
       Block: N/S (phase-1 read) + 1 (write o_i) + 1 (read o_i) + 1 (read partial b)
              + 1 (read the previous output y) + 1 (write the updated partial b)    = N/S + 5
       Full:  the last (largest) block's phase 1 reads the embedding and (N - 1)S outputs:
              N - 1 + 1/S, + 1 (write o_i) + 1 (read o_i) + S - 1 (the block's earlier outputs)
              = S + N + 1/S; the paper's (S + N) rounds the embedding's 1/S away.

2. Our PyTorch two-phase implementation, exactly (`two_phase_traffic`): the exported HF model's
   `depth_read_phase1` / `depth_read_phase2` (conversion/hf/modeling_attnres.py), each call counted
   as one kernel: bytes of data it must read from outside (its sources, the phase-1 statistics,
   the pseudo-queries) and bytes of what it returns. Temporaries inside a call are not counted
   (a fused kernel keeps them on chip; `bench/traffic.py` measures them separately). Per depth
   block with n completed summaries and R reads (the block's sublayers, plus the output read in
   the last block), T tokens, activation bytes a, compute bytes c (fp32 = 4):
       phase 1: read n T d a + R d c (queries); write R T (d + 2) c (o_i unnormalised, max, denom)
       phase 2, a read with a partial summary: read T (d + 2) c (o_i, max, denom) + T d a
                (partial) + d c (query); write T d a
       phase 2, the first read of a block (no partial): read T (d + 1) c (o_i, denom); write T d a
       the model's very first sublayer reads the embedding alone: no phase-2 call.
   The partial-summary update (partial + y, every sublayer but a block's first) is a separate
   add: read 2 T d a, write T d a (`partial_update_bytes`).

3. Training (`training_traffic`), an ideal fused one-shot read per sublayer (the memory-lean
   read of attnres/depth_read.py: three fp32 scalars per source and token saved for backward):
       read with n sources, forward: read n d a, write d a + 3 n c (saved scalars)
                            backward: read n d a + d a (gradient) + 3 n c, write n d a
       partial-summary update (and the standard residual's add): forward read 2d write d;
       backward: the gradients of the two branches are summed, read 2d write d.
   FLOPs per read and token: forward 6 n d (squares for the rms, the dot with q, the weighted
   sum: 2 n d each), backward 12 n d (u_j = G.v_j, dv_j's three terms, dq, the rms again).
   A one-source read (the first sublayer) is the identity and costs nothing.
"""

from dataclasses import dataclass

from megatron_attnres.attnres.schedule import DepthBlockSchedule

# Peak HBM bandwidth (bytes/s) of the devices the benchmarks name (vendor figures).
PEAK_BANDWIDTH = {"H100 SXM": 3.35e12, "H200": 4.8e12}


# ----------------------------------------------------------------------------- the paper's figures
def paper_items(mode: str, num_blocks: int = 8, block_size: int = 16) -> dict[str, float]:
    """Per-token, per-sublayer residual-path traffic in units of d, item by item (docstring 1).
    `num_blocks` is N, `block_size` is S (sublayers per depth block)."""
    N, S = num_blocks, block_size
    if mode == "none":
        return {"read x": 1, "read y": 1, "write x + y": 1}
    if mode == "block":
        return {
            "phase 1: read N summaries (amortised)": N / S,
            "phase 1: write o_i": 1,
            "phase 2: read o_i": 1,
            "phase 2: read partial b": 1,
            "phase 2: read previous output y": 1,
            "phase 2: write partial b": 1,
        }
    if mode == "full":
        return {
            "phase 1: read embedding + (N-1)S outputs (amortised)": N - 1 + 1 / S,
            "phase 1: write o_i": 1,
            "phase 2: read o_i": 1,
            "phase 2: read the block's earlier outputs": S - 1,
        }
    raise ValueError(f"mode {mode!r} has no itemised traffic; use none, block or full")


def paper_elements(
    mode: str, hidden: int, num_blocks: int = 8, block_size: int = 16, streams: int = 4
) -> float:
    """The paper's closed forms (docs/architecture.md section 6), elements per token per
    sublayer."""
    N, S, m, d = num_blocks, block_size, streams, hidden
    forms = {
        "none": 3 * d,
        "block": (N / S + 5) * d,
        "full": (S + N) * d,
        "mhc": (8 * m + 2) * d + 2 * m * m + 4 * m,
    }
    if mode not in forms:
        raise ValueError(f"unknown mode {mode!r}; use one of {sorted(forms)}")
    return forms[mode]


# ----------------------------------------------------------------------------- our two-phase code
@dataclass(frozen=True)
class Traffic:
    """Bytes read and written (and FLOPs where counted) by one part of the residual path."""

    read: int = 0
    write: int = 0
    flops: int = 0

    def __add__(self, other: "Traffic") -> "Traffic":
        return Traffic(self.read + other.read, self.write + other.write, self.flops + other.flops)

    def times(self, k: int) -> "Traffic":
        return Traffic(self.read * k, self.write * k, self.flops * k)

    @property
    def total(self) -> int:
        return self.read + self.write


def _blocks(schedule: DepthBlockSchedule) -> list[tuple[int, int, bool]]:
    """(completed summaries n, sublayers in the block, is last block) per depth block."""
    S, L = schedule.sublayers_per_block, schedule.num_sublayers
    return [
        (m + 1, min(S, L - m * S), m == schedule.num_blocks - 1) for m in range(schedule.num_blocks)
    ]


def two_phase_traffic(
    schedule: DepthBlockSchedule, tokens: int, hidden: int, act_bytes: int, compute_bytes: int = 4
) -> dict[str, Traffic]:
    """Bytes of every phase-1 and phase-2 call of one forward of the HF model (docstring 2), and
    of its partial-summary adds. Keys: phase1, phase2, partial_update."""
    if not schedule.uses_depth_reads:
        raise ValueError("the standard residual has no depth reads; use mode block or full")
    T, d, a, c = tokens, hidden, act_bytes, compute_bytes
    phase1 = phase2 = update = Traffic()
    for n, sublayers, last in _blocks(schedule):
        reads = sublayers + int(last)
        phase1 += Traffic(read=n * T * d * a + reads * d * c, write=reads * T * (d + 2) * c)
        for i in range(reads):
            if n == 1 and i == 0:
                continue  # the first sublayer reads the embedding alone
            if i == 0:
                phase2 += Traffic(read=T * (d + 1) * c, write=T * d * a)
            else:
                phase2 += Traffic(read=T * (d + 2) * c + T * d * a + d * c, write=T * d * a)
        update += partial_update_bytes(T, d, a).times(sublayers - 1)
    return {"phase1": phase1, "phase2": phase2, "partial_update": update}


def partial_update_bytes(tokens: int, hidden: int, act_bytes: int) -> Traffic:
    """One add of two [T, d] tensors: read both, write the sum."""
    return Traffic(read=2 * tokens * hidden * act_bytes, write=tokens * hidden * act_bytes)


# ----------------------------------------------------------------------------- training
def read_training_traffic(
    n: int, tokens: int, hidden: int, act_bytes: int, compute_bytes: int = 4
) -> dict[str, Traffic]:
    """One depth read over n sources (docstring 3): forward and backward."""
    if n < 2:
        return {"forward": Traffic(), "backward": Traffic()}
    T, d, a, c = tokens, hidden, act_bytes, compute_bytes
    scalars = 3 * n * T * c
    forward = Traffic(read=n * T * d * a, write=T * d * a + scalars, flops=6 * n * d * T)
    backward = Traffic(
        read=n * T * d * a + T * d * a + scalars, write=n * T * d * a, flops=12 * n * d * T
    )
    return {"forward": forward, "backward": backward}


def training_traffic(
    schedule: DepthBlockSchedule, tokens: int, hidden: int, act_bytes: int
) -> dict[str, Traffic]:
    """Residual-path traffic of one training forward + backward over `tokens` tokens: the
    depth reads, and the adds (the standard residual's, or AttnRes's partial-summary updates)."""
    add = partial_update_bytes(tokens, hidden, act_bytes)
    if not schedule.uses_depth_reads:
        return {"reads": Traffic(), "adds": add.times(2 * schedule.num_sublayers)}  # fwd + bwd
    reads = Traffic()
    for n in schedule.read_source_counts():
        parts = read_training_traffic(n, tokens, hidden, act_bytes)
        reads += parts["forward"] + parts["backward"]
    S, L = schedule.sublayers_per_block, schedule.num_sublayers
    updates = sum(1 for j in range(1, L + 1) if (j - 1) % S)  # every sublayer but a block's first
    return {"reads": reads, "adds": add.times(2 * updates)}


def seconds_at(nbytes: float, bandwidth: float) -> float:
    """Time to move `nbytes` at `bandwidth` bytes/s (a lower bound: bandwidth-bound kernels)."""
    return nbytes / bandwidth
