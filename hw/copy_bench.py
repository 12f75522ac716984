"""Microbenchmarks of the copy mechanisms (hw/copies.py): copy time against piece size and piece count for each
mechanism, a copy running beside a GEMM and beside attention (who slows whom), and the host gather rate by threads.

Every mechanism benchmark moves N scattered pieces of S bytes out of a host pool of 2N pieces (every other piece, at
random) into one staging buffer on the device through the replay's own copy engine (hw/copies.Copier.stage on a
StagedSet, `ReplayPieces`): the same per-piece views, strided copies, landing buffer and reorder the replay issues,
so that the per-piece cost fitted here is the one the validation measures. (Before 2026-12-01 a bespoke loop of
one contiguous copy per piece was timed: on the CPU device it cost ~5 us a piece against 10-18 us a piece in the
replay's path, and the suite's `dma` configurations were under-predicted by 17-25%.) On `--device cpu` the "device" is
host memory: dma is a loop of host memcpys, dma-batched one fused gather, host-gather a gather into a bounce buffer
then a copy; gather-kernel needs CUDA and is left out. Results go into `measure`'s raw dict under
`copy_mechanisms`, `interference` and `host_gather_threads` for the calibration fit.
"""

from __future__ import annotations

import functools
import os
import threading
import time

import numpy as np

from tiersim.hw.copies import COPY_METHODS, CPU_METHODS
from tiersim.hw.device import uva_alias
from tiersim.hw.kernels import decode_attention, torch_dtype
from tiersim.hw.streams import cpu_threads
from tiersim.hw.timing import time_op
from tiersim.specs import ModelSpec

KIB, MIB = 1 << 10, 1 << 20
PIECE_SIZES = tuple(256 * 4**i for i in range(10))  # 256 B .. 64 MiB
PIECE_COUNTS = (1, 16, 256, 4096)
GATE_CYCLES = 300_000_000  # spin kernel holding both streams while the host enqueues (~0.15 s at ~2 GHz)


def methods_for(device) -> tuple[str, ...]:
    """The mechanisms this device runs."""
    return COPY_METHODS if device.type == "cuda" else CPU_METHODS


class PieceCopy:
    """N pieces of S bytes scattered in a host pool of 2N pieces (every other piece, at random), gathered into one
    host buffer by one fused index_select: the host side of host-gather, timed by threads (`host_gather_threads`)."""

    def __init__(self, piece_bytes: int, pieces: int, seed: int = 0):
        import torch

        self.S, self.N = piece_bytes, pieces
        cols = piece_bytes // 2
        self.src = torch.ones(2 * pieces, cols, dtype=torch.int16)
        idx = np.sort(np.random.default_rng(seed).permutation(2 * pieces)[:pieces])
        self.idx = torch.as_tensor(idx, dtype=torch.int64)
        self.dst = torch.empty(pieces, cols, dtype=torch.int16)

    @property
    def nbytes(self) -> int:
        """Bytes one gather moves."""
        return self.S * self.N

    def gather(self) -> None:
        """Every piece into `dst`, in one call."""
        import torch

        torch.index_select(self.src, 0, self.idx, out=self.dst)


