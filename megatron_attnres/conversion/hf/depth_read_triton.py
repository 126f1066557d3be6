"""Fused Triton kernels for the two-phase depth read at inference (docs/architecture.md
section 6).

Self-contained (torch and, guarded, triton): exported checkpoint folders ship this file next to
modeling_attnres.py, which uses it when the tensors are on CUDA and triton imports (or, for
tests, CPU tensors with TRITON_INTERPRET=1), and its own torch functions otherwise.
ATTNRES_DEPTH_READ=torch forces the torch functions. Legend: N completed summaries, R reads of one
depth block (its S sublayers, plus the output read in the last block), T tokens, H hidden. All
arithmetic is fp32.

Phase 1, one launch per depth block, BLOCK_T tokens per program:
    pass 1, per source n: s[n, t, r] = rsqrt(mean(v_n^2) + eps) * (v_n . q_r) (H in chunks), a
            running max m[t, r] and denominator l[t, r] = sum_n exp(s - m); s goes to a small
            fp32 scratch [N, T, BLOCK_R].
    pass 2, per H chunk: acc[t, r, :] = sum_n exp(s[n, t, r] - m[t, r]) v_n[t, :].
    Pass 2 re-reads the program's own rows (N * BLOCK_T * H * b bytes, meant to hit L2), so the
    HBM traffic is N T H b (sources) + R T H 4 (acc) + 2 R T 4 (m, l) + the scratch (2 N R T 4).
Phase 2, one launch per sublayer: merges the partial summary p with read r's statistics by an
online-softmax update (exact): s_p = rsqrt(mean(p^2) + eps) (p . q_r), m' = max(m, s_p),
out = (acc e^{m - m'} + e^{s_p - m'} p) / (l e^{m - m'} + e^{s_p - m'}); traffic
T H (4 + 2 b) (acc read, p read, out written). Without a partial summary, out = acc / l.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional for the exported modeling code
    triton = tl = None

_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


def triton_depth_read_available(tensor: torch.Tensor) -> bool:
    """CUDA tensor with triton importable, or a CPU tensor under TRITON_INTERPRET=1; never when
    ATTNRES_DEPTH_READ=torch."""
    if triton is None or os.environ.get("ATTNRES_DEPTH_READ", "auto").lower() == "torch":
        return False
    if tensor.dtype not in _SUPPORTED:
        return False
    interpreting = bool(triton.knobs.runtime.interpret)
    return (tensor.is_cuda and not interpreting) or (tensor.device.type == "cpu" and interpreting)


def _phase1_kernel(
    src_ptrs,
    q_ptr,
    scores_ptr,
    max_ptr,
    denom_ptr,
    acc_ptr,
    num_sources,
    tokens,
    hidden,
    reads,
    eps,
    DTYPE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rids, hcols = tl.arange(0, BLOCK_R), tl.arange(0, BLOCK_H)
    row_ok, read_ok = rows < tokens, rids < reads
    stat_mask = row_ok[:, None] & read_ok[None, :]
    run_max = tl.full([BLOCK_T, BLOCK_R], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_T, BLOCK_R], dtype=tl.float32)
    for n in range(num_sources):  # pass 1: scores, max, denominator
        src = tl.load(src_ptrs + n).to(tl.pointer_type(DTYPE))
        sumsq = tl.zeros([BLOCK_T], dtype=tl.float32)
        dots = tl.zeros([BLOCK_T, BLOCK_R], dtype=tl.float32)
        for h0 in range(0, hidden, BLOCK_H):
            cols = h0 + hcols
            v_mask = row_ok[:, None] & (cols < hidden)[None, :]
            v = tl.load(
                src + rows.to(tl.int64)[:, None] * hidden + cols[None, :], mask=v_mask, other=0.0
            ).to(tl.float32)
            q = tl.load(
                q_ptr + rids[:, None] * hidden + cols[None, :],
                mask=read_ok[:, None] & (cols < hidden)[None, :],
                other=0.0,
            )
            sumsq += tl.sum(v * v, axis=1)
            dots += tl.sum(v[:, None, :] * q[None, :, :], axis=2)
        score = tl.math.rsqrt(sumsq / hidden + eps)[:, None] * dots
        new_max = tl.maximum(run_max, score)
        denom = denom * tl.exp(run_max - new_max) + tl.exp(score - new_max)
        run_max = new_max
        tl.store(
            scores_ptr + (n * tokens + rows)[:, None] * BLOCK_R + rids[None, :],
            score,
            mask=row_ok[:, None],
        )
    stat_offs = rows[:, None] * reads + rids[None, :]
    tl.store(max_ptr + stat_offs, run_max, mask=stat_mask)
    tl.store(denom_ptr + stat_offs, denom, mask=stat_mask)
    tl.debug_barrier()  # the scratch scores written above are read back by other threads
    for h0 in range(0, hidden, BLOCK_H):  # pass 2: unnormalised weighted sums
        cols = h0 + hcols
        col_ok = cols < hidden
        acc = tl.zeros([BLOCK_T, BLOCK_R, BLOCK_H], dtype=tl.float32)
        for n in range(num_sources):
            src = tl.load(src_ptrs + n).to(tl.pointer_type(DTYPE))
            v_mask = row_ok[:, None] & col_ok[None, :]
            v = tl.load(
                src + rows.to(tl.int64)[:, None] * hidden + cols[None, :], mask=v_mask, other=0.0
            ).to(tl.float32)
            score = tl.load(
                scores_ptr + (n * tokens + rows)[:, None] * BLOCK_R + rids[None, :],
                mask=row_ok[:, None],
                other=0.0,
            )
            acc += tl.exp(score - run_max)[:, :, None] * v[:, None, :]
        acc_offs = stat_offs.to(tl.int64)[:, :, None] * hidden + cols[None, None, :]
        tl.store(acc_ptr + acc_offs, acc, mask=stat_mask[:, :, None] & col_ok[None, None, :])


def _phase2_kernel(
    max_ptr,
    denom_ptr,
    acc_ptr,
    stat_stride,
    acc_stride,
    partial_ptr,
    q_ptr,
    out_ptr,
    tokens,
    hidden,
    eps,
    HAS_PARTIAL: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    hcols = tl.arange(0, BLOCK_H)
    row_ok = rows < tokens
    run_max = tl.load(max_ptr + rows * stat_stride, mask=row_ok, other=0.0)
    denom = tl.load(denom_ptr + rows * stat_stride, mask=row_ok, other=1.0)
    rescale = tl.full([BLOCK_T], 1.0, tl.float32)
    weight = tl.zeros([BLOCK_T], dtype=tl.float32)
    if HAS_PARTIAL:
        sumsq = tl.zeros([BLOCK_T], dtype=tl.float32)
        dots = tl.zeros([BLOCK_T], dtype=tl.float32)
        for h0 in range(0, hidden, BLOCK_H):
            cols = h0 + hcols
            mask = row_ok[:, None] & (cols < hidden)[None, :]
            p = tl.load(
                partial_ptr + rows.to(tl.int64)[:, None] * hidden + cols[None, :],
                mask=mask,
                other=0.0,
            ).to(tl.float32)
            q = tl.load(q_ptr + cols, mask=cols < hidden, other=0.0)
            sumsq += tl.sum(p * p, axis=1)
            dots += tl.sum(p * q[None, :], axis=1)
        score = tl.math.rsqrt(sumsq / hidden + eps) * dots
        new_max = tl.maximum(run_max, score)
        rescale = tl.exp(run_max - new_max)
        weight = tl.exp(score - new_max)
        denom = denom * rescale + weight
    for h0 in range(0, hidden, BLOCK_H):
        cols = h0 + hcols
        mask = row_ok[:, None] & (cols < hidden)[None, :]
        acc = (
            tl.load(
                acc_ptr + rows.to(tl.int64)[:, None] * acc_stride + cols[None, :],
                mask=mask,
                other=0.0,
            )
            * rescale[:, None]
        )
        offs = rows.to(tl.int64)[:, None] * hidden + cols[None, :]
        if HAS_PARTIAL:
            p = tl.load(partial_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            acc += weight[:, None] * p
        tl.store(out_ptr + offs, (acc / denom[:, None]).to(out_ptr.dtype.element_ty), mask=mask)


_JITTED: dict[bool, tuple] = {}


def _kernels():
    """(phase1, phase2), jitted lazily per TRITON_INTERPRET setting (read at jit time)."""
    interpreting = bool(triton.knobs.runtime.interpret)
    if interpreting not in _JITTED:
        _JITTED[interpreting] = (triton.jit(_phase1_kernel), triton.jit(_phase2_kernel))
    return _JITTED[interpreting]


def _tl_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[
        dtype
    ]


def _pointer_table(tensors, device: torch.device) -> torch.Tensor:
    table = torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64)
    if device.type == "cuda":
        table = table.pin_memory().to(device, non_blocking=True)
    return table


def phase1_launch(tokens: int, reads: int, hidden: int) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_R, BLOCK_H, num_warps) of phase 1: a [BLOCK_T, BLOCK_R, BLOCK_H] tile of
    at most ~4K fp32 elements (H in chunks), which compiles without spills on sm_90 and sm_100
    up to hidden 8192 (`attnres-bench kernels`)."""
    block_t, block_r = min(4, triton.next_power_of_2(max(tokens, 1))), triton.next_power_of_2(reads)
    block_h = min(triton.next_power_of_2(hidden), max(16, 4096 // (block_t * block_r)))
    return block_t, block_r, block_h, 4


def phase2_launch(hidden: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_H, num_warps) of phase 2: a [BLOCK_T, BLOCK_H] tile of ~2K elements."""
    block_h = min(triton.next_power_of_2(hidden), 1024)
    return max(1, min(16, 2048 // block_h)), block_h, 4


def depth_read_phase1_triton(completed, queries_RH: torch.Tensor, eps: float):
    """Phase 1 for all R reads over the completed summaries at once: (max [T, R], denominator
    [T, R], unnormalised weighted sum [T, R, H]), fp32, as the torch `depth_read_phase1`."""
    hidden = completed[0].shape[-1]
    sources = [c.contiguous() for c in completed]
    tokens, reads, device = sources[0].numel() // hidden, queries_RH.shape[0], sources[0].device
    queries_RH = queries_RH.to(device=device, dtype=torch.float32).contiguous()
    block_t, block_r, block_h, num_warps = phase1_launch(tokens, reads, hidden)
    scratch = torch.empty(len(sources), tokens, block_r, dtype=torch.float32, device=device)
    max_TR = torch.empty(tokens, reads, dtype=torch.float32, device=device)
    denom_TR = torch.empty_like(max_TR)
    acc_TRH = torch.empty(tokens, reads, hidden, dtype=torch.float32, device=device)
    if tokens:
        phase1, _ = _kernels()
        phase1[(triton.cdiv(tokens, block_t),)](
            _pointer_table(sources, device),
            queries_RH,
            scratch,
            max_TR,
            denom_TR,
            acc_TRH,
            len(sources),
            tokens,
            hidden,
            reads,
            float(eps),
            DTYPE=_tl_dtype(sources[0].dtype),
            BLOCK_T=block_t,
            BLOCK_R=block_r,
            BLOCK_H=block_h,
            num_warps=num_warps,
        )
    return max_TR, denom_TR, acc_TRH


def depth_read_phase2_triton(max_T, denom_T, acc_TH, partial, query_H, eps: float, like):
    """Phase 2 for one read: merge `partial` (None at a block's first sublayer) into its phase-1
    statistics (max_T, denom_T: [T] views, acc_TH: [T, H] view with unit column stride)."""
    hidden = like.shape[-1]
    tokens = like.numel() // hidden
    if acc_TH.stride(-1) != 1:
        raise ValueError(f"acc_TH must have unit stride along H, got strides {acc_TH.stride()}")
    out = torch.empty(like.shape, dtype=like.dtype, device=acc_TH.device)
    partial = acc_TH if partial is None else partial.contiguous()  # unused pointer when None
    block_t, block_h, num_warps = phase2_launch(hidden)
    if tokens:
        _, phase2 = _kernels()
        phase2[(triton.cdiv(tokens, block_t),)](
            max_T,
            denom_T,
            acc_TH,
            max_T.stride(0),
            acc_TH.stride(0),
            partial,
            query_H.to(dtype=torch.float32).contiguous(),
            out,
            tokens,
            hidden,
            float(eps),
            HAS_PARTIAL=partial is not acc_TH,
            BLOCK_T=block_t,
            BLOCK_H=block_h,
            num_warps=num_warps,
        )
    return out
