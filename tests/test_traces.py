"""Trace format: exact round trips, lazy memory maps, atomic writes, refusal of damaged files."""

from __future__ import annotations

import hashlib
import json
import struct
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tiersim
from tiersim.errors import TraceError
from tiersim.traces.format import (
    FORMAT_VERSION,
    MAGIC,
    PREAMBLE_BYTES,
    TRAILER_BYTES,
    Request,
    Trace,
    increments_length,
    page_offsets,
    read_trace,
    row_offset,
    to_float16,
    trace_summary,
    write_trace,
)

MODEL = {"id": "test/model", "shape": {"layers": 2, "heads": 4, "kv_heads": 2, "head_dim": 8}, "dtype": "bfloat16"}
GENERATION = {"max_new_tokens": 3, "temperature": 0.0, "seed": 7, "chat_template": True}


def small_request() -> Request:
    """P=3, G=3, S=2: row 0 covers positions 0..3, row 1 covers 0..4 (values exact in float16)."""
    increments = np.array([0.5, 0.25, 0.125, 0.125,
                           0.375, 0.125, 0.125, 0.25, 0.125], np.float32)
    return Request(prompt_tokens=3, generated_tokens=3, token_ids=np.array([11, 12, 13, 21, 22, 23]),
                   prefill=np.array([1.75, 0.75, 0.5], np.float32), increments=increments)


def paged_request() -> Request:
    """small_request plus 2 layers of page sums with page size 2: rows of 2 and 3 pages."""
    r = small_request()
    pages = np.array([[0.75, 0.25, 0.5, 0.25, 0.25],
                      [0.5, 0.5, 0.25, 0.5, 0.25]], np.float32)
    return Request(r.prompt_tokens, r.generated_tokens, r.token_ids, r.prefill, r.increments, pages, 2)


def other_request() -> Request:
    """P=2, G=4, S=4 (steps == generated_tokens is allowed)."""
    rng = np.random.default_rng(3)
    rows = [rng.random(2 + t + 1).astype(np.float32) for t in range(4)]
    rows = [r / r.sum() for r in rows]
    return Request(2, 4, np.arange(100, 106, dtype=np.int64), np.array([1.5, 0.5], np.float32),
                   np.concatenate(rows))


def write(path: Path, requests: list[Request], **kw) -> Path:
    kw.setdefault("model", MODEL)
    kw.setdefault("generation", GENERATION)
    return write_trace(path, requests, **kw)


def header_of(path: Path) -> tuple[dict, int, int]:
    """(header, header_offset, header_length) parsed straight from the preamble."""
    raw = path.read_bytes()
    _, _, _, offset, length, _ = struct.unpack_from("<16sIIQQQ", raw)
    return json.loads(raw[offset: offset + length]), offset, length


def flip(path: Path, at: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x10
    path.write_bytes(bytes(raw))


# ---------------------------------------------------------------- layout arithmetic


def test_row_offsets_and_lengths_by_hand():
    assert [row_offset(3, t) for t in range(4)] == [0, 4, 9, 15]
    assert increments_length(3, 4) == 4 + 5 + 6 + 7
    assert increments_length(5, 0) == 0
    assert page_offsets(3, 3, 2).tolist() == [0, 2, 5, 8]  # rows of 4, 5, 6 tokens


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5000), st.integers(0, 5000))
def test_steps_recovered_from_length(p, s):
    inc = np.zeros(increments_length(p, s), np.float16)
    r = Request(p, s + 1, np.zeros(p + s + 1, np.int32), np.zeros(p, np.float32), inc)
    assert r.steps == s
    assert r.row_offset(s) == inc.size


def test_request_row_views():
    r = small_request()
    assert r.steps == 2
    assert r.row(0).tolist() == [0.5, 0.25, 0.125, 0.125]
    assert r.row(1).tolist() == [0.375, 0.125, 0.125, 0.25, 0.125]
    assert np.shares_memory(r.row(1), r.increments)
    assert [x.tolist() for x in r.rows()] == [r.row(0).tolist(), r.row(1).tolist()]
    assert [x.size for x in r.rows(1)] == [5]
    assert r.prompt_ids.tolist() == [11, 12, 13] and r.generated_ids.tolist() == [21, 22, 23]
    with pytest.raises(IndexError):
        r.row(2)


