"""Fused Triton depth read (forward + backward), a drop-in for `attnres.depth_read.depth_read`.

The math and the memory-lean backward are `LeanDepthRead`'s (docs/architecture.md section 3).
Legend: N sources, T tokens (leading dims flattened), H hidden. Per token, in fp32 whatever the
I/O dtype (fp32, bf16, fp16):

    q = w * g,  r_j = rsqrt(mean(v_j^2) + eps),  t_j = v_j . q,  s_j = r_j t_j
    forward : one pass over the sources with an online softmax (running max m, denominator l,
              accumulator sum_j exp(s_j - m) v_j in registers); out = acc / l.
              Saves per token r_j, t_j (fp32 [N, T]) and lse = m + log l (fp32 [T]); with the
              sources themselves (references, no copies) that is all backward needs.
    backward: alpha_j = exp(s_j - lse); pass 1: ubar = sum_k alpha_k (G . v_k); pass 2 per j:
              ds_j = alpha_j (G . v_j - ubar),
              dv_j = alpha_j G + ds_j r_j q - ds_j t_j r_j^3 v_j / H,
              dq += ds_j r_j v_j (a [H] partial per program, summed over programs in torch);
              dw = dq * g, dg = dq * w.

Layout: each program owns BLOCK_T whole token rows (BLOCK_H = next power of two >= H, masked),
so every reduction over H stays in registers. The N sources are passed as a device table of
int64 data pointers (one pinned host->device copy of N * 8 bytes per call, no stacking copy); the
kernel casts each entry to a typed pointer. dv is written the same way through a table of output
pointers (0 = that source needs no gradient). Sources must be contiguous (a non-contiguous source
is copied once). H is limited to MAX_HIDDEN (register budget); larger falls back to PyTorch.

Bytes moved per call (b = bytes per element of the I/O dtype, ideal HBM traffic):
    forward : N T H b (read each source once) + T H b (write out) + (2N + 1) T 4 (scalars)
    backward: T H b (G) + N T H b (sources) + N T H b (dv) + (2N + 1) T 4 + programs H 4;
              pass 2 re-reads the sources of a program's own rows (working set N BLOCK_T H b,
              e.g. 10 * 1 * 2304 * 2 = 46 KB), which is meant to be served from L2, not HBM.
E.g. N = 8, H = 2304, bf16: forward ~41.5 KB/token, backward ~78 KB/token. The PyTorch
`LeanDepthRead` makes several passes per source and materialises fp32 temporaries of every source.

Dispatch: `fused_depth_read_available(tensor)` is True for a CUDA tensor when triton imports, or
for a CPU tensor when Triton's interpreter is on (TRITON_INTERPRET=1, tests). The environment
variable ATTNRES_DEPTH_READ chooses the backend: `auto` (default: fused where available, else the
PyTorch op), `torch` (always the PyTorch `LeanDepthRead`), `triton` (fused; an error where it
cannot run). Kernels are jitted lazily per interpreter setting, so the import order of this module
and TRITON_INTERPRET does not matter. `depth_read_auto` is that dispatch; the model's depth reads
use it (`DepthAttention(..., read_fn=depth_read_auto)` in mcore/stack.py).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_attnres.attnres.depth_read import _check_sources, depth_read
from megatron_attnres.kernels.depth_read_cpu import (
    cpu_depth_read,
    cpu_kernel_available,
    unavailable_reason,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a dependency of megatron-core
    triton = tl = None

ENV_SWITCH = "ATTNRES_DEPTH_READ"
BACKENDS = ("auto", "torch", "triton", "cpu")
MAX_HIDDEN = 16384
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def depth_read_backend() -> str:
    """The backend chosen by ATTNRES_DEPTH_READ (auto when unset)."""
    backend = os.environ.get(ENV_SWITCH, "auto").strip().lower() or "auto"
    if backend not in BACKENDS:
        raise ValueError(
            f"{ENV_SWITCH}={backend!r} is not a depth-read backend; use one of {BACKENDS}"
        )
    return backend


def _interpreting() -> bool:
    return triton is not None and bool(triton.knobs.runtime.interpret)


def _unsupported_reason(tensor: torch.Tensor) -> str | None:
    """Why the fused kernel cannot run on `tensor`, or None when it can."""
    if triton is None:
        return "triton is not importable"
    if tensor.dtype not in SUPPORTED_DTYPES:
        return f"dtype {tensor.dtype} is not one of {SUPPORTED_DTYPES}"
    if tensor.dim() == 0 or not 1 <= tensor.shape[-1] <= MAX_HIDDEN:
        return f"hidden size {tuple(tensor.shape)[-1:]} is outside 1..{MAX_HIDDEN}"
    interpreting = _interpreting()
    if tensor.is_cuda and not interpreting:
        return None
    if tensor.device.type == "cpu" and interpreting:
        return None
    return (
        f"tensor is on {tensor.device} with TRITON_INTERPRET={int(interpreting)}; the kernel needs "
        f"a CUDA tensor, or a CPU tensor with TRITON_INTERPRET=1"
    )


def fused_depth_read_available(tensor: torch.Tensor) -> bool:
    """Whether the model should use the fused kernel for sources like `tensor` (see module doc)."""
    backend = depth_read_backend()
    if backend == "torch":
        return False
    reason = _unsupported_reason(tensor)
    if reason is not None and backend == "triton":
        raise RuntimeError(
            f"{ENV_SWITCH}=triton but the fused depth read cannot run: {reason}; set "
            f"{ENV_SWITCH}=auto to fall back to PyTorch, or {ENV_SWITCH}=torch"
        )
    return reason is None


# ----------------------------------------------------------------------------- kernels
# Plain functions, jitted lazily by `_kernels()` (TRITON_INTERPRET is read at jit time).
def _forward_kernel(
    src_ptrs,
    q_ptr,
    out_ptr,
    inv_rms_ptr,
    dots_ptr,
    lse_ptr,
    num_sources,
    tokens,
    hidden,
    eps,
    DTYPE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_H)
    row_ok = rows < tokens
    mask = row_ok[:, None] & (cols < hidden)[None, :]
    offs = rows.to(tl.int64)[:, None] * hidden + cols[None, :]
    q = tl.load(q_ptr + cols, mask=cols < hidden, other=0.0)
    run_max = tl.full([BLOCK_T], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
    for j in range(num_sources):
        src = tl.load(src_ptrs + j).to(tl.pointer_type(DTYPE))
        v = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
        inv_rms = tl.math.rsqrt(tl.sum(v * v, axis=1) / hidden + eps)
        dots = tl.sum(v * q[None, :], axis=1)
        score = inv_rms * dots
        new_max = tl.maximum(run_max, score)
        rescale = tl.exp(run_max - new_max)  # 0 for the first source
        weight = tl.exp(score - new_max)
        acc = acc * rescale[:, None] + weight[:, None] * v
        denom = denom * rescale + weight
        run_max = new_max
        tl.store(inv_rms_ptr + j * tokens + rows, inv_rms, mask=row_ok)
        tl.store(dots_ptr + j * tokens + rows, dots, mask=row_ok)
    tl.store(out_ptr + offs, (acc / denom[:, None]).to(DTYPE), mask=mask)
    tl.store(lse_ptr + rows, run_max + tl.log(denom), mask=row_ok)


def _backward_kernel(
    src_ptrs,
    grad_src_ptrs,
    grad_out_ptr,
    q_ptr,
    inv_rms_ptr,
    dots_ptr,
    lse_ptr,
    dq_partial_ptr,
    num_sources,
    tokens,
    hidden,
    DTYPE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    q = tl.load(q_ptr + cols, mask=cols < hidden, other=0.0)
    dq = tl.zeros([BLOCK_H], dtype=tl.float32)
    # Strided over token blocks, so the dq partials are [programs, H], not [blocks, H].
    for block in range(pid, tl.cdiv(tokens, BLOCK_T), tl.num_programs(0)):
        rows = block * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < tokens
        mask = row_ok[:, None] & (cols < hidden)[None, :]
        offs = rows.to(tl.int64)[:, None] * hidden + cols[None, :]
        grad = tl.load(grad_out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        mean_u = tl.zeros([BLOCK_T], dtype=tl.float32)  # sum_k alpha_k (G . v_k)
        for j in range(num_sources):
            src = tl.load(src_ptrs + j).to(tl.pointer_type(DTYPE))
            v = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
            inv_rms = tl.load(inv_rms_ptr + j * tokens + rows, mask=row_ok, other=0.0)
            dots = tl.load(dots_ptr + j * tokens + rows, mask=row_ok, other=0.0)
            mean_u += tl.exp(inv_rms * dots - lse) * tl.sum(grad * v, axis=1)
        for j in range(num_sources):
            src = tl.load(src_ptrs + j).to(tl.pointer_type(DTYPE))
            v = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
            inv_rms = tl.load(inv_rms_ptr + j * tokens + rows, mask=row_ok, other=0.0)
            dots = tl.load(dots_ptr + j * tokens + rows, mask=row_ok, other=0.0)
            alpha = tl.exp(inv_rms * dots - lse)
            dscore = alpha * (tl.sum(grad * v, axis=1) - mean_u)
            coef_r = dscore * inv_rms
            coef_v = dscore * dots * inv_rms * inv_rms * inv_rms / hidden
            dq += tl.sum(coef_r[:, None] * v, axis=0)
            dst = tl.load(grad_src_ptrs + j)
            if dst != 0:
                dv = alpha[:, None] * grad + coef_r[:, None] * q[None, :] - coef_v[:, None] * v
                tl.store(dst.to(tl.pointer_type(DTYPE)) + offs, dv.to(DTYPE), mask=mask)
    tl.store(dq_partial_ptr + pid * hidden + cols, dq, mask=cols < hidden)


_JITTED: dict[bool, tuple] = {}


def _kernels():
    """(forward, backward) jitted for the current TRITON_INTERPRET setting."""
    interpreting = _interpreting()
    if interpreting not in _JITTED:
        _JITTED[interpreting] = (triton.jit(_forward_kernel), triton.jit(_backward_kernel))
    return _JITTED[interpreting]


# ----------------------------------------------------------------------------- launch
@dataclass(frozen=True)
class LaunchConfig:
    block_tokens: int  # token rows per program
    block_hidden: int  # next power of two >= H
    num_warps: int
    max_programs: int  # backward grid bound (rows of the dq partials)
    backward_warps: int  # the backward's (it keeps more [BLOCK_T, BLOCK_H] tensors live)


def launch_config(
    tokens: int, hidden: int, device: torch.device, block_tokens=None, max_programs=None
) -> LaunchConfig:
    """~4K fp32 elements per program tile; backward uses at most 4 programs per SM.

    The backward keeps about twice the forward's live tiles (G, v, q, dq, dv), so it takes twice
    the warps up to 16 while the tile is <= 4096 elements; a larger tile would need more than the
    128 registers a thread of a 16-warp program can have, so it keeps the forward's warps (up to
    255 registers a thread). Both compile without spills on sm_90 and sm_100 up to hidden 8192
    (`attnres-bench kernels`, docs/benchmarks.md).
    """
    block_hidden = triton.next_power_of_2(hidden)
    if block_tokens is None:
        block_tokens = min(16, max(1, 4096 // block_hidden))
    if block_tokens < 1 or block_tokens & (block_tokens - 1):
        raise ValueError(f"block_tokens must be a power of two >= 1, got {block_tokens}")
    tile = block_tokens * block_hidden
    num_warps = 4 if tile <= 2048 else 8 if tile <= 8192 else 16
    backward_warps = min(16, 2 * num_warps) if tile <= 4096 else num_warps
    if max_programs is None:
        max_programs = 2  # the interpreter: still exercises the strided loop
        if device.type == "cuda":
            max_programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return LaunchConfig(block_tokens, block_hidden, num_warps, max_programs, backward_warps)


def register_limit(num_warps: int) -> int:
    """The most registers a thread of a `num_warps` program can have (64K per SM, <= 255).
    Passed as `maxnreg`: without it ptxas trades spills for occupancy (the backward spilled 24
    bytes at hidden 2304 on sm_90 with 8 warps)."""
    return min(255, 65536 // (32 * num_warps))


def _pointer_table(tensors, device: torch.device) -> torch.Tensor:
    """int64 data pointers (0 for None) on `device`; pinned + non_blocking on CUDA (no sync)."""
    table = torch.tensor([0 if t is None else t.data_ptr() for t in tensors], dtype=torch.int64)
    if device.type == "cuda":
        table = table.pin_memory().to(device, non_blocking=True)
    return table


def _tl_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[
        dtype
    ]


class FusedDepthRead(torch.autograd.Function):
    """Triton depth read; saves source references plus r, t ([N, T]) and lse ([T]) in fp32."""

    @staticmethod
    def forward(ctx, pseudo_query, key_norm_weight, eps, launch, *sources):
        shape, device = sources[0].shape, sources[0].device
        hidden = shape[-1]
        tokens = sources[0].numel() // hidden
        sources = [src.contiguous() for src in sources]
        q_H = (pseudo_query.float() * key_norm_weight.float()).contiguous()
        out = torch.empty_like(sources[0])
        stats = torch.empty(2 * len(sources) + 1, tokens, dtype=torch.float32, device=device)
        inv_rms_NT, dots_NT, lse_T = stats[: len(sources)], stats[len(sources) : -1], stats[-1]
        if tokens:
            forward_kernel, _ = _kernels()
            grid = (triton.cdiv(tokens, launch.block_tokens),)
            forward_kernel[grid](
                _pointer_table(sources, device),
                q_H,
                out,
                inv_rms_NT,
                dots_NT,
                lse_T,
                len(sources),
                tokens,
                hidden,
                eps,
                DTYPE=_tl_dtype(out.dtype),
                BLOCK_T=launch.block_tokens,
                BLOCK_H=launch.block_hidden,
                num_warps=launch.num_warps,
            )
        ctx.save_for_backward(pseudo_query, key_norm_weight, stats, *sources)
        ctx.launch = launch
        return out.view(shape)

    @staticmethod
    def backward(ctx, grad_out):
        pseudo_query, key_norm_weight, stats, *sources = ctx.saved_tensors
        launch, num = ctx.launch, len(sources)
        shape, device = sources[0].shape, sources[0].device
        hidden = shape[-1]
        tokens = sources[0].numel() // hidden
        needs = ctx.needs_input_grad
        grads = [torch.empty_like(src) if needs[4 + j] else None for j, src in enumerate(sources)]
        programs = max(1, min(triton.cdiv(tokens, launch.block_tokens), launch.max_programs))
        dq_partial = torch.zeros(programs, hidden, dtype=torch.float32, device=device)
        if tokens:
            _, backward_kernel = _kernels()
            q_H = (pseudo_query.float() * key_norm_weight.float()).contiguous()
            backward_kernel[(programs,)](
                _pointer_table(sources, device),
                _pointer_table(grads, device),
                grad_out.contiguous(),
                q_H,
                stats[:num],
                stats[num:-1],
                stats[-1],
                dq_partial,
                num,
                tokens,
                hidden,
                DTYPE=_tl_dtype(sources[0].dtype),
                BLOCK_T=launch.block_tokens,
                BLOCK_H=launch.block_hidden,
                num_warps=launch.backward_warps,
                maxnreg=register_limit(launch.backward_warps),
            )
        dq_H = dq_partial.sum(dim=0)
        grad_w = (dq_H * key_norm_weight.float()).to(pseudo_query.dtype) if needs[0] else None
        grad_g = (dq_H * pseudo_query.float()).to(key_norm_weight.dtype) if needs[1] else None
        return (grad_w, grad_g, None, None, *grads)


def fused_depth_read(
    sources: Sequence[torch.Tensor],
    pseudo_query: torch.Tensor,
    key_norm_weight: torch.Tensor,
    eps: float,
    *,
    block_tokens: int | None = None,
    max_programs: int | None = None,
) -> torch.Tensor:
    """The depth read through the Triton kernels; same signature and result as `depth_read`.

    `block_tokens` (token rows per program) and `max_programs` (backward grid bound) override the
    launch heuristics (tuning, tests).
    """
    _check_sources(sources, pseudo_query)
    if key_norm_weight.shape != pseudo_query.shape:
        raise ValueError(
            f"key-norm gain shape {tuple(key_norm_weight.shape)} must equal the pseudo-query "
            f"shape {tuple(pseudo_query.shape)}"
        )
    reason = _unsupported_reason(sources[0])
    if reason is not None:
        raise ValueError(
            f"the fused depth read cannot run: {reason}; use "
            f"megatron_attnres.attnres.depth_read instead"
        )
    first = sources[0]
    launch = launch_config(
        first.numel() // first.shape[-1], first.shape[-1], first.device, block_tokens, max_programs
    )
    return FusedDepthRead.apply(pseudo_query, key_norm_weight, float(eps), launch, *sources)


def _choose(tensor: torch.Tensor) -> str:
    """'triton', 'cpu' or 'torch' for sources like `tensor` (raises where the switch demands a
    backend that cannot run)."""
    if fused_depth_read_available(tensor):
        return "triton"
    backend = depth_read_backend()
    if backend in ("auto", "cpu"):
        if cpu_kernel_available(tensor):
            return "cpu"
        if backend == "cpu":
            why = unavailable_reason() or "it needs fp32 CPU tensors"
            raise RuntimeError(
                f"{ENV_SWITCH}=cpu but the CPU kernel cannot run on {tensor.dtype} "
                f"{tensor.device} sources ({why}); set {ENV_SWITCH}=auto to fall back to "
                "PyTorch"
            )
    return "torch"


_CHOICES: dict = {}  # the decision per switch settings and source kind (a read runs per sublayer)


def depth_read_auto(
    sources: Sequence[torch.Tensor],
    pseudo_query: torch.Tensor,
    key_norm_weight: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """The model's depth read (`DepthAttention(..., read_fn=depth_read_auto)`): the fused Triton
    kernel where `fused_depth_read_available` says so, else on CPU the C kernel
    (kernels/depth_read_cpu.py) for fp32 sources, else the PyTorch `LeanDepthRead`."""
    first = sources[0]
    key = (
        os.environ.get(ENV_SWITCH),
        os.environ.get("TRITON_INTERPRET"),
        first.device,
        first.dtype,
        first.shape[-1] if first.dim() else 0,
    )
    choice = _CHOICES.get(key)
    if choice is None:
        choice = _CHOICES[key] = _choose(first)
    if choice == "triton":
        return fused_depth_read(sources, pseudo_query, key_norm_weight, eps)
    if choice == "cpu":
        return cpu_depth_read(sources, pseudo_query, key_norm_weight, eps)
    return depth_read(sources, pseudo_query, key_norm_weight, eps)
