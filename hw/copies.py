"""The copy mechanisms on the device side: how a layer's DDR-tier pieces reach its staging buffer, and what each
step moved (pieces, bytes, copy calls), counted where the copies are issued.

A piece is a run of consecutive positions inside one KV block of `block_size` tokens, for K or for V of one
layer (the simulator's unit: with the tiering unit equal to the block, a piece is a whole block). The host
pool follows the block layout (per layer, per slot, [position, kv head, head_dim], so a piece is contiguous);
the staging buffer is in the order the replay's attention reads (per slot [kv head, token, head_dim]).

| mechanism     | CUDA                                                       | CPU (the host stands in for the device) |
|---------------|------------------------------------------------------------|-----------------------------------------|
| dma           | one `copy_` (cudaMemcpyAsync) per piece into a landing      | one `copy_` per piece, straight into    |
|               | buffer, then one device reorder kernel per layer            | the staging buffer                      |
| dma-batched   | one `copy_` per contiguous run of pieces (adjacent blocks   | one fused index_select of all pieces    |
|               | coalesced; torch has no batched memcpy), then the reorder   |                                         |
| gather-kernel | index_select over a zero-copy UVA alias of the pinned pool  | refused: no mapped memory, no GPU       |
| host-gather   | CPU gather into two pinned bounce buffers, one DMA per      | gather into a bounce buffer, then a     |
|               | chunk, the next chunk gathered while the last is on the link | copy into the staging buffer           |
| pageable      | (--pageable) gather into a new pageable tensor, then copy   | the same, host to host                  |

torch is imported inside the functions, so `import tiersim.hw.copies` needs no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tiersim import check
from tiersim.copy_methods import AUTO, COPY_METHOD_CHOICES, CPU_METHODS, PAGEABLE, PINNED_METHODS
from tiersim.errors import ConfigError

# The names come from tiersim/copy_methods.py (shared with the simulator); these spellings stay for hw/ callers.
COPY_METHODS: tuple[str, ...] = PINNED_METHODS  # mechanism names a replay on CUDA runs
COPY_CHOICES: tuple[str, ...] = COPY_METHOD_CHOICES
PIECE_COLUMNS = ("src_row", "tokens", "stage_row", "slot_tokens", "slot_index")  # columns of a piece table


def check_copy_method(method: str, cuda: bool) -> None:
    """Refuse an unknown mechanism, or one this device cannot run, naming the field and what is accepted."""
    check.choice("copy_method", method, COPY_CHOICES)
    if not cuda and method not in (*CPU_METHODS, AUTO):
        raise ConfigError("copy_method", f"copy_method {method!r} needs a CUDA device (a GPU kernel reading mapped "
                                         f"pinned host memory); accepted on cpu: {', '.join((*CPU_METHODS, AUTO))}")


def check_block_size(block_size: int, chunk_tokens: int) -> None:
    """Blocks and T0 chunks must nest (one divides the other), so a T0 chunk holds whole blocks or vice versa."""
    check.integer("block_size", block_size, 1)
    if chunk_tokens % block_size and block_size % chunk_tokens:
        raise ConfigError("block_size", f"block_size {block_size} does not divide into the T0 chunk layout of "
                                        f"chunk_tokens {chunk_tokens}; accepted: a divisor or a multiple of "
                                        f"{chunk_tokens}")


def resolve_method(method: str, cuda: bool, pinned: bool, uva: bool) -> str:
    """The mechanism that runs: `pageable` for pageable host memory; `auto` is the replay's long-standing choice
    (CUDA: the zero-copy gather kernel where the UVA alias maps, else host gather; CPU: one fused gather)."""
    if not pinned:
        return PAGEABLE
    if method != AUTO:
        return method
    if not cuda:
        return "dma-batched"
    return "gather-kernel" if uva else "host-gather"


def block_runs(positions: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pieces of a sorted position set: (first position, tokens, index of the first in the set) of each maximal run
    of consecutive positions that stays inside one block."""
    pos = np.asarray(positions, dtype=np.int64)
    if len(pos) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    starts = np.ones(len(pos), dtype=bool)
    starts[1:] = (np.diff(pos) != 1) | (pos[1:] % block_size == 0)
    first = np.flatnonzero(starts)
    return pos[first], np.diff(np.append(first, len(pos))), first