def test_request_shape_checks():
    r = small_request()
    with pytest.raises(TraceError, match="token_ids"):
        Request(3, 3, r.token_ids[:5], r.prefill, r.increments)
    with pytest.raises(TraceError, match="prefill"):
        Request(3, 3, r.token_ids, r.prefill[:2], r.increments)
    with pytest.raises(TraceError, match="whole number of steps"):
        Request(3, 3, r.token_ids, r.prefill, r.increments[:8])
    with pytest.raises(TraceError, match="only 1 tokens were generated"):
        Request(3, 1, r.token_ids[:4], r.prefill, r.increments)
    with pytest.raises(TraceError, match="together"):
        Request(3, 3, r.token_ids, r.prefill, r.increments, page_size=2)
    with pytest.raises(TraceError, match="layer_pages"):
        Request(3, 3, r.token_ids, r.prefill, r.increments, np.zeros((2, 4), np.float32), 2)


def test_validate_values():
    r = small_request()
    r.validate()
    bad = r.increments.copy()
    bad[3] = np.nan
    with pytest.raises(TraceError, match="NaN"):
        Request(3, 3, r.token_ids, r.prefill, bad).validate()
    bad[3] = -0.1
    with pytest.raises(TraceError, match="negative"):
        Request(3, 3, r.token_ids, r.prefill, bad).validate()


def test_dense_and_from_dense_are_inverse():
    r = small_request()
    m = r.dense()
    assert m.shape == (2, 5)
    assert m.tolist() == [[0.5, 0.25, 0.125, 0.125, 0.0], [0.375, 0.125, 0.125, 0.25, 0.125]]
    back = Request.from_dense(3, r.token_ids, r.prefill, m)
    assert back.increments.tolist() == r.increments.tolist() and back.generated_tokens == 3
    rng = np.random.default_rng(0)
    p, s = 7, 5
    full = np.tril(rng.random((s, p + s)).astype(np.float32), k=p)
    built = Request.from_dense(p, np.arange(p + s), np.ones(p, np.float32), full)
    assert np.array_equal(built.dense(), full)
    assert [built.row(t).size for t in range(s)] == [p + t + 1 for t in range(s)]
    full[0, p + 1] = 0.5
    with pytest.raises(TraceError, match="beyond position"):
        Request.from_dense(p, np.arange(p + s), np.ones(p, np.float32), full)


def test_to_float16_matches_astype():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.random(10000), rng.random(10000) * 1e-5, rng.random(1000) * 1e-9,
                        -rng.random(1000) * 1e-6, [0.0, -0.0, 2.0**-14, 2.0**-24, 3 * 2.0**-25, 65504.0]])
    x = x.astype(np.float32)
    assert np.array_equal(to_float16(x).view(np.uint16), x.astype(np.float16).view(np.uint16))


# ---------------------------------------------------------------- round trip


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_exact(tmp_path, dtype):
    path = write(tmp_path / "t.trace", [small_request(), other_request()], increments_dtype=dtype,
                 metadata={"note": "hand-written", "n": np.int64(2)})
    trace = read_trace(path)
    assert isinstance(trace, Trace) and len(trace) == 2 and trace.version == FORMAT_VERSION
    a, b = trace[0], trace[1]
    want_a, want_b = small_request(), other_request()
    assert a.increments.dtype == np.dtype(dtype) and a.token_ids.dtype == np.int32
    assert a.prefill.dtype == np.float32
    assert a.increments.tolist() == want_a.increments.tolist()
    assert a.token_ids.tolist() == [11, 12, 13, 21, 22, 23] and a.prefill.tolist() == [1.75, 0.75, 0.5]
    assert (a.prompt_tokens, a.generated_tokens, a.steps) == (3, 3, 2)
    assert (b.prompt_tokens, b.generated_tokens, b.steps) == (2, 4, 4)
    expect = want_b.increments.astype(dtype)
    assert np.array_equal(b.increments, expect)
    assert np.array_equal(b.row(3), expect[row_offset(2, 3):])
    assert trace.metadata == {"note": "hand-written", "n": 2}
    for entry in trace.header["requests"]:
        for record in entry["arrays"].values():
            assert record["offset"] % 64 == 0
    assert [r.steps for r in trace] == [2, 4]
    assert trace[-1].steps == 4
    with pytest.raises(IndexError):
        trace[2]


