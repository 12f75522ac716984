"""Microbenchmarks of one machine: copies against size, both directions at once, host gathers, GEMMs of a
model's layer shapes, attention over a KV-length sweep, whole model-shaped layers.

Timing (hw/timing.py): CUDA events on CUDA (warm-up, then the median of repeats, each repeat `inner` calls back
to back), `time.perf_counter` on CPU; every result keeps its spread (p10, p90, CV, a confidence interval of the
median) and is repeated, then flagged, when it varies too much. On `--device cpu` the
"device" is host memory and compute runs on one torch thread, exactly as the replay runs it
(hw/replay.py): a real measurement of this machine, labelled as such, never a GPU result. The layer, head
and attention benchmarks time the replay's own kernels (hw/kernels.py).
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
import time

import numpy as np

from tiersim.hw.copy_bench import host_gather_threads, interference, mechanism_curves
from tiersim.hw.device import DeviceError, device_info, device_name, resolve_device, uva_alias
from tiersim.hw.kernels import LayerWeights, decode_attention, head_kernel, layer_kernel, mlp, torch_dtype
from tiersim.hw.memory import mem_total_bytes
from tiersim.hw.streams import cpu_threads
from tiersim.hw.timing import Timing, time_op
from tiersim.specs import ModelSpec

KIB, MIB = 1 << 10, 1 << 20
DEFAULT_CHUNK = 128  # tokens per T0 chunk (ReplayConfig.chunk_tokens)
COPY_SIZES = tuple(4 * KIB * 4**i for i in range(9))  # 4 KiB .. 256 MiB


# ---------------------------------------------------------------------------------------------
# Copies
# ---------------------------------------------------------------------------------------------

def _host(nbytes: int, pinned: bool, device):
    import torch

    t = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned and device.type == "cuda")
    t.fill_(1)  # touch every page before timing
    return t


def _dev(nbytes: int, device):
    import torch

    t = torch.empty(nbytes, dtype=torch.uint8, device=device)
    t.fill_(1)
    return t


def _copy_fn(direction: str, nbytes: int, pinned: bool, device):
    """A function that copies nbytes host→device ('h2d') or device→host ('d2h'); on CPU between two host buffers."""
    host, dev = _host(nbytes, pinned, device), _dev(nbytes, device)
    non_blocking = pinned and device.type == "cuda"
    if direction == "h2d":
        return lambda: dev.copy_(host, non_blocking=non_blocking)
    return lambda: host.copy_(dev, non_blocking=non_blocking)


def copy_curve(device, direction: str, pinned: bool, sizes=COPY_SIZES, repeats: int = 7) -> list[dict]:
    """Copy time against size for one direction and host-memory kind."""
    out = []
    for n in sizes:
        t = time_op(_copy_fn(direction, n, pinned, device), device, repeats=repeats)
        out.append({"bytes": n, **t.to_dict(), "gbps": n / t.median_s / 1e9})
    return out


def duplex(device, nbytes: int = 64 * MIB, repeats: int = 5) -> dict:
    """Both directions at once: each direction's bandwidth with the other busy, over its bandwidth alone; every
    timing through time_op, so its CV and interval are recorded and a wide spread is flagged.

    CUDA: pinned H2D and D2H on two streams, the pair timed together; CPU: each direction timed on the measuring
    thread while a second thread copies the other direction between its own host buffers without pause.
    """
    h2d, d2h = _copy_fn("h2d", nbytes, True, device), _copy_fn("d2h", nbytes, True, device)
    alone_h, alone_d = time_op(h2d, device, repeats=repeats, inner=1), time_op(d2h, device, repeats=repeats, inner=1)
    if device.type == "cuda":
        both_h, both_d, pair = _duplex_cuda(h2d, d2h, device, repeats)
        timings = {"h2d_alone": alone_h, "d2h_alone": alone_d, "pair": pair}
    else:
        both_h_t, both_d_t = _with_other_busy(h2d, d2h, device, repeats), _with_other_busy(d2h, h2d, device, repeats)
        both_h, both_d = both_h_t.median_s, both_d_t.median_s
        timings = {"h2d_alone": alone_h, "d2h_alone": alone_d, "h2d_both": both_h_t, "d2h_both": both_d_t}
    factor_h, factor_d = alone_h.median_s / both_h, alone_d.median_s / both_d
    flagged = [f"{k}: {t.reason}" for k, t in timings.items() if t.flagged]
    return {"bytes": nbytes, "h2d_alone_s": alone_h.median_s, "d2h_alone_s": alone_d.median_s,
            "h2d_both_s": both_h, "d2h_both_s": both_d, "factor_h2d": factor_h, "factor_d2h": factor_d,
            "factor": float(min(1.0, (factor_h + factor_d) / 2)), "flagged": bool(flagged), "reason": "; ".join(flagged),
            "timings": {k: t.to_dict() for k, t in timings.items()}}


def _with_other_busy(f, other, device, repeats: int):
    """time_op of f on the measuring thread while a second thread (started before the pinning, so free to take the
    other core) calls `other` without pause."""
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            other()

    worker = threading.Thread(target=loop, daemon=True)
    worker.start()
    try:
        return time_op(f, device, repeats=repeats, inner=1)
    finally:
        stop.set()
        worker.join()


def _duplex_cuda(h2d, d2h, device, repeats: int):
    """H2D and D2H on two streams at once, the pair timed by time_op; each direction's median from its own events."""
    import torch

    s1, s2 = torch.cuda.Stream(device), torch.cuda.Stream(device)
    both_h, both_d = [], []

    def pair():
        e = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        with torch.cuda.stream(s1):
            e[0].record()
            h2d()
            e[1].record()
        with torch.cuda.stream(s2):
            e[2].record()
            d2h()
            e[3].record()
        torch.cuda.synchronize(device)
        both_h.append(e[0].elapsed_time(e[1]) * 1e-3)
        both_d.append(e[2].elapsed_time(e[3]) * 1e-3)

    timing = time_op(pair, device, warmup=1, repeats=repeats, inner=1)
    # the first call was time_op's warm-up: its per-direction times are left out
    return float(np.median(both_h[1:])), float(np.median(both_d[1:])), timing


