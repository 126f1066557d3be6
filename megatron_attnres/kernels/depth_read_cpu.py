"""Fused depth read on CPU: a small C kernel (`depth_read_cpu.c`) behind `LeanDepthRead`'s math.

Why: on CPU the PyTorch `LeanDepthRead` is a few dozen small ops per read, each paying dispatch
overhead and its own pass over memory; at the shapes CPU runs use (the tiny config: 1024 tokens
x hidden 64) that made a depth read cost as much as a tenth of a sublayer. torch.compile of the
same math was measured at under 2x faster with 10-15 s of compilation per source count; this
kernel makes one pass over each source row per direction (docs/benchmarks.md has the numbers).

Build: compiled on first use with the system C compiler (`cc`, or $CC) into the cache directory
($ATTNRES_KERNEL_CACHE, default ~/.cache/megatron_attnres/kernels), keyed by the source's hash,
written atomically so that ranks starting together do not race; about a second. No compiler, or
a failed build, means the PyTorch op is used instead, with one warning saying why. Only fp32
CPU tensors use it (other dtypes take the PyTorch op). The flags are portable (-O3, no -march)
plus AVX2/FMA on x86-64 CPUs where PyTorch uses them (`build_flags`);
the cache key holds the compiler, the machine type and the flags, so a cache shared by
different machines is safe.

Dispatch: `depth_read_auto` (kernels/depth_read_triton.py) uses it for CPU tensors under
ATTNRES_DEPTH_READ=auto (the default) or =cpu; =torch forces the PyTorch op.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch

from megatron_attnres.attnres.depth_read import _check_sources

SOURCE = Path(__file__).with_name("depth_read_cpu.c")
FLAGS = ("-O3", "-fno-math-errno", "-std=c99", "-shared", "-fPIC")
# x86-64 CPUs on which PyTorch itself runs its AVX2 (or AVX-512) kernels have AVX2 and FMA:
# there the kernel is built for them too (measured ~1.4x faster at hidden 64 than SSE2).
X86_VECTOR_FLAGS = ("-mavx2", "-mfma")


def build_flags() -> tuple[str, ...]:
    """The compiler flags for this machine: portable ones, plus AVX2/FMA where PyTorch reports
    that capability (`torch.backends.cpu.get_cpu_capability()`; ATEN_CPU_CAPABILITY=default turns
    it off for both)."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    if x86 and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        return FLAGS + X86_VECTOR_FLAGS
    return FLAGS


_state: dict = {}  # "lib": the loaded library or None, "reason": why not