def piece_count(positions: np.ndarray, block_size: int) -> int:
    """Pieces (per layer, for K or for V) that a sorted position set makes in blocks of `block_size` tokens."""
    return len(block_runs(np.sort(np.asarray(positions)), block_size)[0])


def coalesce(src: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge copies whose source rows follow each other (their destinations, in the same order, do too):
    (start row, rows) of each contiguous run."""
    if len(src) == 0:
        return src, rows
    joins = np.ones(len(src), dtype=bool)
    joins[1:] = src[1:] != src[:-1] + rows[:-1]
    first = np.flatnonzero(joins)
    return src[first], np.add.reduceat(rows, first)


@dataclass(slots=True)
class StagedSet:
    """The DDR-tier tokens a step stages in every layer: host rows in staging order and the pieces they form.

    Steps whose slots stage the same positions share one set (and its device-side index tensors)."""

    gather: np.ndarray  # host-pool rows in staging order: K rows, then V rows (K rows + v_offset)
    pieces: np.ndarray  # (pieces, 5) int64, PIECE_COLUMNS: K source row, tokens, slot's staging row, its tokens, index
    v_offset: int  # host-pool row offset of V
    kv_heads: int
    parts: int = 2  # K and V; 1: MLA's one latent (gather holds K rows only)
    gather_host: object = None  # `gather` as a host index tensor (set by `prepare`)
    gather_dev: object = None  # `gather` on the device (gather kernel)
    copies: tuple | None = None  # CUDA dma: (source rows, row counts) of every piece, K then V
    runs: tuple | None = None  # CUDA dma-batched: the same after coalescing contiguous sources
    reorder_dev: object = None  # CUDA dma paths: staging row <- landing row

    @property
    def piece_list(self) -> list[tuple[int, ...]]:
        """The piece table as Python tuples (the per-piece loop)."""
        return [tuple(r) for r in self.pieces.tolist()]

    def landing_order(self) -> np.ndarray:
        """For each staging row, its row in a landing buffer that holds the pieces in table order, K then V."""
        kvh, R = self.kv_heads, len(self.gather) // self.parts
        k = np.empty(R, dtype=np.int64)
        slots = np.unique(self.pieces[:, 2:4], axis=0)  # (staging row, tokens) of each slot
        for row, s in slots.tolist():
            h, j = np.meshgrid(np.arange(kvh), np.arange(s), indexing="ij")
            k[row: row + kvh * s] = (row + j * kvh + h).ravel()
        return np.concatenate([k, k + R][: self.parts])

    def source_copies(self) -> tuple[np.ndarray, np.ndarray]:
        """(source row, rows) of every piece's contiguous copy: K pieces, then V pieces."""
        src, rows = self.pieces[:, 0], self.pieces[:, 1] * self.kv_heads
        return np.concatenate([src, src + self.v_offset][: self.parts]), np.concatenate([rows, rows][: self.parts])

    def prepare(self, method: str, device) -> None:
        """Index tensors the mechanism needs, built once per set (host ones on the host, the rest on the device)."""
        import torch

        if self.gather_host is not None:
            return
        self.gather_host = torch.as_tensor(self.gather, dtype=torch.int64)
        if device.type != "cuda":
            return
        if method == "gather-kernel":
            self.gather_dev = self.gather_host.to(device)
        if method in ("dma", "dma-batched"):
            src, rows = self.source_copies()
            if method == "dma-batched":
                src, rows = coalesce(src, rows)
            self.copies = (src.tolist(), rows.tolist())
            self.reorder_dev = torch.as_tensor(self.landing_order(), dtype=torch.int64, device=device)


@dataclass(slots=True)
class StepCopies:
    """Per step, what the copy engine moved: pieces (per layer, K and V separately), bytes and copy calls issued;
    host to device (staged and promoted KV) and device to host (demoted KV)."""

    h2d_pieces: np.ndarray
    h2d_bytes: np.ndarray
    h2d_calls: np.ndarray
    d2h_pieces: np.ndarray
    d2h_bytes: np.ndarray

    @classmethod
    def zeros(cls, steps: int) -> StepCopies:
        """Nothing moved yet in any of `steps` steps."""
        return cls(*(np.zeros(steps, dtype=np.int64) for _ in range(5)))

    def summary(self) -> dict:
        """Means per step."""
        return {f"{name}_per_step": float(getattr(self, name).mean()) if len(self.h2d_pieces) else 0.0
                for name in ("h2d_pieces", "h2d_bytes", "h2d_calls", "d2h_pieces", "d2h_bytes")}


class Copier:
    """The replay's copy engine: stages a layer's pieces into a staging buffer by one mechanism, moves a re-tier's
    demotions and promotions, and counts what moved per step.

    Buffers (bounce, landing, demotion and promotion) are allocated once here and reused every layer and step;
    each reuse waits for the copy that last read the buffer (an event on CUDA), never for the whole device.
    """

    def __init__(self, method: str, device, dtype, head_dim: int, kv_heads: int, rows_max: int, steps: int,
                 demote_rows: int = 0, promote_rows: int = 0, pinned: bool = True, parts: int = 2):
        import torch

        from tiersim.hw.memory import BOUNCE_ROWS  # here: hw.memory imports hw.config, which imports this module

        self.method, self.device, self.d, self.kvh = method, device, head_dim, kv_heads
        self.parts = parts  # K and V (2), or MLA's one latent (1): v0 is None in demote/promote
        self.cuda = device.type == "cuda"
        self.row_bytes = head_dim * torch.empty(0, dtype=dtype).element_size()
        self.counts = StepCopies.zeros(steps)
        rows = max(1, parts * rows_max)
        self.bounce = [torch.empty(min(BOUNCE_ROWS, rows), head_dim, dtype=dtype, pin_memory=self.cuda)
                       for _ in range(2 if self.cuda else 1)] if method == "host-gather" else []
        self._bounce_done: list = [None, None]  # events: the DMA that last read each bounce buffer
        self.landing = torch.empty(rows, head_dim, dtype=dtype, device=device) \
            if self.cuda and method in ("dma", "dma-batched") else None
        # re-tier traffic: a device-side buffer, and on CUDA a pinned host one the DMA reads or writes
        self.demote_dev = torch.empty(parts * demote_rows, head_dim, dtype=dtype, device=device) if demote_rows else None
        self.demote_host = torch.empty(parts * demote_rows, head_dim, dtype=dtype, pin_memory=True) \
            if demote_rows and self.cuda and pinned else None
        self.promote_dev = torch.empty(parts * promote_rows, head_dim, dtype=dtype, device=device) \
            if promote_rows else None
        self.promote_host = torch.empty(parts * promote_rows, head_dim, dtype=dtype, pin_memory=pinned) \
            if promote_rows and self.cuda else None
        self._promote_done = None  # event: the DMA that last read promote_host

    def reset(self, steps: int) -> None:
        """Clear the counters (a replay run starts)."""
        self.counts = StepCopies.zeros(steps)

    def count(self, k: int, direction: str, pieces: int, nbytes: int, calls: int = 0) -> None:
        """Add a copy of step k to the counters."""
        c = self.counts
        if direction == "h2d":
            c.h2d_pieces[k] += pieces
            c.h2d_bytes[k] += nbytes
            c.h2d_calls[k] += calls
        else:
            c.d2h_pieces[k] += pieces
            c.d2h_bytes[k] += nbytes

    def stage(self, k: int, host, host_uva, staged: StagedSet, out) -> None:
        """Bring step k's staged pieces of one layer from `host` (its pool) into `out` by the mechanism."""
        out = out[: len(staged.gather)]
        calls = getattr(self, "_" + self.method.replace("-", "_"))(host, host_uva, staged, out)
        self.count(k, "h2d", staged.parts * len(staged.pieces), out.numel() * out.element_size(), calls)

    def demote(self, k: int, k0, v0, host, t0_rows, host_rows, pieces: int) -> None:
        """Copy demoted tokens of one layer from T0 (flat K and V views) into the host pool: gather on the device,
        one DMA into the pinned buffer, then the host scatters them into their blocks (it must wait for the DMA)."""
        import torch

        n, parts = len(t0_rows), self.parts
        dev = self.demote_dev[: parts * n]
        torch.index_select(k0, 0, t0_rows, out=dev[:n])
        if parts == 2:
            torch.index_select(v0, 0, t0_rows, out=dev[n:])
        if self.cuda:
            if self.demote_host is None:  # pageable host memory: a staged copy, synchronous by nature
                data = dev.cpu()
            else:
                data = self.demote_host[: parts * n]
                data.copy_(dev, non_blocking=True)
                done = torch.cuda.Event()
                done.record()
                done.synchronize()
            dev = data
        host.index_copy_(0, host_rows, dev)
        self.count(k, "d2h", parts * pieces, dev.numel() * dev.element_size())

    def promote(self, k: int, k0, v0, host, host_rows, t0_rows, pieces: int) -> None:
        """Copy promoted tokens of one layer from the host pool into T0 (flat K and V views): the host gathers them
        into the pinned buffer (once the last DMA from it is done), one DMA, then a device scatter into T0."""
        import torch

        n, parts = len(t0_rows), self.parts
        data = self.promote_dev[: parts * n]
        if self.cuda:
            if self._promote_done is not None:
                self._promote_done.synchronize()
            staged = self.promote_host[: parts * n]
            torch.index_select(host, 0, host_rows, out=staged)
            data.copy_(staged, non_blocking=staged.is_pinned())
            self._promote_done = torch.cuda.Event()
            self._promote_done.record()
        else:
            torch.index_select(host, 0, host_rows, out=data)
        k0.index_copy_(0, t0_rows, data[:n])
        if parts == 2:
            v0.index_copy_(0, t0_rows, data[n:])
        self.count(k, "h2d", parts * pieces, data.numel() * data.element_size(), 1)

    def _pageable(self, host, host_uva, st: StagedSet, out) -> int:
        out.copy_(host.index_select(0, st.gather_host))  # the paper's prototype: a new pageable tensor, then a copy
        return 1

    def _gather_kernel(self, host, host_uva, st: StagedSet, out) -> int:
        import torch

        torch.index_select(host_uva, 0, st.gather_dev, out=out)  # the GPU reads pinned host memory over the link
        return 1

    def _dma_batched(self, host, host_uva, st: StagedSet, out) -> int:
        import torch

        if not self.cuda:  # host to host: one fused gather of every piece
            torch.index_select(host, 0, st.gather_host, out=out)
            return 1
        return self._land(host, st, out)

    def _dma(self, host, host_uva, st: StagedSet, out) -> int:
        if self.cuda:
            return self._land(host, st, out)
        d, kvh, R = self.d, self.kvh, len(out) // st.parts
        pieces = st.piece_list
        for src, n, row, s, j in pieces:
            for part, shift in ((0, 0), (R, st.v_offset))[: st.parts]:  # K, then V: separate pieces
                dst = out[part + row: part + row + kvh * s].view(kvh, s, d)[:, j: j + n]
                dst.copy_(host[shift + src: shift + src + n * kvh].view(n, kvh, d).transpose(0, 1))
        return st.parts * len(pieces)

    def _land(self, host, st: StagedSet, out) -> int:
        """CUDA: one contiguous pinned-to-device copy (cudaMemcpyAsync) per (source row, rows) into the landing
        buffer, then one reorder kernel into the attention's layout (all on the copy stream, so the landing buffer
        is free again when the next layer's copies start)."""
        import torch

        land, at = self.landing, 0
        for src, rows in zip(*st.copies):
            land[at: at + rows].copy_(host[src: src + rows], non_blocking=True)
            at += rows
        torch.index_select(land[:at], 0, st.reorder_dev, out=out)
        return len(st.copies[0])

    def _host_gather(self, host, host_uva, st: StagedSet, out) -> int:
        import torch

        rows, n, chunk = st.gather_host, len(st.gather), len(self.bounce[0])
        calls = 0
        for i, start in enumerate(range(0, n, chunk)):
            part = rows[start: start + chunk]
            bounce = self.bounce[i % len(self.bounce)][: len(part)]
            if not self.cuda:
                torch.index_select(host, 0, part, out=bounce)
                out[start: start + len(part)].copy_(bounce)
            else:  # gather chunk i+1 on the host while chunk i is on the link
                done = self._bounce_done
                if done[i % 2] is not None:
                    done[i % 2].synchronize()
                torch.index_select(host, 0, part, out=bounce)
                out[start: start + len(part)].copy_(bounce, non_blocking=True)
                done[i % 2] = torch.cuda.Event()
                done[i % 2].record()
            calls += 1
        return calls


__all__ = ["COPY_CHOICES", "COPY_METHODS", "CPU_METHODS", "PIECE_COLUMNS", "StagedSet", "Copier", "StepCopies",
           "block_runs", "check_block_size", "check_copy_method", "coalesce", "piece_count", "resolve_method"]