def test_layer_pages_round_trip(tmp_path):
    path = write(tmp_path / "p.trace", [paged_request(), paged_request()], increments_dtype="float32")
    trace = read_trace(path)
    assert (trace.page_size, trace.layers) == (2, 2)
    r = trace[1]
    assert r.layer_pages.shape == (2, 5) and r.page_size == 2
    assert r.layer_page_row(0, 0).tolist() == [0.75, 0.25]
    assert r.layer_page_row(1, 1).tolist() == [0.25, 0.5, 0.25]
    assert r.page_offset(1) == 2
    mixed = tmp_path / "mixed.trace"
    with pytest.raises(TraceError, match="request 1 has page_size/layers"):
        write(mixed, [paged_request(), small_request()])
    assert not mixed.exists()


def test_lazy_read_gives_read_only_memmaps(tmp_path):
    path = write(tmp_path / "t.trace", [small_request(), other_request()])
    r = read_trace(path)[1]
    for arr in (r.token_ids, r.prefill, r.increments):
        assert isinstance(arr, np.memmap)
        assert not arr.flags.writeable
    with pytest.raises(ValueError):
        r.increments[0] = 1.0


def test_header_fields(tmp_path):
    path = write(tmp_path / "t.trace", [small_request(), other_request()], metadata={"source": "unit"})
    trace = read_trace(path)
    h = trace.header
    assert h["format_version"] == FORMAT_VERSION and h["tool_version"] == tiersim.__version__
    assert datetime.fromisoformat(h["created"].replace("Z", "+00:00")).tzinfo is not None
    assert trace.model == MODEL and trace.generation == GENERATION and trace.increments_dtype == "float16"
    assert h["page_size"] is None and h["layers"] is None
    assert h["requests"][0]["prompt_sha256"] == hashlib.sha256(
        np.array([11, 12, 13], "<i4").tobytes()).hexdigest()
    assert h["requests"][1]["prompt_sha256"] == hashlib.sha256(
        np.array([100, 101], "<i4").tobytes()).hexdigest()
    assert [(e["prompt_tokens"], e["generated_tokens"], e["steps"]) for e in h["requests"]] == [(3, 3, 2), (2, 4, 4)]
    inc = h["requests"][0]["arrays"]["increments"]
    assert inc["dtype"] == "float16" and inc["shape"] == [9]
    summary = trace_summary(trace)
    assert summary["requests"] == 2 and summary["prompt_tokens"] == [3, 2] and summary["steps"] == [2, 4]
    assert summary["generated_tokens"] == [3, 4] and summary["model"] == "test/model"


def test_model_requires_id(tmp_path):
    with pytest.raises(TraceError, match="'id'"):
        write(tmp_path / "t.trace", [small_request()], model={"shape": {}})
    with pytest.raises(TraceError, match="JSON"):
        write(tmp_path / "t.trace", [small_request()], metadata={"x": object()})
    assert list(tmp_path.iterdir()) == []


def test_empty_trace(tmp_path):
    trace = read_trace(write(tmp_path / "e.trace", []))
    assert len(trace) == 0 and list(trace) == []
    trace.verify()


# ---------------------------------------------------------------- atomic writes


def failing_requests():
    yield small_request()
    raise RuntimeError("capture crashed")


def test_atomic_write_keeps_previous_file(tmp_path):
    path = write(tmp_path / "t.trace", [other_request()])
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="capture crashed"):
        write(path, failing_requests())
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.trace"]


def test_atomic_write_leaves_nothing_new(tmp_path):
    with pytest.raises(RuntimeError):
        write(tmp_path / "new.trace", failing_requests())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, -0.5, 1e6])
def test_bad_values_refused_at_write(tmp_path, value):
    r = other_request()
    inc = r.increments.copy()
    inc[5] = value
    bad = Request(r.prompt_tokens, r.generated_tokens, r.token_ids, r.prefill, inc)
    with pytest.raises(TraceError, match=r"t\.trace: request 1 increments"):
        write(tmp_path / "t.trace", [small_request(), bad])
    assert list(tmp_path.iterdir()) == []


def test_bad_prefill_and_ids_refused(tmp_path):
    r = small_request()
    with pytest.raises(TraceError, match="request 0 prefill has NaN"):
        write(tmp_path / "t.trace", [Request(3, 3, r.token_ids, np.array([1, np.nan, 1], np.float32), r.increments)])
    with pytest.raises(TraceError, match="token_ids"):
        write(tmp_path / "t.trace", [Request(3, 3, np.array([1, 2, 3, -4, 5, 6]), r.prefill, r.increments)])
    with pytest.raises(TraceError, match="not a tiersim Request"):
        write(tmp_path / "t.trace", [{"prompt_tokens": 3}])
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- damaged files


