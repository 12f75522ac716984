"""What makes building workloads cheap gives what the plain way gives, bit for bit.

Slot runs (a slot's consecutive table rows summed as one slice) against one gather per slot; a shorter
run's slot rows cut from a longer one's against drawing them afresh; a workload remembered in the process
only while the cache still gives the schedules it was built from; a build over cached schedules reads
no trace request.
"""

from __future__ import annotations

import diskcache
import numpy as np
import pytest

from tiersim.policy import PolicyConfig
from tiersim.traces.format import Trace, read_trace
from tiersim.traces.synth import ExtendedRequest, SynthParams, write_synth_trace
from tiersim.workload import build, cache
from tiersim.workload.build import build_workload, row_runs, rows_of, slot_rows, slot_runs, slot_sum


def reference_slot_rows(n_requests, rows_per_request, batch, steps, seed, cold_start):
    """slot_rows as it was: one numpy range per request a slot runs."""
    out = np.empty((batch, steps), dtype=np.int64)
    started = finished = 0
    for b in range(batch):
        rng = np.random.default_rng([seed, b])
        k, first = 0, True
        while k < steps:
            r = int(rng.integers(n_requests))
            start = 0 if (cold_start or not first) else int(rng.integers(rows_per_request))
            seg = np.arange(start, rows_per_request)[: steps - k]
            out[b, k: k + len(seg)] = r * rows_per_request + seg
            started += 1
            finished += int(seg[-1] == rows_per_request - 1)
            k += len(seg)
            first = False
    return out, started, finished


@pytest.mark.parametrize("cold_start", [False, True])
@pytest.mark.parametrize("n_requests, rows_per_request, batch, steps", [(2, 50, 7, 130), (5, 9, 3, 40), (1, 4, 2, 3)])
def test_slot_rows_equal_the_reference_fresh_and_cut(n_requests, rows_per_request, batch, steps, cold_start):
    want = reference_slot_rows(n_requests, rows_per_request, batch, steps, 3, cold_start)
    build.forget()
    rows, started, finished = slot_rows(n_requests, rows_per_request, batch, steps, 3, cold_start)
    assert np.array_equal(rows, want[0]) and (started, finished) == want[1:]
    # Cut from a longer run drawn first (what the comparison's short runs get).
    build.forget()
    slot_runs(n_requests, rows_per_request, batch, 3 * steps + 1, 3, cold_start)
    rows, started, finished = slot_rows(n_requests, rows_per_request, batch, steps, 3, cold_start)
    assert np.array_equal(rows, want[0]) and (started, finished) == want[1:]
    runs = slot_runs(n_requests, rows_per_request, batch, steps, 3, cold_start)
    assert np.array_equal(rows_of(runs, batch, steps), want[0])
    # Runs recovered from the rows alone (a hand-made workload's) may join requests stored one after the other.
    assert np.array_equal(rows_of(row_runs(want[0]), batch, steps), want[0])


def test_slot_sum_equals_one_gather_per_slot_bit_for_bit():
    rng = np.random.default_rng(0)
    flat = rng.random((3 * 40, 6)) * 10.0 ** rng.integers(-8, 8, size=(3 * 40, 6))  # float sums depend on the order
    rows, _, _ = reference_slot_rows(3, 40, 33, 97, 1, False)
    want = np.zeros((97, 6))
    for b in range(rows.shape[0]):
        want += flat[rows[b]]
    got = slot_sum(flat, row_runs(rows), 97)
    assert got.tobytes() == want.tobytes()
    # Rows that are not runs (a hand-made workload's: a slot staying on one row) sum the same way.
    still = np.zeros((4, 10), dtype=np.int64)
    assert slot_sum(flat, row_runs(still), 10).tobytes() == (4 * np.broadcast_to(flat[0], (10, 6))).tobytes()


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("reuse") / "t.tstrace"
    write_synth_trace(path, SynthParams(), 3, 24, (120, 200), seed=5)
    return path


def make(trace: Trace, batch: int = 6, steps: int = 150, policy: PolicyConfig | None = None):
    policy = policy or PolicyConfig(interval=16, window=16).for_block_size(16)
    return build_workload(trace, policy, 260, batch, steps, 0, False, SynthParams(), workers=1)


def test_a_workload_is_remembered_only_while_the_cache_gives_its_schedules(trace_path, tmp_path, monkeypatch):
    monkeypatch.setenv("TIERSIM_CACHE_DIR", str(tmp_path / "cache"))
    trace = read_trace(trace_path)
    first = make(trace)
    assert make(trace) is first  # the same inputs, the same cached schedules
    assert not first.totals.flags.writeable and not first.tables.flags.writeable  # shared, so read-only
    other = make(trace, batch=7)
    assert other is not first and all(a is b for a, b in zip(other.schedules, first.schedules))  # decoded once
    # A changed cache entry is read again, decoded again (here: unreadable, so replayed and rewritten) and the
    # workload rebuilt: equal to the first bit for bit, but not taken from memory.
    with diskcache.Cache(str(tmp_path / "cache" / cache.STORE)) as store:
        key = next(k for k in store.iterkeys() if k.startswith("schedule/"))
        store.set(key, b"not an npz")
    again = make(trace)
    assert again is not first
    for name in ("tables", "totals", "slot_rows"):
        assert getattr(again, name).tobytes() == getattr(first, name).tobytes(), name
    with diskcache.Cache(str(tmp_path / "cache" / cache.STORE)) as store:
        assert store.get(key)[:2] == b"PK"
    # With the cache off nothing is remembered: every build replays.
    monkeypatch.setenv("TIERSIM_CACHE", "0")
    off = make(trace)
    assert off is not make(trace) and off.totals.tobytes() == first.totals.tobytes()


def test_a_build_over_cached_schedules_reads_no_request(trace_path, tmp_path, monkeypatch):
    monkeypatch.setenv("TIERSIM_CACHE_DIR", str(tmp_path / "cache"))
    w = make(read_trace(trace_path))
    reads = []
    real = Trace.__getitem__
    monkeypatch.setattr(Trace, "__getitem__", lambda self, i: reads.append(i) or real(self, i))
    trace = read_trace(trace_path)
    cache.forget()  # as a fresh process: schedules decoded from the store again
    again = make(trace)
    assert reads == [] and again.totals.tobytes() == w.totals.tobytes()
    # The token counts come from the header alone, and are what the requests themselves say.
    want = [ExtendedRequest(real(trace, i), SynthParams(), 260, seed=i) for i in range(len(trace))]
    assert again.captured_tokens == sum(r.captured_steps for r in want) > 0
    assert again.synthetic_tokens == sum(r.synthetic_steps for r in want) > 0
