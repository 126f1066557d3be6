"""Op level: one depth read over N sources of [tokens, hidden], forward and forward + backward.

Implementations, timed in the same run (ratios are to the PyTorch reference):
- lean:      attnres.depth_read (LeanDepthRead, our memory-lean autograd function)
- reference: attnres.depth_read_reference (stacks the sources; plain autograd)
- compiled:  torch.compile of the reference (skipped with the reason if compilation fails)
- cpu_kernel: megatron_attnres.kernels.depth_read_cpu (the C kernel the model uses on CPU), on
  CPU only, when it builds
- triton:    megatron_attnres.kernels.depth_read_triton, on CUDA only, if present
- flash_attn_res, fast_attnres: the peer packages flash-attn-res 0.1.x and fast-attnres 2.x
  (`pip install "megatron-attnres[bench-peers]"`; never dependencies), on CUDA only, reported as
  "not installed" when absent. Adapters (`peer_reads`) map one read onto their APIs: the query
  is w * g (the key-norm gain folded into the pseudo-query: w . (g * v * r) = (w * g) . v * r);
  flash-attn-res takes the sources packed [N, 1, tokens, hidden] (the stacking copy is timed,
  as its API needs it) and its phase-1 op with that single query is the whole read;
  fast-attnres takes the list of bf16 sources. Both return bf16. Checked against the reference
  by tests/unit/test_peer_adapters.py (GPU only; not run yet: no GPU here).
Achieved GB/s uses the cost model's ideal bytes of a fused read (bench/cost_model.py,
`read_training_traffic`), so it is comparable across implementations; % of peak where the
device's peak bandwidth is known.
"""

import importlib
import importlib.metadata

import torch

from megatron_attnres.attnres import depth_read, depth_read_reference
from megatron_attnres.bench.common import device_info, header_line, interleaved_medians, table
from megatron_attnres.bench.cost_model import read_training_traffic

EPS = 1e-5
# (tokens, hidden, sources) per device; GPU shapes are paper-like (Kimi Linear: hidden 2304,
# 10 sources; a 7168-wide model), CPU shapes are toys.
SHAPES = {
    "cuda": [(4096, 2304, 2), (16384, 2304, 10), (8192, 7168, 4), (8192, 7168, 10)],
    "cpu": [(2048, 256, 2), (2048, 256, 8)],
}
QUICK_SHAPES = {"cuda": [(8192, 2304, 10)], "cpu": [(512, 128, 4)]}


def _triton_read():
    """The fused Triton depth read (kernels/depth_read_triton.py), if it imports."""
    try:
        module = importlib.import_module("megatron_attnres.kernels.depth_read_triton")
    except ImportError as err:
        return None, f"not available ({err})"
    for name in ("fused_depth_read", "depth_read_triton"):
        if callable(getattr(module, name, None)):
            return getattr(module, name), ""
    return None, "module has no fused_depth_read function"


def implementations(device: str, compile: bool = True) -> tuple[dict, dict]:
    """(name -> fn(sources, w, g, eps), name -> reason skipped)."""
    impls = {"lean": depth_read, "reference": depth_read_reference}
    skipped = {}
    if not compile:
        skipped["compiled"] = "--no-compile"
    else:
        impls["compiled"] = torch.compile(depth_read_reference, dynamic=False)
    if device != "cuda":
        from megatron_attnres.kernels import depth_read_cpu

        why = depth_read_cpu.unavailable_reason()
        if why is None:
            impls["cpu_kernel"] = depth_read_cpu.cpu_depth_read
        else:
            skipped["cpu_kernel"] = why
        for name in ("triton", "flash_attn_res", "fast_attnres"):
            skipped[name] = "CUDA only"
        return impls, skipped
    fn, why = _triton_read()
    if fn is None:
        skipped["triton"] = why
    else:
        impls["triton"] = fn
    skipped["cpu_kernel"] = "CPU only"
    for name, (read, why) in peer_reads().items():
        if read is None:
            skipped[name] = why
        else:
            impls[name] = read
    return impls, skipped


PEERS = {"flash_attn_res": "flash-attn-res", "fast_attnres": "fast-attnres"}


def peer_reads() -> dict:
    """name -> (fn(sources, w, g, eps) or None, why not) for the peer packages."""
    found = {}
    for name, dist in PEERS.items():
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[name] = (None, "not installed")
            continue
        try:
            found[name] = (_ADAPTERS[name](), "")
        except ImportError as err:
            found[name] = (None, f"{dist} {version} does not import ({err})")
    return found


