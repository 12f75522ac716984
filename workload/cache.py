"""On-disk reuse of TierSchedules: the policy over a trace request does not depend on hardware or batch.

A sweep over GPUs, batch sizes and strategies replays the same (request, policy, length, seed)
again and again; replay is O(steps x tokens), the rest of a simulation O(steps x layers). Entries
are keyed by the request's own checksums in the trace header, every policy knob, the generated
length, the seed, the synthetic-extension parameters and the tiersim version, so a changed input
never hits a stale entry. Fits of the synthetic generator to a trace (used to extend its requests)
are kept the same way, keyed by the trace's content.

The store is a `diskcache` directory (SQLite index, process-safe, so sweep workers share it) bounded
at TIERSIM_CACHE_MAX_GB (default 2 GB): past it, the entries stored longest ago go first. Values
are .npz or JSON bytes, never pickles. TIERSIM_CACHE_DIR moves the cache (empty: the default place),
TIERSIM_CACHE=0 turns it off. An unreadable entry is recomputed and rewritten, never trusted; a
cache that cannot be opened (read-only home, full disk) only costs the reuse.

Within a process the store stays open (opening and closing SQLite cost ~10 ms a call, and a simulation
with its comparison reads it eight times), and decoded schedules are remembered beside the bytes they
came from: an entry whose stored bytes are unchanged is not decoded again, so later workloads over the
same schedules can be reused whole (workload/build.py). The bytes are still read every time, so what
the store holds is what a run gets. `forget()` drops what the process remembers.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sqlite3
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import diskcache
import numpy as np

from tiersim import check
from tiersim.errors import ConfigError
from tiersim.policy import PolicyConfig, TierSchedule
from tiersim.traces.format import Trace
from tiersim.traces.synth import SynthParams
from tiersim.version import __version__

GB = 1e9
DEFAULT_MAX_GB = 2.0
STORE = "store"  # the diskcache folder under the cache root
_LEGACY = (("schedules", "*.npz"), ("fits", "*.json"))  # unbounded per-entry files of earlier versions
_SCHEDULE, _FIT = "schedule/", "fit/"
_UNREADABLE = (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile)
_STORE_FAILED = (OSError, sqlite3.Error, diskcache.Timeout)  # a locked, full or read-only store costs only the reuse


def cache_root() -> Path | None:
    """The cache's root folder, or None when caching is off (TIERSIM_CACHE=0)."""
    if os.environ.get("TIERSIM_CACHE", "1") == "0":
        return None
    root = os.environ.get("TIERSIM_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tiersim"
    return Path(root)


def cache_dir() -> Path | None:
    """The diskcache folder that holds every entry, or None when caching is off."""
    root = cache_root()
    return None if root is None else root / STORE


def cache_limit_bytes() -> int:
    """The store's size bound: TIERSIM_CACHE_MAX_GB (GB = 1e9 bytes), 2 GB unless set."""
    raw = os.environ.get("TIERSIM_CACHE_MAX_GB", "").strip()
    if not raw:
        return int(DEFAULT_MAX_GB * GB)
    try:
        gb = float(raw)
    except ValueError:
        raise ConfigError("TIERSIM_CACHE_MAX_GB", f"TIERSIM_CACHE_MAX_GB must be a number > 0 (GB), got {raw!r}") from None
    check.number("TIERSIM_CACHE_MAX_GB", gb, 0, low_open=True)
    return int(gb * GB)


_OPEN: dict[tuple, diskcache.Cache] = {}  # the store this process keeps open, by (folder, bound, database inode)
REMEMBER_BYTES = 128 * 2**20  # decoded schedules kept in memory at most (a 4,096-step one is ~2 MB)
_REMEMBERED: OrderedDict[str, tuple[bytes, tuple[TierSchedule, np.ndarray]]] = OrderedDict()  # oldest use first


@contextlib.contextmanager
def _open(create: bool = True) -> Iterator[diskcache.Cache | None]:
    """The store, opened with the current size bound and kept open; None when off, absent (and not to be made)
    or unopenable. A store whose folder or bound changed, or whose database was removed, is opened anew
    (diskcache itself reconnects in a forked child)."""
    path = cache_dir()
    if path is None or not (create or path.exists()):
        yield None
        return
    limit = cache_limit_bytes()
    key = _store_key(path, limit)
    if key not in _OPEN:
        _close_open()
        try:
            store = diskcache.Cache(str(path), size_limit=limit, eviction_policy="least-recently-stored")
        except _STORE_FAILED:
            store = None
        key = _store_key(path, limit)
        if store is not None and key is not None:
            _OPEN[key] = store
        elif store is not None:
            store.close()
    yield _OPEN.get(key)


def _store_key(path: Path, limit: int) -> tuple | None:
    try:
        return str(path), limit, os.stat(path / diskcache.core.DBNAME).st_ino
    except OSError:
        return None


def _close_open() -> None:
    for store in _OPEN.values():
        with contextlib.suppress(*_STORE_FAILED):
            store.close()
    _OPEN.clear()


def forget() -> None:
    """Drop what this process remembers (decoded schedules) and close its store: the next read is a fresh one."""
    _REMEMBERED.clear()
    _close_open()


def cache_info() -> dict:
    """Where the cache is and how full: dir (None when off), entries, bytes on disk, limit (bytes)."""
    with _open(create=False) as store:
        path = cache_dir()
        entries = len(store) if store is not None else 0
        nbytes = int(store.volume()) if store is not None else 0
    return {"dir": str(path) if path is not None else None, "entries": entries, "bytes": nbytes,
            "limit": cache_limit_bytes()}


def cache_clear() -> int:
    """Remove every entry (and the per-file entries of earlier versions); the number removed."""
    removed = 0
    _REMEMBERED.clear()
    with _open(create=False) as store:
        if store is not None:
            removed += store.clear()
    root = cache_root()
    for kind, pattern in _LEGACY if root is not None else ():
        for path in (root / kind).glob(pattern):
            with contextlib.suppress(OSError):
                path.unlink()
                removed += 1
    return removed


def trace_key(trace: Trace) -> str:
    """A digest of a trace's content: its requests' checksums and its model, as the header records them."""
    ident = {"model": trace.model.get("id"), "requests": trace.header["requests"]}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:32]