class ReplayPieces:
    """N pieces of S bytes staged by the replay's copy engine: a host pool (pinned on CUDA) of 2N pieces in the
    replay's layout (KV rows of ROW_DIM elements, KV_HEADS rows a token, token-major), every other piece taken at
    random, one slot per piece, staged into the [head, token] order the attention reads (hw/copies.Copier.stage).
    A piece smaller than one token's rows is one token."""

    KV_HEADS, ROW_DIM = 2, 64  # float16 rows of 128 B, 256 B a token

    def __init__(self, device, piece_bytes: int, pieces: int, seed: int = 0):
        import torch

        self.device, self.cuda = device, device.type == "cuda"
        kvh, d, self.dtype = self.KV_HEADS, self.ROW_DIM, torch.float16
        n = max(1, piece_bytes // (kvh * d * 2))  # tokens a piece
        self.S, self.N = n * kvh * d * 2, pieces
        pick = np.sort(np.random.default_rng(seed).permutation(2 * pieces)[:pieces])
        src = pick * n * kvh  # host row of each piece's first token
        row = np.arange(pieces) * n * kvh  # staging row of each piece's slot
        table = np.stack([src, np.full(pieces, n), row, np.full(pieces, n), np.zeros(pieces, np.int64)], axis=1)
        h, t = np.meshgrid(np.arange(kvh), np.arange(n), indexing="ij")
        self.gather = (src[:, None] + (t * kvh + h).ravel()[None, :]).ravel().astype(np.int64)
        self.table = table.astype(np.int64)
        self.host = torch.ones(2 * pieces * n * kvh, d, dtype=self.dtype, pin_memory=self.cuda)
        self.out = torch.empty(pieces * n * kvh, d, dtype=self.dtype, device=device)
        self.alias = None
        if self.cuda:
            try:
                self.alias = uva_alias(self.host, device)
            except Exception:  # noqa: BLE001 - the gather kernel is then unavailable (reported as such)
                self.alias = None

    @property
    def nbytes(self) -> int:
        """Bytes one copy moves."""
        return self.S * self.N

    @classmethod
    def bounce_bytes(cls) -> int:
        """The pinned bounce chunk host-gather fills before each copy here: the replay's BOUNCE_ROWS rows of this
        benchmark's KV rows (hw/copies.Copier)."""
        from tiersim.hw.memory import BOUNCE_ROWS

        return BOUNCE_ROWS * cls.ROW_DIM * 2

    def staged_set(self):
        """The pieces as the replay's StagedSet (one per mechanism: `prepare` builds the index tensors its mechanism
        needs, once)."""
        from tiersim.hw.copies import StagedSet

        return StagedSet(self.gather, self.table, 0, self.KV_HEADS, parts=1)

    def copier(self, method: str):
        """The replay's copy engine for `method`, its buffers sized for these pieces (one step)."""
        from tiersim.hw.copies import Copier

        return Copier(method, self.device, self.dtype, self.ROW_DIM, self.KV_HEADS, len(self.gather), 1, parts=1)

    def fn(self, method: str):
        """A callable staging every piece by `method` as the replay does (None where the device cannot run it)."""
        if method == "gather-kernel" and self.alias is None:
            return None
        copier, staged = self.copier(method), self.staged_set()
        staged.prepare(method, self.device)
        return lambda: copier.stage(0, self.host, self.alias, staged, self.out)


def _point(device, method: str, S: int, N: int, repeats: int, budget_s: float) -> dict:
    pc = ReplayPieces(device, S, N)
    fn = pc.fn(method)
    if fn is None:
        return {"method": method, "piece_bytes": S, "pieces": N, "unavailable": "no zero-copy UVA alias here"}
    t = time_op(fn, device, repeats=repeats, budget_s=budget_s)
    return {"method": method, "piece_bytes": pc.S, "pieces": N, "bytes": pc.nbytes, **t.to_dict(),
            "gbps": pc.nbytes / t.median_s / 1e9, "us_per_piece": t.median_s / N * 1e6}


def mechanism_curves(device, sizes=PIECE_SIZES, counts=PIECE_COUNTS, total_bytes: int = 16 * MIB,
                     max_pieces: int = 4096, count_piece_bytes: int = 16 * KIB, repeats: int = 5,
                     budget_s: float = 2.0) -> dict:
    """Per mechanism: copy time against piece size (N = total_bytes / S pieces, at most `max_pieces`, at least
    1) and against piece count (pieces of `count_piece_bytes`); a noisy point is re-measured for at most
    `budget_s`, then flagged."""
    out = {}
    for method in methods_for(device):
        by_size = [_point(device, method, S, int(min(max_pieces, max(1, total_bytes // S))), repeats, budget_s)
                   for S in sizes]
        by_count = [_point(device, method, count_piece_bytes, N, repeats, budget_s) for N in counts]
        out[method] = {"by_size": by_size, "by_count": by_count}
    return out


def _concurrent_cuda(copy, work, n_copy: int, n_work: int) -> tuple[float, float]:
    """Seconds per call of `copy` on a side stream (issued from a second host thread, since host-gather blocks its
    thread) and `work` on the current stream, started together: both streams wait behind a spin kernel
    (GATE_CYCLES) while the hosts enqueue, so a copy issued piece by piece does not start long before the work."""
    import torch

    side, main = torch.cuda.Stream(), torch.cuda.current_stream()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
    gate = torch.cuda.Event()
    torch.cuda.synchronize()
    torch.cuda._sleep(GATE_CYCLES)
    gate.record(main)
    side.wait_event(gate)

    def copies():
        with torch.cuda.stream(side):
            events[0].record()
            for _ in range(n_copy):
                copy()
            events[1].record()

    th = threading.Thread(target=copies)
    th.start()
    events[2].record()
    for _ in range(n_work):
        work()
    events[3].record()
    th.join()
    torch.cuda.synchronize()
    return events[0].elapsed_time(events[1]) * 1e-3 / n_copy, events[2].elapsed_time(events[3]) * 1e-3 / n_work


def _concurrent_cpu(copy, work, n_copy: int, n_work: int) -> tuple[float, float]:
    """Seconds per call of `copy` in a second thread and `work` in this one, started together."""
    times, start = {}, threading.Barrier(2)

    def loop(name, fn, n):
        start.wait()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        times[name] = (time.perf_counter() - t) / n

    th = threading.Thread(target=loop, args=("copy", copy, n_copy))
    th.start()
    loop("work", work, n_work)
    th.join()
    return times["copy"], times["work"]


def _workloads(device, model: ModelSpec, tokens: int, kv_tokens: int) -> dict:
    """A GEMM of the layer's MLP shape over `tokens` tokens, and decode attention over `kv_tokens` per sequence."""
    import torch

    dtype, m = torch_dtype(model), model
    w = torch.randn(2 * m.intermediate, m.hidden, device=device).to(dtype)
    x = torch.randn(tokens, m.hidden, device=device).to(dtype)
    chunk = 128
    f = -(-kv_tokens // chunk)
    batch = 8
    k = torch.randn(f, batch * m.kv_heads, chunk, m.head_dim, device=device).to(dtype)
    v = torch.randn_like(k)
    q = torch.randn(batch * m.kv_heads, m.attention_heads // m.kv_heads, m.head_dim, device=device).to(dtype)
    return {"gemm": lambda: x @ w.T,
            "attention": functools.partial(decode_attention, q, k, v, kv_tokens - (f - 1) * chunk)}


def interference(device, model: ModelSpec, piece_bytes: int = 16 * KIB, nbytes: int = 64 * MIB,
                 tokens: int = 256, kv_tokens: int = 4160, repeats: int = 5, span_s: float = 0.05) -> list[dict]:
    """Each mechanism's copy beside a GEMM and beside attention: each one's time alone and together, and the
    slowdowns (together / alone). On CPU the copy runs in a second thread (each on one torch thread) for about
    `span_s` per repeat; on CUDA on a side stream, 3 copies beside as many calls as take as long."""
    pc = ReplayPieces(device, piece_bytes, max(1, nbytes // piece_bytes))
    works = _workloads(device, model, tokens, kv_tokens)
    together = _concurrent_cuda if device.type == "cuda" else _concurrent_cpu
    out = []
    for name, work in works.items():
        work_alone = time_op(work, device, repeats=repeats, budget_s=2.0).median_s
        for method in methods_for(device):
            copy = pc.fn(method)
            if copy is None:
                continue
            copy_alone = time_op(copy, device, repeats=repeats, inner=1, budget_s=2.0).median_s
            n_copy = max(2, int(round(span_s / copy_alone))) if device.type == "cpu" else 3
            n_work = max(2, int(round(n_copy * copy_alone / work_alone)))
            pairs = [together(copy, work, n_copy, n_work) for _ in range(repeats)]
            copy_both, work_both = (float(np.median([p[i] for p in pairs])) for i in (0, 1))
            out.append({"method": method, "with": name, "piece_bytes": piece_bytes, "bytes": pc.nbytes,
                        "copy_alone_s": copy_alone, "copy_together_s": copy_both, "work_alone_s": work_alone,
                        "work_together_s": work_both, "copy_slowdown": copy_both / copy_alone,
                        "work_slowdown": work_both / work_alone})
    return out


def host_gather_threads(model: ModelSpec, block_size: int = 16, nbytes: int = 64 * MIB, pinned: bool = False,
                        repeats: int = 5, threads=None) -> list[dict]:
    """Host gather rate of scattered K blocks (block_size x kv_heads x head_dim) by torch threads: 1, 2, 4, ...
    up to the cores (the host side of host-gather; bytes gathered per second)."""
    import torch

    piece = block_size * model.kv_heads * model.head_dim * model.dtype_bytes
    pc = PieceCopy(piece, max(1, nbytes // piece))
    if pinned:
        pc.dst = pc.dst.pin_memory()
    cores = os.cpu_count() or 1
    threads = threads or sorted({min(cores, 2**i) for i in range(int(np.log2(cores)) + 1)} | {cores})
    out = []
    for n in threads:
        with cpu_threads(n):
            t = time_op(pc.gather, torch.device("cpu"), repeats=repeats, budget_s=2.0)
        out.append({"threads": n, "piece_bytes": piece, "bytes": pc.nbytes, **t.to_dict(),
                    "gbps": pc.nbytes / t.median_s / 1e9})
    return out


__all__ = ["PIECE_COUNTS", "PIECE_SIZES", "PieceCopy", "ReplayPieces", "host_gather_threads", "interference", "mechanism_curves",
           "methods_for"]
