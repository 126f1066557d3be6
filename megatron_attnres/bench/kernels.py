"""`attnres-bench kernels`: the Triton depth-read kernels compiled ahead of time, on CPU.

Every kernel (training forward/backward, kernels/depth_read_triton.py; the two-phase inference
kernels, conversion/hf/depth_read_triton.py) is compiled by `triton.compile` for a
`GPUTarget("cuda", 90, 32)` (H100) and `GPUTarget("cuda", 100, 32)` (B200; the third field is
the warp size, and Triton compiles these as sm_90a / sm_100a) with the launch parameters the
runtime chooses (`launch_config`, `phase1_launch`, `phase2_launch`), at every hidden size of
SWEEP_HIDDEN and of the shipped configs. No GPU is needed: ptxas and cuobjdump ship with triton.
`cuobjdump --dump-resource-usage` gives registers per thread, stack bytes (register spills go to
the stack frame) and static shared memory; Triton's metadata gives the dynamic shared memory.

The runtime specialises each launch on its arguments (an int equal to 1 becomes a constant, ints
divisible by 16 and 16-byte aligned pointers get a divisibility hint); `_specialise` asks
Triton's own specialisation function, fed with stand-ins for the arguments the launchers pass.
N (the source count) is a runtime loop bound, and the sources a pointer table, so N changes the
binary only through that specialisation: N in NUM_SOURCES gives two binaries (16 is divisible by
16), both compiled; rows with equal resources are merged and list their N values.
"""

import inspect
import json
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from math import ceil
from pathlib import Path

import torch

SWEEP_HIDDEN = (64, 128, 256, 512, 1024, 2048, 2304, 4096, 7168, 8192)
NUM_SOURCES = (2, 10, 16, 55)  # Block 48B: 2..10 sources; Full 48B: up to 55 (16: a multiple)
TRAIN_TOKENS = 4096  # sequence 4096 x micro-batch 1 (the 48B run)
PREFILL_TOKENS, DECODE_TOKENS = 4096, 1
READS = 7  # phase 1 at 48B: the 6 sublayer reads of a depth block plus the output read
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@dataclass(frozen=True)
class SMLimits:
    """Per-SM limits the occupancy estimate uses (CUDA programming guide, compute capabilities
    9.0 and 10.0: the same register file, shared memory and residency limits)."""

    name: str
    regs_per_sm: int = 65536
    reg_unit: int = 256  # registers are allocated per warp in units of 256
    smem_per_sm: int = 228 * 1024
    smem_reserved_per_block: int = 1024  # the CUDA runtime's per-block reservation
    smem_unit: int = 128
    max_warps: int = 64
    max_blocks: int = 32
    warp_size: int = 32


TARGETS = {"sm_90": (90, SMLimits("H100")), "sm_100": (100, SMLimits("B200"))}