class Rotation:
    """Calls fn(item) over a list of items in turn, so repeats do not hit the same (cached) memory."""

    def __init__(self, items, fn):
        self.items, self.fn, self.i = items, fn, 0

    def __call__(self):
        self.i += 1
        return self.fn(self.items[self.i % len(self.items)])


def device_copy(device, nbytes: int = 256 * MIB, repeats: int = 5) -> dict:
    """Device memory copy bandwidth (read + write counted), one large copy."""
    a, b = _dev(nbytes, device), _dev(nbytes, device)
    t = time_op(lambda: b.copy_(a), device, repeats=repeats, inner=1)
    return {"bytes": nbytes, **t.to_dict(), "gbps_read_write": 2 * nbytes / t.median_s / 1e9}


def gather_curve(device, model: ModelSpec, sizes=(MIB, 4 * MIB, 16 * MIB, 64 * MIB), repeats: int = 5) -> list[dict]:
    """Host gather of scattered KV rows (head_dim x dtype bytes each) into one contiguous buffer, the way the
    replay stages DDR-tier tokens: bytes gathered per second, and the read + write traffic."""
    import torch

    dtype, d = torch_dtype(model), model.head_dim
    row = d * model.dtype_bytes
    out = []
    gen = torch.Generator().manual_seed(0)
    for n in sizes:
        rows = max(1, n // row)
        src = torch.ones(rows * 2, d, dtype=dtype)  # half the rows are gathered, at random
        idx = torch.randperm(rows * 2, generator=gen)[:rows].sort().values
        dst = torch.empty(rows, d, dtype=dtype, pin_memory=device.type == "cuda")
        t = time_op(functools.partial(torch.index_select, src, 0, idx, out=dst), torch.device("cpu"), repeats=repeats)
        out.append({"bytes": rows * row, "row_bytes": row, **t.to_dict(), "gbps": rows * row / t.median_s / 1e9})
    return out


def link_gather_curve(device, model: ModelSpec, sizes=(MIB, 4 * MIB, 16 * MIB, 64 * MIB), repeats: int = 5) -> list[dict]:
    """CUDA only: the GPU gathering scattered KV rows straight from pinned host memory (the replay's pinned fetch,
    zero-copy through a UVA alias), bytes per second over the link. Empty where the alias is unavailable."""
    if device.type != "cuda":
        return []
    import torch

    dtype, d = torch_dtype(model), model.head_dim
    row = d * model.dtype_bytes
    out = []
    for n in sizes:
        rows = max(1, n // row)
        src = torch.ones(rows * 2, d, dtype=dtype, pin_memory=True)
        try:
            alias = uva_alias(src, device)
        except Exception as e:  # noqa: BLE001
            return [{"unavailable": str(e).splitlines()[0][:200]}]
        idx = torch.randperm(rows * 2, generator=torch.Generator().manual_seed(0))[:rows].sort().values.to(device)
        dst = torch.empty(rows, d, dtype=dtype, device=device)
        t = time_op(functools.partial(torch.index_select, alias, 0, idx, out=dst), device, repeats=repeats)
        out.append({"bytes": rows * row, "row_bytes": row, **t.to_dict(), "gbps": rows * row / t.median_s / 1e9})
    return out


# ---------------------------------------------------------------------------------------------
# Compute: the model's GEMM shapes, attention, whole layers
# ---------------------------------------------------------------------------------------------

def llc_bytes() -> int:
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            text = f.read().strip()
        return int(text[:-1]) * {"K": KIB, "M": MIB}.get(text[-1], 1) if text[-1] in "KM" else int(text)
    except (OSError, ValueError):
        return 64 * MIB


def copies_beyond_cache(nbytes: int, device, cap: int = 12) -> int:
    """How many copies of a weight set to rotate through so that repeats stream from memory, not cache."""
    cache = 64 * MIB if device.type == "cuda" else llc_bytes()
    return int(min(cap, max(2, math.ceil(3 * cache / max(1, nbytes)))))


def gemm_shapes(model: ModelSpec) -> dict[str, tuple[int, int]]:
    """(out, in) of each matmul weight of a layer, and the lm_head."""
    m = model
    return {"qkv": ((m.attention_heads + 2 * m.kv_heads) * m.head_dim, m.hidden),
            "o": (m.hidden, m.attention_heads * m.head_dim), "gate_up": (2 * m.intermediate, m.hidden),
            "down": (m.hidden, m.intermediate), "lm_head": (m.vocab, m.hidden)}


def gemm_sweep(device, model: ModelSpec, tokens=(1, 8, 64, 512), repeats: int = 5) -> list[dict]:
    """GEMM time and rate for each of the layer's weight shapes at several token counts."""
    import torch

    dtype, out = torch_dtype(model), []
    for name, (n_out, n_in) in gemm_shapes(model).items():
        nbytes = n_out * n_in * model.dtype_bytes
        weights = [torch.randn(n_out, n_in, device=device).to(dtype) for _ in range(copies_beyond_cache(nbytes, device, 4))]
        for m_tok in tokens:
            x = torch.randn(m_tok, n_in, device=device).to(dtype)
            t = time_op(Rotation(weights, functools.partial(_matmul_t, x)), device, repeats=repeats)
            flops = 2.0 * n_out * n_in * m_tok
            out.append({"gemm": name, "out": n_out, "in": n_in, "tokens": m_tok, "weight_bytes": nbytes, **t.to_dict(),
                        "tflops": flops / t.median_s / 1e12, "weight_gbps": nbytes / t.median_s / 1e9})
    return out


def _matmul_t(x, w):
    return x @ w.T


def _t0_chunks(model: ModelSpec, batch: int, kv_tokens: int, chunk: int, device, dtype):
    import torch

    f = -(-kv_tokens // chunk)
    shape = (f, batch * model.kv_heads, chunk, model.head_dim)
    return torch.randn(shape, device=device).to(dtype), torch.randn(shape, device=device).to(dtype), f


def attention_sweep(device, model: ModelSpec, batches=(1, 8), kv_lengths=(320, 1088, 4160), chunk: int = 0,
                    repeats: int = 5) -> list[dict]:
    """Decode attention (the replay's kernel) over a KV-length sweep: time, KV bytes read per second."""
    import torch

    dtype, m = torch_dtype(model), model
    chunk = chunk or DEFAULT_CHUNK
    g = m.attention_heads // m.kv_heads
    out = []
    for b in batches:
        for n in kv_lengths:
            kv_bytes = b * n * m.kv_bytes_per_token_layer
            pools = [_t0_chunks(m, b, n, chunk, device, dtype) for _ in range(copies_beyond_cache(kv_bytes, device, 6))]
            q = torch.randn(b * m.kv_heads, g, m.head_dim, device=device).to(dtype)
            valid = n - (pools[0][2] - 1) * chunk
            t = time_op(Rotation(pools, lambda pool, q=q, valid=valid: decode_attention(q, pool[0], pool[1], valid)),
                        device, repeats=repeats)
            flops = 4.0 * m.attention_heads * m.head_dim * b * n
            out.append({"batch": b, "kv_tokens": n, "kv_bytes": kv_bytes, **t.to_dict(),
                        "kv_gbps": kv_bytes / t.median_s / 1e9, "tflops": flops / t.median_s / 1e12})
            del pools
    return out


def layer_sweep(device, model: ModelSpec, points, repeats: int = 5) -> list[dict]:
    """Whole model-shaped decoder layers, the replay's own code (hw.kernels.layer_kernel): for each point
    (new tokens, sequences, KV tokens per sequence) RMSNorm, projections, KV write, attention over T0 chunks
    (decode) or causal SDPA (prefill, KV tokens 0) and the MLP. These points fit the cost model's layer time."""
    most = copies_beyond_cache(model.layer_weight_bytes, device, 8)
    weights = [LayerWeights.random(model, device, torch_dtype(model)) for _ in range(most)]
    out = []
    for tokens, batch, kv in points:
        kv_bytes = batch * kv * model.kv_bytes_per_token_layer
        copies = copies_beyond_cache(model.layer_weight_bytes + kv_bytes, device, most)
        while copies > 2 and copies * 2 * kv_bytes > 0.25 * mem_total_bytes():
            copies -= 1
        kernel = layer_kernel(model, device_name(device), tokens, batch, kv, copies, weights=weights)
        out.append({"tokens": tokens, "batch": batch, "kv_tokens": kv, "copies": copies,
                    **time_op(kernel, device, repeats=repeats).to_dict()})
    return out


def head_sweep(device, model: ModelSpec, tokens=(1, 8, 64), repeats: int = 5) -> list[dict]:
    """Final norm + lm_head, the replay's head."""
    copies = copies_beyond_cache(model.vocab * model.hidden * model.dtype_bytes, device, 4)
    return [{"tokens": n, **time_op(head_kernel(model, device_name(device), n, copies), device, repeats=repeats).to_dict()}
            for n in tokens]


def contention(device, model: ModelSpec, nbytes: int = 64 * MIB, repeats: int = 5) -> dict | None:
    """CPU only: a layer's matmuls with and without a concurrent copy thread (the replay's copy engine shares
    the memory system there; the cost model assumes compute and copies do not slow each other)."""
    if device.type == "cuda":
        return None
    import torch

    dtype = torch_dtype(model)
    copies = copies_beyond_cache(model.layer_weight_bytes, device)
    ws = [LayerWeights.random(model, device, dtype) for _ in range(copies)]
    x = torch.randn(8, model.hidden).to(dtype)
    run = Rotation(ws, functools.partial(mlp, x))
    alone = time_op(run, device, repeats=repeats)
    a, b = _host(nbytes, False, device), _host(nbytes, False, device)
    stop = threading.Event()

    def copier():
        while not stop.is_set():
            b.copy_(a)

    th = threading.Thread(target=copier, daemon=True)
    th.start()
    try:
        busy = time_op(run, device, repeats=repeats)
    finally:
        stop.set()
        th.join()
    return {"mlp_alone_s": alone.median_s, "mlp_with_copy_s": busy.median_s, "slowdown": busy.median_s / alone.median_s}


def _kv_lengths(chunks) -> tuple[int, ...]:
    """KV lengths half a chunk past whole chunks: the replay's sequences end anywhere in their last chunk."""
    return tuple(c * DEFAULT_CHUNK + DEFAULT_CHUNK // 2 for c in chunks)


def layer_points(quick: bool) -> list[tuple[int, int, int]]:
    """(new tokens, sequences, KV tokens per sequence) of the layer sweep: decode batches x KV lengths, plus
    prefill-sized token counts (which set the FLOP rate)."""
    batches = (1, 4, 16) if quick else (1, 4, 16, 64)
    lengths = _kv_lengths((1, 8) if quick else (1, 4, 16, 32))
    points = [(b, b, n) for b in batches for n in lengths]
    points += [(256, 1, 0), (1024, 1, 0)] if quick else [(128, 1, 0), (512, 1, 0), (1024, 1, 0)]
    return points


def copy_mechanisms(dev, model: ModelSpec, quick: bool, reps: int) -> dict:
    """The copy mechanisms' benchmarks (hw/copy_bench.py), shortened with `quick`: `copy_mechanisms` (time against
    piece size and count per mechanism), `interference` (a copy beside a GEMM and attention), `host_gather_threads`."""
    if quick:
        curves = mechanism_curves(dev, sizes=(256, 4 * KIB, 64 * KIB, MIB), counts=(1, 16, 256), total_bytes=MIB,
                                  max_pieces=1024, repeats=reps, budget_s=0.2)
        beside = interference(dev, model, nbytes=4 * MIB, tokens=64, kv_tokens=1088, repeats=2, span_s=0.02)
        threads = host_gather_threads(model, nbytes=4 * MIB, pinned=dev.type == "cuda", repeats=reps)
    else:
        curves = mechanism_curves(dev, repeats=reps)
        beside = interference(dev, model, repeats=reps)
        threads = host_gather_threads(model, pinned=dev.type == "cuda", repeats=reps)
    return {"copy_mechanisms": curves, "interference": beside, "host_gather_threads": threads}


def measure(device: str, model: ModelSpec, quick: bool = False, layers: bool = True) -> dict:
    """Every microbenchmark of `calibrate`, as a JSON-ready dict (times in seconds, sizes in bytes); without
    `layers`, the whole-layer and head sweeps are left to the caller (hw/calibrate.py measures them interleaved
    across shapes)."""
    dev = resolve_device(device)
    wall = time.perf_counter()
    reps = 3 if quick else 7
    sizes = COPY_SIZES if not quick else COPY_SIZES[::2]
    raw = {"device": device_info(dev), "model": model.to_dict(), "quick": quick}
    scope = cpu_threads(1) if dev.type == "cpu" else contextlib.nullcontext()
    with scope:
        raw["copies"] = {f"{d}_{'pinned' if p else 'pageable'}": copy_curve(dev, d, p, sizes, reps)
                         for d in ("h2d", "d2h") for p in (True, False)}
        raw["duplex"] = duplex(dev, 16 * MIB if quick else 64 * MIB, reps)
        raw["device_copy"] = device_copy(dev, 64 * MIB if quick else 256 * MIB, reps)
        gather_sizes = (MIB, 4 * MIB, 16 * MIB) if quick else (256 * KIB, MIB, 4 * MIB, 16 * MIB)
        raw["gather"] = gather_curve(dev, model, gather_sizes, reps)
        raw["link_gather"] = link_gather_curve(dev, model, gather_sizes, reps)
        raw.update(copy_mechanisms(dev, model, quick, reps))
        raw["gemm"] = gemm_sweep(dev, model, (1, 8, 256) if quick else (1, 8, 64, 512), reps)
        raw["attention"] = attention_sweep(dev, model, (1, 8) if quick else (1, 8, 32),
                                           _kv_lengths((2, 16) if quick else (2, 8, 32)), repeats=reps)
        if layers:
            raw["layers"] = layer_sweep(dev, model, layer_points(quick), repeats=reps)
            raw["head"] = head_sweep(dev, model, (1, 16) if quick else (1, 8, 64), reps)
        raw["contention"] = contention(dev, model, 16 * MIB if quick else 64 * MIB, reps)
    raw["wall_s"] = time.perf_counter() - wall
    return raw


# DeviceError and resolve_device live in hw/device.py; re-exported because the CLI imports them from here.
__all__ = ["COPY_SIZES", "DeviceError", "Rotation", "Timing", "attention_sweep", "contention", "copies_beyond_cache",
           "copy_curve", "copy_mechanisms", "device_copy", "duplex", "gather_curve", "gemm_shapes", "gemm_sweep",
           "head_sweep", "layer_points", "layer_sweep", "link_gather_curve", "llc_bytes", "measure", "resolve_device",
           "time_op"]