def _flash_attn_res_read():
    from flash_attn_res import phase_1_batched_attention_triton_op as phase_1

    def read(sources, pseudo_query, key_norm_weight, eps):
        hidden = sources[0].shape[-1]
        packed = torch.stack(sources).reshape(len(sources), 1, -1, hidden)
        query = (pseudo_query * key_norm_weight).to(torch.float32).reshape(1, hidden)
        out, _lse = phase_1(packed, query, eps)
        return out[0].reshape(sources[0].shape)

    return read


def _fast_attnres_read():
    from attnres import attnres  # fast-attnres's package is called `attnres`

    def read(sources, pseudo_query, key_norm_weight, eps):
        query = (pseudo_query * key_norm_weight).to(torch.bfloat16)
        return attnres([src.to(torch.bfloat16) for src in sources], query, eps=eps)

    return read


_ADAPTERS = {"flash_attn_res": _flash_attn_res_read, "fast_attnres": _fast_attnres_read}


def _inputs(tokens, hidden, n, device, dtype, grad: bool):
    gen = torch.Generator(device="cpu").manual_seed(0)
    sources = [
        torch.randn(tokens, hidden, generator=gen).to(device, dtype).requires_grad_(grad)
        for _ in range(n)
    ]
    w = (0.1 * torch.randn(hidden, generator=gen)).to(device).requires_grad_(grad)
    g = torch.ones(hidden, device=device, requires_grad=grad)
    return sources, w, g


def _runner(fn, tokens, hidden, n, device, dtype, backward: bool):
    sources, w, g = _inputs(tokens, hidden, n, device, dtype, backward)
    if not backward:

        def run():
            with torch.no_grad():
                fn(sources, w, g, EPS)

        return run
    grad_out = torch.randn(tokens, hidden, device=device, dtype=dtype)

    def run():
        for t in [*sources, w, g]:
            t.grad = None
        fn(sources, w, g, EPS).backward(grad_out)

    return run


def time_shape(impls: dict, skipped: dict, shape, device, dtype, backward, reps) -> dict:
    """Median seconds per implementation, interleaved (A B C A B C ...); an implementation
    that fails (e.g. no C++ compiler for inductor) moves to `skipped`."""
    runners = {}
    for name, fn in list(impls.items()):
        run = _runner(fn, *shape, device, dtype, backward)
        try:
            run()  # first call: compilation, autotuning
        except Exception as err:  # noqa: BLE001 - only this column is lost
            skipped[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
            impls.pop(name)
            continue
        runners[name] = run
    return interleaved_medians(runners, device, warmup=1, reps=reps)


def run_op(device: str = "cpu", quick: bool = False, compile: bool = True) -> dict:
    info = device_info(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    impls, skipped = implementations(device, compile)
    shapes = (QUICK_SHAPES if quick else SHAPES)[device]
    reps = 5 if quick else 11
    rows, records = [], []
    for tokens, hidden, n in shapes:
        ideal = read_training_traffic(n, tokens, hidden, dtype.itemsize)
        for backward in (False, True):
            nbytes = ideal["forward"].total + (ideal["backward"].total if backward else 0)
            times = time_shape(impls, skipped, (tokens, hidden, n), device, dtype, backward, reps)
            base = times.get("reference")
            for name, seconds in times.items():
                gbps = nbytes / seconds / 1e9
                peak = info["peak_bandwidth"]
                record = dict(
                    tokens=tokens,
                    hidden=hidden,
                    sources=n,
                    dtype=str(dtype),
                    pass_="fwd+bwd" if backward else "fwd",
                    impl=name,
                    ms=1e3 * seconds,
                    vs_reference=base / seconds if base else None,
                    gb_per_s=gbps,
                    pct_peak=100 * gbps * 1e9 / peak if peak else None,
                )
                records.append(record)
                rows.append(
                    [
                        f"{tokens}x{hidden}",
                        n,
                        record["pass_"],
                        name,
                        record["ms"],
                        record["vs_reference"],
                        gbps,
                        record["pct_peak"],
                    ]
                )
    text = table(
        "op: one depth read (speed-up = reference time / this time; GB/s from the ideal bytes)",
        ["tokens x hidden", "N", "pass", "impl", "ms", "speed-up vs reference", "GB/s", "% peak"],
        rows,
    )
    notes = [f"  {name}: skipped, {why}" for name, why in skipped.items()]
    print(header_line(info) + "\n" + text + ("\n" + "\n".join(notes) if notes else ""), flush=True)
    return {"info": info, "dtype": str(dtype), "results": records, "skipped": skipped}