def cache_dir() -> Path:
    root = os.environ.get("ATTNRES_KERNEL_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "megatron_attnres" / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def build_library() -> Path:
    """Compile the kernel (if not cached) and return the shared library's path; raises
    RuntimeError naming the compiler and its error output when the build fails."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found (looked for $CC, cc, gcc, clang)")
    code = SOURCE.read_bytes()
    # The machine type is in the key: a cache in a home directory shared by x86 and Arm nodes.
    flags = build_flags()
    stamp = " ".join((compiler, platform.machine(), *flags))
    key = hashlib.sha256(code + stamp.encode()).hexdigest()[:16]
    target = cache_dir() / f"depth_read_cpu-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        done = subprocess.run(
            [compiler, *flags, "-o", str(built), str(SOURCE), "-lm"],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed ({done.returncode}): {done.stderr[-2000:]}")
        os.replace(built, target)  # atomic: concurrent builders leave one complete file
    return target


def _library():
    if "lib" not in _state:
        try:
            lib = ctypes.CDLL(str(build_library()))
        except (OSError, RuntimeError) as error:
            _state.update(lib=None, reason=str(error))
            warnings.warn(
                f"the CPU depth-read kernel is unavailable ({error}); using the PyTorch op",
                stacklevel=3,
            )
        else:
            i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
            lib.attnres_depth_read_fwd.argtypes = [ptr, i64, i64, i64, ptr, ptr, f32, *[ptr] * 4]
            lib.attnres_weighted_sum.argtypes = [ptr, i64, i64, i64, ptr, ptr]
            lib.attnres_depth_read_bwd.argtypes = [ptr, ptr, i64, i64, i64, *[ptr] * 8]
            for fn in (
                lib.attnres_depth_read_fwd,
                lib.attnres_weighted_sum,
                lib.attnres_depth_read_bwd,
            ):
                fn.restype = None
            _state.update(lib=lib, reason=None)
    return _state["lib"]


def cpu_kernel_available(tensor: torch.Tensor) -> bool:
    """Whether sources like `tensor` can use the kernel: fp32 on CPU, and the kernel built."""
    return tensor.device.type == "cpu" and tensor.dtype == torch.float32 and _library() is not None


def unavailable_reason() -> str | None:
    _library()
    return _state["reason"]


def _pointers(tensors) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(
        *[t.data_ptr() if t is not None else None for t in tensors]
    )


def _rows(sources: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [src.contiguous() for src in sources]


def cpu_weighted_sum(alpha_NT: torch.Tensor, sources: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum_j alpha_j v_j with the forward's own loop: bitwise the result `CpuDepthRead` returned
    for these sources and weights (the read-result recomputation uses it)."""
    rows = _rows(sources)
    out = torch.empty_like(rows[0])
    tokens, hidden = alpha_NT.shape[1], rows[0].shape[-1]
    _library().attnres_weighted_sum(
        _pointers(rows), len(rows), tokens, hidden, alpha_NT.data_ptr(), out.data_ptr()
    )
    return out


def _stat_pointers(stats: torch.Tensor) -> tuple[int, int, int]:
    """Addresses of the inverse rms, dots and alpha planes of a contiguous fp32 [3, n, tokens]
    tensor (pointer arithmetic: three tensor views per call cost more than the kernel's
    scalar work at small shapes)."""
    plane = stats.shape[1] * stats.shape[2] * 4
    base = stats.data_ptr()
    return base, base + plane, base + 2 * plane


def _fp32(param: torch.Tensor) -> torch.Tensor:
    return param if param.dtype == torch.float32 and param.is_contiguous() else param.float()


class CpuDepthRead(torch.autograd.Function):
    """The depth read through the C kernel; saves what `LeanDepthRead` saves (source references
    and three fp32 scalars per source and token) and keeps `ctx.rebuild` (the weighted sum from
    the saved weights) for the read-result recomputation (mcore/read_recompute.py)."""

    @staticmethod
    def forward(ctx, pseudo_query, key_norm_weight, eps, *sources):
        rows = _rows(sources)
        num, hidden = len(rows), rows[0].shape[-1]
        tokens = rows[0].numel() // hidden
        w_H, g_H = _fp32(pseudo_query), _fp32(key_norm_weight)
        out = torch.empty_like(rows[0])
        stats = torch.empty(3, num, tokens)  # inverse rms, dots, alpha
        _library().attnres_depth_read_fwd(
            _pointers(rows),
            num,
            tokens,
            hidden,
            w_H.data_ptr(),
            g_H.data_ptr(),
            eps,
            out.data_ptr(),
            *_stat_pointers(stats),
        )
        ctx.save_for_backward(pseudo_query, key_norm_weight, stats, *rows)
        ctx.rebuild = partial(cpu_weighted_sum, stats[2])
        return out

    @staticmethod
    def backward(ctx, grad_out):
        pseudo_query, key_norm_weight, stats, *rows = ctx.saved_tensors
        num, hidden = len(rows), rows[0].shape[-1]
        tokens = rows[0].numel() // hidden
        w_H, g_H = _fp32(pseudo_query), _fp32(key_norm_weight)
        grad_out = grad_out.contiguous()
        needs = ctx.needs_input_grad
        grads = [torch.empty_like(r) if needs[3 + j] else None for j, r in enumerate(rows)]
        grad_wg = torch.empty(2, hidden)
        base = grad_wg.data_ptr()
        _library().attnres_depth_read_bwd(
            _pointers(rows),
            _pointers(grads),
            num,
            tokens,
            hidden,
            w_H.data_ptr(),
            g_H.data_ptr(),
            grad_out.data_ptr(),
            *_stat_pointers(stats),
            base,
            base + 4 * hidden,
        )
        grad_w = grad_wg[0].to(pseudo_query.dtype) if needs[0] else None
        grad_g = grad_wg[1].to(key_norm_weight.dtype) if needs[1] else None
        return (grad_w, grad_g, None, *grads)


def cpu_depth_read(
    sources: Sequence[torch.Tensor],
    pseudo_query: torch.Tensor,
    key_norm_weight: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """The depth read through the CPU kernel (fp32 CPU sources; check `cpu_kernel_available`)."""
    _check_sources(sources, pseudo_query)
    return CpuDepthRead.apply(pseudo_query, key_norm_weight, float(eps), *sources)