def occupancy(regs: int, smem_bytes: int, num_warps: int, limits: SMLimits) -> tuple[int, float]:
    """(resident blocks per SM, resident warps / max warps) of a kernel using `regs` registers
    per thread and `smem_bytes` shared memory per block (static + dynamic), as CUDA's occupancy
    calculator: the least of the register, shared-memory, warp and block limits."""
    regs_per_warp = ceil(regs * limits.warp_size / limits.reg_unit) * limits.reg_unit
    by_regs = (limits.regs_per_sm // regs_per_warp) // num_warps if regs else limits.max_blocks
    smem = ceil((smem_bytes + limits.smem_reserved_per_block) / limits.smem_unit) * limits.smem_unit
    blocks = min(
        by_regs, limits.smem_per_sm // smem, limits.max_warps // num_warps, limits.max_blocks
    )
    return blocks, blocks * num_warps / limits.max_warps


# ----------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Pointer:
    """Stand-in for a tensor argument: Triton's specialisation reads only these two."""

    dtype: torch.dtype
    offset: int = 0  # bytes past a fresh (16-byte aligned) allocation

    def data_ptr(self) -> int:
        return 1 << 20 | self.offset


@dataclass(frozen=True)
class Case:
    kernel: str  # row label
    fn: object  # the plain kernel function
    args: dict  # runtime arguments (Pointer, int, float) in the kernel's order
    constexprs: dict
    options: dict  # the launch's compile options: num_warps (and maxnreg where it is passed)
    dtype: str
    hidden: int
    num_sources: int | None
    block_t: int
    block_h: int

    @property
    def num_warps(self) -> int:
        return self.options["num_warps"]


def _training_cases(hidden: int, dtype: str, num_sources: int) -> list[Case]:
    from megatron_attnres.kernels import depth_read_triton as k

    launch = k.launch_config(TRAIN_TOKENS, hidden, torch.device("cpu"), max_programs=1)
    io, f32, i64, n, t = DTYPES[dtype], torch.float32, torch.int64, num_sources, TRAIN_TOKENS
    stats = {  # views of one [2N + 1, T] fp32 buffer
        "inv_rms_ptr": Pointer(f32),
        "dots_ptr": Pointer(f32, n * t * 4),
        "lse_ptr": Pointer(f32, 2 * n * t * 4),
    }
    sizes = {"num_sources": n, "tokens": t, "hidden": hidden}
    forward = {"src_ptrs": Pointer(i64), "q_ptr": Pointer(f32), "out_ptr": Pointer(io)}
    backward = {
        "src_ptrs": Pointer(i64),
        "grad_src_ptrs": Pointer(i64),
        "grad_out_ptr": Pointer(io),
        "q_ptr": Pointer(f32),
    }
    constexprs = {
        "DTYPE": k._tl_dtype(io),
        "BLOCK_T": launch.block_tokens,
        "BLOCK_H": launch.block_hidden,
    }
    backward_options = {
        "num_warps": launch.backward_warps,
        "maxnreg": k.register_limit(launch.backward_warps),
    }
    labels = (dtype, hidden, n, launch.block_tokens, launch.block_hidden)
    return [
        Case(
            "train fwd",
            k._forward_kernel,
            {**forward, **stats, **sizes, "eps": 1e-6},
            constexprs,
            {"num_warps": launch.num_warps},
            *labels,
        ),
        Case(
            "train bwd",
            k._backward_kernel,
            {**backward, **stats, "dq_partial_ptr": Pointer(f32), **sizes},
            constexprs,
            backward_options,
            *labels,
        ),
    ]


def _phase1_case(hidden: int, dtype: str, num_sources: int, tokens: int, regime: str) -> Case:
    from megatron_attnres.conversion.hf import depth_read_triton as k

    block_t, block_r, block_h, warps = k.phase1_launch(tokens, READS, hidden)
    f32 = torch.float32
    args = {
        "src_ptrs": Pointer(torch.int64),
        **{name: Pointer(f32) for name in ("q_ptr", "scores_ptr", "max_ptr", "denom_ptr")},
        "acc_ptr": Pointer(f32),
        "num_sources": num_sources,
        "tokens": tokens,
        "hidden": hidden,
        "reads": READS,
        "eps": 1e-6,
    }
    constexprs = {
        "DTYPE": k._tl_dtype(DTYPES[dtype]),
        "BLOCK_T": block_t,
        "BLOCK_R": block_r,
        "BLOCK_H": block_h,
    }
    kernel = f"phase1 {regime}"
    return Case(kernel, k._phase1_kernel, args, constexprs, {"num_warps": warps}, dtype, hidden,
                num_sources, block_t, block_h)  # fmt: skip


def _phase2_case(hidden: int, dtype: str, tokens: int, regime: str, partial: bool) -> Case:
    from megatron_attnres.conversion.hf import depth_read_triton as k

    block_t, block_h, warps = k.phase2_launch(hidden)
    f32, io, read = torch.float32, DTYPES[dtype], 1  # read r: views at offsets r * 4, r * H * 4
    acc = Pointer(f32, read * hidden * 4)
    args = {
        "max_ptr": Pointer(f32, read * 4),
        "denom_ptr": Pointer(f32, read * 4),
        "acc_ptr": acc,
        "stat_stride": READS,
        "acc_stride": READS * hidden,
        "partial_ptr": Pointer(io) if partial else acc,
        "q_ptr": Pointer(f32),
        "out_ptr": Pointer(io),
        "tokens": tokens,
        "hidden": hidden,
        "eps": 1e-6,
    }
    constexprs = {"HAS_PARTIAL": partial, "BLOCK_T": block_t, "BLOCK_H": block_h}
    kernel = f"phase2 {regime}" + (" +partial" if partial else "")
    return Case(kernel, k._phase2_kernel, args, constexprs, {"num_warps": warps}, dtype, hidden,
                None, block_t, block_h)  # fmt: skip


def config_hidden_sizes() -> set[int]:
    """hidden_size of every shipped config (configs/*.yaml; none in an installed package)."""
    found = (
        re.search(r"^hidden_size:\s*(\d+)", p.read_text(), re.M) for p in CONFIGS.glob("*.y*ml")
    )
    return {int(m.group(1)) for m in found if m}


def cases(hiddens, dtypes=("bf16",), sources=(10,), regimes=("prefill",)) -> list[Case]:
    """Every kernel's launch at these shapes (regimes: "prefill" and/or "decode", the token
    counts of the inference kernels)."""
    tokens = {"prefill": PREFILL_TOKENS, "decode": DECODE_TOKENS}
    out = []
    for hidden in hiddens:
        for dtype in dtypes:
            for n in sources:
                out += _training_cases(hidden, dtype, n)
            for regime in regimes:
                out += [_phase1_case(hidden, dtype, n, tokens[regime], regime) for n in sources]
                out += [
                    _phase2_case(hidden, dtype, tokens[regime], regime, partial)
                    for partial in (False, True)
                ]
    return out


def sweep(quick: bool) -> list[Case]:
    """--quick: the tiny and 48B hidden sizes, bf16, prefill; else every shape."""
    if quick:
        return cases((64, 2304))
    hiddens = sorted(set(SWEEP_HIDDEN) | config_hidden_sizes())
    return cases(hiddens, tuple(DTYPES), NUM_SOURCES, ("prefill", "decode"))


# ----------------------------------------------------------------------------- compile
def unavailable_reason() -> str | None:
    """Why the kernels cannot be compiled here (no triton, no NVIDIA backend), or None."""
    try:
        import triton.backends.nvidia.compiler  # noqa: F401
    except ImportError as error:
        return f"triton's NVIDIA backend does not import ({error})"
    if not _cuobjdump().exists():
        return f"cuobjdump is missing ({_cuobjdump()})"
    for name, (arch, _) in TARGETS.items():
        try:
            _ptxas(arch)
        except (RuntimeError, OSError) as error:
            return f"ptxas for {name} is unusable ({error})"
    return None


def _cuobjdump() -> Path:
    import triton.backends.nvidia

    return Path(triton.backends.nvidia.__file__).parent / "bin" / "cuobjdump"


def _ptxas(arch: int) -> Path:
    import triton.backends.nvidia.compiler as nvidia

    path = Path(nvidia.get_ptxas(arch).path)
    if not path.exists():
        raise FileNotFoundError(path)
    return path


def _specialise(case: Case):
    """(signature, constexprs, attrs) as Triton's launcher derives them from the arguments."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    signature, constexprs, attrs = {}, dict(case.constexprs), {}
    params = list(inspect.signature(case.fn).parameters)
    if params != [*case.args, *case.constexprs]:
        raise ValueError(f"{case.kernel}: arguments {[*case.args]} do not match {params}")
    for index, (name, value) in enumerate(case.args.items()):
        kind, spec = native_specialize_impl(BaseBackend, value, False, True, True)
        if kind == "constexpr":  # an int equal to 1
            constexprs[name] = spec
        elif spec:
            attrs[(index,)] = BaseBackend.parse_attr(spec)
        signature[name] = kind
    signature |= {name: "constexpr" for name in constexprs}
    return signature, constexprs, attrs


def _key(case: Case, arch: int) -> tuple:
    signature, constexprs, attrs = _specialise(case)
    return (case.kernel, arch, case.dtype, case.hidden, str(signature), str(constexprs),
            str(attrs), str(case.options))  # fmt: skip


def compile_case(case: Case, arch: int) -> dict:
    """Compile `case` for sm_`arch`: registers, stack bytes, shared memory (bytes per block)."""
    import triton
    from triton.runtime.jit import JITFunction

    signature, constexprs, attrs = _specialise(case)
    fn = JITFunction(case.fn)  # compiled, not interpreted, whatever TRITON_INTERPRET says
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return _compile(src, arch, case.options)


def _compile(src, arch: int, options: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as error:  # a failed compile is a result, reported per row
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run(
            [str(_cuobjdump()), "--dump-resource-usage", str(cubin)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    return {
        "regs": int(fields["REG"]),
        "stack": int(fields["STACK"]),
        "local": int(fields["LOCAL"]),
        "smem": int(fields["SHARED"]) + compiled.metadata.shared,  # static + dynamic
    }


def _row(case: Case, target: str, sources: list, result: dict) -> dict:
    row = {
        "kernel": case.kernel,
        "target": target,
        "dtype": case.dtype,
        "hidden": case.hidden,
        "N": ",".join(map(str, sources)) if sources else "-",
        "BLOCK_T": case.block_t,
        "BLOCK_H": case.block_h,
        "warps": case.num_warps,
        **result,
    }
    if "error" not in result:
        limits = TARGETS[target][1]
        row["blocks_per_sm"], row["occupancy"] = occupancy(
            result["regs"], result["smem"], case.num_warps, limits
        )
    return row


def compile_all(case_list: list[Case]) -> list[dict]:
    """One row per distinct binary and target: cases that specialise alike share a row (with
    their N values)."""
    groups: dict[tuple, tuple[Case, str, list]] = {}
    for case in case_list:
        for target, (arch, _) in TARGETS.items():
            _, _, sources = groups.setdefault(_key(case, arch), (case, target, []))
            if case.num_sources is not None:
                sources.append(case.num_sources)
    return [
        _row(case, target, sources, compile_case(case, TARGETS[target][0]))
        for case, target, sources in groups.values()
    ]


# ----------------------------------------------------------------------------- fla chunk_kda
KDA_SHAPE = (1, 4096, 32, 128)  # batch, tokens, heads, head dim of the 48B KDA layers (TP 1)


def kda_rows(arch: int) -> list[dict]:
    """fla's chunk_kda (forward and backward, called as mcore/kda.py calls it) at KDA_SHAPE, bf16:
    every autotune config of every Triton kernel it launches, compiled for sm_`arch` (on a GPU the
    autotuner times them and keeps one, so all are listed). fla picks its config lists at import
    from the visible GPU, so `_kda_child` imports it in a fresh process under a stand-in driver
    that reports an H100 (sm_90) or a B200 (sm_100)."""
    code = f"from megatron_attnres.bench.kernels import _kda_child; _kda_child({arch})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode:
        rows.append({"error": (done.stderr.strip().splitlines() or ["no output"])[-1]})
    for row in rows:
        row["target"] = f"sm_{arch}"
        if "regs" in row:
            limits = TARGETS[row["target"]][1]
            row["occupancy"] = occupancy(row["regs"], row["smem"], row["warps"], limits)[1]
    return rows


def _kda_child(arch: int) -> None:
    """Run chunk_kda's Python launchers on CPU tensors; every kernel launch compiles instead
    (uses Triton 3.8's launcher internals, `create_binder` and `_pack_args`, to specialise the
    arguments exactly as a launch would)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime import autotuner, jit

    class Utils:
        def get_device_properties(self, device):
            return {"max_shared_mem": 232448, "multiprocessor_count": {90: 132, 100: 148}[arch]}

    class Driver:  # what fla.utils asks at import: the target and its shared memory
        utils = Utils()
        get_current_target = staticmethod(lambda: GPUTarget("cuda", arch, 32))
        get_current_device = staticmethod(lambda: 0)

    triton.runtime.driver.set_active(Driver())
    torch.cuda.device_count = lambda: 1
    torch.cuda.get_device_name = lambda *_: {90: "NVIDIA H100", 100: "NVIDIA B200"}[arch]
    torch.cuda.get_device_capability = lambda *_: (arch // 10, 0)
    phase, seen = ["fwd"], set()

    def every_config(self, *args, **kwargs):  # Autotuner.run: each config, no timing
        self.nargs = dict(zip(self.arg_names, args, strict=False))
        for config in self.prune_configs(kwargs):
            self.fn.run(*args, **dict(kwargs, **config.all_kwargs()))

    def compile_launch(self, *args, grid, warmup, **kwargs):  # JITFunction.run
        _, _, _, backend, binder = self.create_binder()
        bound, spec, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(
            backend, kwargs, bound, spec, options
        )
        key = (self.fn.__name__, str(signature), str(constexprs), str(attrs), str(options))
        if key not in seen:
            seen.add(key)
            src = triton.compiler.ASTSource(self, signature, constexprs, attrs)
            tiles = {self.arg_names[k[0]]: v for k, v in constexprs.items() if type(v) is int}
            row = {"phase": phase[0], "kernel": self.fn.__name__, "warps": options.num_warps,
                   "stages": options.num_stages, "constexprs": tiles}  # fmt: skip
            print(json.dumps(row | _compile(src, arch, options.__dict__)), flush=True)

    autotuner.Autotuner.run, jit.JITFunction.run = every_config, compile_launch
    from fla.ops.kda import chunk_kda

    q, k, v = (torch.randn(KDA_SHAPE, dtype=torch.bfloat16, requires_grad=True) for _ in "qkv")
    g = torch.randn(KDA_SHAPE, requires_grad=True)
    beta = torch.rand(KDA_SHAPE[:3], dtype=torch.bfloat16, requires_grad=True)
    out, _ = chunk_kda(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)  # values never read
    phase[0] = "bwd"
    out.sum().backward()


def _kda_table(rows: list[dict]) -> list[list]:
    """Per kernel and target: configs, register range, spilling configs, shared memory,
    occupancy range."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row.get("phase"), row.get("kernel"), row["target"]), []).append(row)
    out = []
    for (phase, kernel, target), group in groups.items():
        ok = [r for r in group if "regs" in r]
        if not ok:
            out.append([phase, kernel, target, len(group), group[0].get("error"), "", "", ""])
            continue
        spill = [r["stack"] for r in ok if r["stack"] or r["local"]]
        regs, occ = [r["regs"] for r in ok], [r["occupancy"] for r in ok]
        out.append([
            phase, kernel, target, f"{len(ok)}/{len(group)}", f"{min(regs)}-{max(regs)}",
            f"{len(spill)} (max {max(spill)} B)" if spill else "0",
            max(r["smem"] for r in ok), f"{min(occ):.1%}-{max(occ):.1%}",
        ])  # fmt: skip
    return out


def _merge_sources(rows: list[dict]) -> list[dict]:
    """Rows that differ only in N (specialisations with the same resources) become one."""
    merged: dict[tuple, dict] = {}
    for row in rows:
        key = tuple((k, str(v)) for k, v in row.items() if k != "N")
        if key in merged and row["N"] != "-":
            merged[key]["N"] += "," + row["N"]
        else:
            merged.setdefault(key, dict(row))
    for row in merged.values():
        if row["N"] != "-":
            row["N"] = ",".join(map(str, sorted({int(n) for n in row["N"].split(",")})))
    return list(merged.values())


HEADER = ["target", "dtype", "hidden", "N", "BLOCK_T", "BLOCK_H", "warps", "regs", "stack",
          "smem B", "occupancy"]  # fmt: skip


def _cells(row: dict) -> list:
    head = [row[k] for k in ("target", "dtype", "hidden", "N", "BLOCK_T", "BLOCK_H", "warps")]
    if "error" in row:
        return [*head, row["error"], "", "", ""]
    occupancy_text = f"{row['occupancy']:.1%} ({row['blocks_per_sm']}/SM)"
    return [*head, row["regs"], row["stack"], row["smem"], occupancy_text]


def _summary(rows: list[dict]) -> dict:
    ok = [r for r in rows if "error" not in r]
    per_kernel = {}
    for row in ok:
        entry = per_kernel.setdefault(f"{row['kernel']} {row['target']}", {"max_regs": 0})
        entry["max_regs"] = max(entry["max_regs"], row["regs"])
        entry["min_occupancy"] = min(entry.get("min_occupancy", 1.0), row["occupancy"])
    return {
        "rows": len(rows),
        "failed": [r for r in rows if "error" in r],
        "spilling": [r for r in ok if r["stack"] or r["local"]],
        "per_kernel": per_kernel,
    }


def _versions() -> dict:
    import triton
    import triton.backends.nvidia.compiler as nvidia

    from megatron_attnres.bench.common import commit

    ptxas = {f"sm_{arch}": nvidia.get_ptxas(arch).version for arch in (90, 100)}
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return {"triton": triton.__version__, "ptxas": ptxas, "commit": commit(), "date": date}


def _print_ours(rows: list[dict], summary: dict, versions: dict) -> None:
    from megatron_attnres.bench.common import table

    print(
        f"Triton kernels compiled ahead of time (no GPU) | triton {versions['triton']} | ptxas "
        f"{versions['ptxas']} | commit {versions['commit']} | {versions['date']}\nregs: registers "
        f"per thread; stack: bytes of stack frame (spills); smem: static + dynamic shared bytes "
        f"per program; occupancy: resident warps / 64 (H100 / B200 limits, SMLimits)\n"
    )
    for kernel in dict.fromkeys(r["kernel"] for r in rows):
        picked = [_cells(r) for r in rows if r["kernel"] == kernel]
        print(table(f"### {kernel}", HEADER, picked) + "\n")
    per_kernel = summary["per_kernel"].items()
    lines = [[k, v["max_regs"], f"{v['min_occupancy']:.1%}"] for k, v in per_kernel]
    print(table("### summary", ["kernel", "max regs", "min occupancy"], lines))
    print(
        f"\n{summary['rows']} rows, {len(summary['failed'])} failed to compile, "
        f"{len(summary['spilling'])} spill\n"
    )


def run_kernels(quick: bool, kda: bool = True) -> dict:
    """Compile every kernel at every shape for both targets, and with `kda` (not with --quick)
    fla's chunk_kda at the 48B KDA shape (~200 configs a target, minutes of CPU: two processes,
    one a target); print and return the tables."""
    from megatron_attnres.bench.common import table

    reason = unavailable_reason()
    if reason is not None:
        print(f"attnres-bench kernels: skipped, {reason}")
        return {"skipped": reason}
    rows = _merge_sources(compile_all(sweep(quick)))
    summary, versions = _summary(rows), _versions()
    _print_ours(rows, summary, versions)
    results = {"versions": versions, "limits": {t: vars(v[1]) for t, v in TARGETS.items()},
               "rows": rows, "summary": summary}  # fmt: skip
    if kda and not quick:
        with ThreadPoolExecutor(len(TARGETS)) as pool:
            per_target = pool.map(kda_rows, [arch for arch, _ in TARGETS.values()])
        kda_results = [row for rows_of_target in per_target for row in rows_of_target]
        header = ["phase", "kernel", "target", "configs", "regs", "spilling configs", "max smem B",
                  "occupancy"]  # fmt: skip
        title = (
            f"### fla chunk_kda at the 48B KDA shape (batch x tokens x heads x dim {KDA_SHAPE}, "
            "bf16): every autotune config"
        )
        print(table(title, header, _kda_table(kda_results)))
        results["kda"] = kda_results
    return results