def entry_key(trace: Trace, index: int, policy: PolicyConfig, gen_tokens: int, seed: int, params: SynthParams) -> str:
    """A digest of everything the schedule of request `index` depends on."""
    ident = {
        "version": __version__,
        "request": trace.header["requests"][index],
        "model": trace.model.get("id"),
        "policy": policy.to_dict(),
        "gen_tokens": gen_tokens,
        "seed": seed,
        "synth": params.to_dict(),
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:32]


def load_fit(key: str) -> SynthParams | None:
    """Synthetic-generator parameters fitted to a trace earlier, or None."""
    with _open() as store:
        raw = _get(store, _FIT + key)
    if not isinstance(raw, bytes):
        return None
    try:
        return SynthParams(**json.loads(raw)["params"])
    except _UNREADABLE:
        return None


def store_fit(key: str, params: SynthParams, report: dict) -> None:
    """Keep a fit (and its report) for the next simulation of the same trace."""
    value = json.dumps({"params": params.to_dict(), "report": report}, default=str).encode()
    with _open() as store:
        if store is not None:
            _set(store, _FIT + key, value)


def load_schedules(keys: list[str], policy: PolicyConfig) -> list[tuple[TierSchedule, np.ndarray] | None]:
    """The cached schedule and table of each key, None where absent or unreadable."""
    with _open() as store:
        raws = [_get(store, _SCHEDULE + k) for k in keys]
    return [None if raw is None else _recall(key, raw, policy) for key, raw in zip(keys, raws)]


def store_schedules(entries: dict[str, tuple[TierSchedule, np.ndarray]]) -> None:
    """Keep schedules and tables by key; the oldest entries go once the store is over its bound."""
    with _open() as store:
        if store is not None:
            for key, (schedule, table) in entries.items():
                raw = _encode(schedule, table)
                _set(store, _SCHEDULE + key, raw)
                _remember(key, raw, (schedule, table))


def _recall(key: str, raw: object, policy: PolicyConfig) -> tuple[TierSchedule, np.ndarray] | None:
    """The entry decoded from `raw`: the one decoded before when these are the same bytes."""
    known = _REMEMBERED.get(key)
    if known is not None and known[0] == raw:
        _REMEMBERED.move_to_end(key)
        return known[1]
    decoded = _decode(raw, policy)
    if decoded is not None:
        _remember(key, raw, decoded)
    return decoded


def _remember(key: str, raw: bytes, entry: tuple[TierSchedule, np.ndarray]) -> None:
    """Keep a decoded entry (its arrays made read-only: later runs share them), the least recently used going
    first past REMEMBER_BYTES."""
    for array in (*entry[0].to_arrays().values(), entry[1]):
        array.flags.writeable = False
    _REMEMBERED[key] = (raw, entry)
    _REMEMBERED.move_to_end(key)
    while sum(2 * len(r) for r, _ in _REMEMBERED.values()) > REMEMBER_BYTES and len(_REMEMBERED) > 1:
        _REMEMBERED.popitem(last=False)


def _get(store: diskcache.Cache | None, key: str) -> object:
    if store is None:
        return None
    try:
        return store.get(key)
    except _STORE_FAILED:
        return None


def _set(store: diskcache.Cache, key: str, value: bytes) -> None:
    with contextlib.suppress(*_STORE_FAILED):
        store.set(key, value)


def _encode(schedule: TierSchedule, table: np.ndarray) -> bytes:
    arrays = {**schedule.to_arrays(), "table": table,
              "lengths": np.array([schedule.prompt_tokens, schedule.generated_tokens])}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _decode(raw: object, policy: PolicyConfig) -> tuple[TierSchedule, np.ndarray] | None:
    if not isinstance(raw, bytes):
        return None
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        table = arrays.pop("table")
        prompt, generated = (int(v) for v in arrays.pop("lengths"))
        return TierSchedule.from_arrays(policy, prompt, generated, arrays), table
    except _UNREADABLE:
        return None