@pytest.fixture()
def good(tmp_path) -> Path:
    return write(tmp_path / "good.trace", [small_request(), other_request(), other_request()])


def test_missing_file(tmp_path):
    with pytest.raises(TraceError, match=r"nope\.trace: no such trace file"):
        read_trace(tmp_path / "nope.trace")


def test_truncation_detected_everywhere(good):
    raw = good.read_bytes()
    header, header_offset, header_length = header_of(good)
    inc = header["requests"][1]["arrays"]["increments"]["offset"]
    cuts = {"empty": 0, "preamble": 30, "after preamble": PREAMBLE_BYTES, "data": inc + 3,
            "header": header_offset + header_length // 2, "trailer": len(raw) - TRAILER_BYTES // 2,
            "last byte": len(raw) - 1}
    for where, size in cuts.items():
        good.write_bytes(raw[:size])
        with pytest.raises(TraceError, match="truncated") as info:
            read_trace(good)
        message = str(info.value)
        assert str(good) in message and "\n" not in message, where
        if size >= PREAMBLE_BYTES:
            assert f"truncated: {size} bytes, header says {len(raw)}" in message


def test_data_bit_flip_fails_checksum_on_access(good):
    header, _, _ = header_of(good)
    record = header["requests"][1]["arrays"]["increments"]
    flip(good, record["offset"] + 7)
    trace = read_trace(good)  # opening reads no data
    trace[0]
    trace[2]
    with pytest.raises(TraceError, match=r"good\.trace: request 1 array increments fails its checksum"):
        trace[1]
    with pytest.raises(TraceError, match="checksum"):
        read_trace(good).verify()
    assert read_trace(good, verify_on_access=False)[1].steps == 4


def test_token_id_flip_fails_checksum(good):
    header, _, _ = header_of(good)
    flip(good, header["requests"][0]["arrays"]["token_ids"]["offset"])
    with pytest.raises(TraceError, match="request 0 array token_ids fails its checksum"):
        read_trace(good)[0]


def test_header_bit_flip_is_corruption(good):
    _, offset, length = header_of(good)
    for at in (offset, offset + length // 2, offset + length - 1):
        raw = good.read_bytes()
        flip(good, at)
        with pytest.raises(TraceError, match=r"good\.trace: corrupted header"):
            read_trace(good)
        good.write_bytes(raw)
    read_trace(good).verify()


def test_trailer_and_preamble_flips(good):
    raw = good.read_bytes()
    cases = ((len(raw) - TRAILER_BYTES, "corrupted trailer"), (len(raw) - 20, "disagree"),
             (20, "disagree"), (24, "corrupted preamble"), (32, "corrupted preamble"), (40, "corrupted preamble"))
    for at, problem in cases:
        flip(good, at)
        with pytest.raises(TraceError, match=problem):
            read_trace(good)
        good.write_bytes(raw)


def test_trailing_garbage_refused(good):
    good.write_bytes(good.read_bytes() + b"\x00" * 10)
    with pytest.raises(TraceError, match="data after the trailer"):
        read_trace(good)


def test_wrong_magic(tmp_path, good):
    other = tmp_path / "notes.txt"
    other.write_text("just some text, long enough to fill a whole preamble of the trace format..........")
    with pytest.raises(TraceError, match=r"notes\.txt: not a tiersim trace"):
        read_trace(other)
    flip(good, 0)
    with pytest.raises(TraceError, match="not a tiersim trace"):
        read_trace(good)


def test_future_version_refused(good):
    raw = bytearray(good.read_bytes())
    assert raw[: len(MAGIC)] == MAGIC
    struct.pack_into("<I", raw, 16, FORMAT_VERSION + 1)
    good.write_bytes(bytes(raw))
    with pytest.raises(TraceError, match=f"version {FORMAT_VERSION + 1}.*reads version {FORMAT_VERSION}"):
        read_trace(good)


def test_closed_trace(good):
    with read_trace(good) as trace:
        r = trace[1]
    assert r.row(0).size == 3  # arrays handed out stay valid
    with pytest.raises(TraceError, match="closed"):
        trace[0]
