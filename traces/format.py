"""The tiersim trace file: one memory-mappable binary container of attention traces, no pickle.

Layout (all integers little-endian):

    preamble  64 bytes   magic(16) version:u32 header_crc32:u32 header_offset:u64
                         header_length:u64 file_length:u64, zero padding
    data                 every array of every request, each starting on a 64-byte boundary
    header               UTF-8 JSON at header_offset (64-byte aligned), header_length bytes
    trailer   48 bytes   magic(16) header_offset:u64 header_length:u64 file_length:u64
                         header_crc32:u32 version:u32

Data come first so a writer can stream requests and write the header (which holds every
array's offset, dtype, shape and crc32) once at the end; the preamble is patched last.
Opening a trace reads only the preamble, trailer and header.

One concept past ~400 lines: the on-disk container (preamble, arrays, header, trailer, CRCs) is read
and written by the same layout constants; keeping reader and writer together keeps them in step.
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import os
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from tiersim.errors import TraceError
from tiersim.fileio import atomic_path
from tiersim.version import __version__

FORMAT_VERSION = 1
MAGIC = b"TIERSIM\x00TRACE\x00\x00\x00"
TRAILER_MAGIC = b"TIERSIM\x00TRAILER\x00"
ALIGN_BYTES = 64
PREAMBLE_BYTES = 64
_PREAMBLE = struct.Struct("<16sIIQQQ")
_TRAILER = struct.Struct("<16sQQQII")
TRAILER_BYTES = _TRAILER.size
INCREMENTS_DTYPES = ("float16", "float32")
_DISK_DTYPES = {"int32": np.dtype("<i4"), "float16": np.dtype("<f2"), "float32": np.dtype("<f4")}
_ARRAY_DTYPES = {"token_ids": ("int32",), "prefill": ("float32",),
                 "increments": INCREMENTS_DTYPES, "layer_pages": INCREMENTS_DTYPES}
_CHUNK_ELEMS = 1 << 22
_CRC_CHUNK_BYTES = 1 << 24
_INT32_MAX = 2**31 - 1


def increments_length(prompt_tokens: int, steps: int) -> int:
    """Number of flat increment values for `steps` decode rows after a prompt of `prompt_tokens`."""
    return steps * (prompt_tokens + 1) + steps * (steps - 1) // 2


def row_offset(prompt_tokens: int, t: int) -> int:
    """Flat offset of decode row t (which has prompt_tokens + t + 1 values)."""
    return t * (prompt_tokens + 1) + t * (t - 1) // 2


def page_offsets(prompt_tokens: int, steps: int, page_size: int) -> np.ndarray:
    """Flat page offsets (length steps + 1) of per-layer page rows; row t has ceil((P+t+1)/N) pages."""
    counts = (prompt_tokens + np.arange(steps, dtype=np.int64) + page_size) // page_size
    return np.concatenate([np.zeros(1, np.int64), np.cumsum(counts, dtype=np.int64)])


def _steps_from_length(prompt_tokens: int, total: int) -> int | None:
    """Invert increments_length: S with S*(P+1) + S*(S-1)/2 == total, or None if there is none."""
    b = 2 * prompt_tokens + 1
    disc = b * b + 8 * total
    r = math.isqrt(disc)
    if r * r != disc or (r - b) % 2:
        return None
    return (r - b) // 2


def to_float16(x: np.ndarray) -> np.ndarray:
    """Convert to float16 exactly as astype does, but fast where results are subnormal (tiny attention)."""
    if x.dtype != np.float32:
        return np.asarray(x).astype(np.float16)
    magnitude = np.abs(x)
    tiny = magnitude < np.float32(2.0**-14)
    if not tiny.any():
        return x.astype(np.float16)
    # numpy's SIMD conversion falls back to a slow scalar path for subnormal float16 results;
    # a subnormal's mantissa is round-half-even(|x| * 2**24), the sign is bit 15.
    bits = np.where(tiny, np.float32(2.0**-14), x).astype(np.float16).view(np.uint16)
    with np.errstate(invalid="ignore"):
        sub = np.rint(magnitude * np.float32(2.0**24)).astype(np.uint16)
    sub |= (x.view(np.uint32) >> 16).astype(np.uint16) & np.uint16(0x8000)
    return np.where(tiny, sub, bits).view(np.float16)


def _is_float(a: np.ndarray) -> bool:
    return a.dtype.kind == "f"


@dataclass(frozen=True, slots=True, eq=False, repr=False)
class Request:
    """One traced request: token ids, prefill column sums and ragged per-step attention rows."""

    prompt_tokens: int
    generated_tokens: int
    token_ids: np.ndarray
    prefill: np.ndarray
    increments: np.ndarray
    layer_pages: np.ndarray | None = None
    page_size: int | None = None
    _steps: int = field(init=False, default=0)
    _page_offsets: np.ndarray | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        """Check shapes and dtypes only; values may be memory maps of huge files (see validate)."""
        try:
            p = operator.index(self.prompt_tokens)
            g = operator.index(self.generated_tokens)
        except TypeError:
            raise TraceError("request: prompt_tokens and generated_tokens must be integers") from None
        if p < 1 or g < 0:
            raise TraceError(f"request: needs prompt_tokens >= 1 and generated_tokens >= 0, got {p} and {g}")
        object.__setattr__(self, "prompt_tokens", p)
        object.__setattr__(self, "generated_tokens", g)
        for name in ("token_ids", "prefill", "increments", "layer_pages"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, np.ndarray):
                object.__setattr__(self, name, np.asarray(value))
        ids, prefill, inc = self.token_ids, self.prefill, self.increments
        if ids.ndim != 1 or ids.dtype.kind not in "iu" or ids.size != p + g:
            raise TraceError(f"request: token_ids must be 1-D integers of length prompt_tokens + generated_tokens"
                             f" = {p + g}, got {ids.dtype} shape {ids.shape}")
        if prefill.ndim != 1 or not _is_float(prefill) or prefill.size != p:
            raise TraceError(f"request: prefill must be 1-D floats of length prompt_tokens = {p},"
                             f" got {prefill.dtype} shape {prefill.shape}")
        if inc.ndim != 1 or not _is_float(inc):
            raise TraceError(f"request: increments must be a 1-D float array, got {inc.dtype} shape {inc.shape}")
        steps = _steps_from_length(p, inc.size)
        if steps is None:
            raise TraceError(f"request: increments has {inc.size} values, which is S*(P+1) + S*(S-1)/2"
                             f" for no whole number of steps S with P = {p}")
        if steps > g:
            raise TraceError(f"request: increments hold {steps} decode steps but only {g} tokens were generated")
        object.__setattr__(self, "_steps", steps)
        self._check_pages(p, steps)

    def _check_pages(self, p: int, steps: int) -> None:
        pages, n = self.layer_pages, self.page_size
        if pages is None and n is None:
            return
        if pages is None or n is None:
            raise TraceError("request: layer_pages and page_size must be given together")
        try:
            n = operator.index(n)
        except TypeError:
            raise TraceError(f"request: page_size must be an integer, got {n!r}") from None
        if n < 1:
            raise TraceError(f"request: page_size must be >= 1, got {n}")
        object.__setattr__(self, "page_size", n)
        offsets = page_offsets(p, steps, n)
        if pages.ndim != 2 or not _is_float(pages) or pages.shape[0] < 1 or pages.shape[1] != offsets[-1]:
            raise TraceError(f"request: layer_pages must be floats of shape (layers, {int(offsets[-1])})"
                             f" for page size {n}, got {pages.dtype} shape {pages.shape}")
        object.__setattr__(self, "_page_offsets", offsets)

    def __repr__(self) -> str:
        pages = "" if self.layer_pages is None else f", layers={self.layers}, page_size={self.page_size}"
        return (f"Request(prompt_tokens={self.prompt_tokens}, generated_tokens={self.generated_tokens},"
                f" steps={self.steps}, increments={self.increments.dtype}[{self.increments.size}]{pages})")

    @property
    def steps(self) -> int:
        """Number of decode steps S traced (rows of increments)."""
        return self._steps

    @property
    def layers(self) -> int | None:
        """Number of layers in layer_pages, or None without per-layer pages."""
        return None if self.layer_pages is None else int(self.layer_pages.shape[0])

    @property
    def prompt_ids(self) -> np.ndarray:
        """Prompt token ids (a view)."""
        return self.token_ids[: self.prompt_tokens]

    @property
    def generated_ids(self) -> np.ndarray:
        """Generated token ids (a view)."""
        return self.token_ids[self.prompt_tokens:]

    def row_offset(self, t: int) -> int:
        """Flat offset of decode row t in increments."""
        return row_offset(self.prompt_tokens, t)

    def _step_index(self, t: int) -> int:
        t = operator.index(t)
        if not 0 <= t < self._steps:
            raise IndexError(f"decode step {t} out of range 0..{self._steps - 1}")
        return t

    def row(self, t: int) -> np.ndarray:
        """Attention of decode step t over positions 0..P+t (a view of length P+t+1)."""
        t = self._step_index(t)
        start = row_offset(self.prompt_tokens, t)
        return self.increments[start: start + self.prompt_tokens + t + 1]

    def rows(self, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
        """Iterate decode rows start..stop-1 as views."""
        stop = self._steps if stop is None else min(stop, self._steps)
        offset = row_offset(self.prompt_tokens, start)
        flat = np.asarray(self.increments)  # a memory map's rows as plain views: slicing a memmap costs ~10 us a row
        for t in range(start, stop):
            length = self.prompt_tokens + t + 1
            yield flat[offset: offset + length]
            offset += length

    def page_offset(self, t: int) -> int:
        """Flat offset of decode row t in each layer's page row."""
        if self._page_offsets is None:
            raise TraceError("request: has no per-layer pages")
        return int(self._page_offsets[self._step_index(t)])

    def layer_page_row(self, layer: int, t: int) -> np.ndarray:
        """Per-page attention sums of `layer` at decode step t (a view of ceil((P+t+1)/N) values)."""
        if self._page_offsets is None or self.layer_pages is None:
            raise TraceError("request: has no per-layer pages")
        t = self._step_index(t)
        return self.layer_pages[layer, self._page_offsets[t]: self._page_offsets[t + 1]]

    def dense(self, dtype: Any = np.float32) -> np.ndarray:
        """Increments as an S x (P+S) zero-padded matrix (for small requests and export)."""
        s, p = self._steps, self.prompt_tokens
        out = np.zeros((s, p + s), dtype=dtype)
        out[_causal_mask(p, s, p + s)] = self.increments
        return out

    @classmethod
    def from_dense(cls, prompt_tokens: int, token_ids: Any, prefill: Any, matrix: Any) -> Request:
        """Build a request from an S x W attention matrix (W >= P+S, zero beyond each row's length)."""
        matrix = np.asarray(matrix)
        if matrix.ndim != 2:
            raise TraceError(f"request: dense matrix must be 2-D, got shape {matrix.shape}")
        p = operator.index(prompt_tokens)
        s, width = matrix.shape
        if width < p + s:
            raise TraceError(f"request: dense matrix has {width} columns, needs P+S = {p + s}")
        mask = _causal_mask(p, s, width)
        if np.any(matrix[~mask]):
            raise TraceError("request: dense matrix has non-zero weight beyond position P+t in some row t")
        dtype = matrix.dtype if matrix.dtype in (np.float16, np.float32) else np.float32
        token_ids = np.asarray(token_ids)
        return cls(prompt_tokens=p, generated_tokens=token_ids.size - p, token_ids=token_ids,
                   prefill=np.asarray(prefill, dtype=np.float32), increments=matrix[mask].astype(dtype))

    def validate(self) -> None:
        """Check values: token ids in int32 range and >= 0; prefill, increments, pages finite and >= 0."""
        if self.token_ids.size and (self.token_ids.min() < 0 or self.token_ids.max() > _INT32_MAX):
            raise TraceError("request: token_ids must lie in 0..2**31-1")
        arrays = [("prefill", self.prefill), ("increments", self.increments)]
        if self.layer_pages is not None:
            arrays.append(("layer_pages", self.layer_pages))
        for name, arr in arrays:
            flat = arr.reshape(-1)
            for start in range(0, flat.size, _CHUNK_ELEMS):
                problem = _value_problem(flat[start: start + _CHUNK_ELEMS])
                if problem:
                    raise TraceError(f"request: {name} {problem}")


def _causal_mask(prompt_tokens: int, steps: int, width: int) -> np.ndarray:
    """Boolean S x width mask of the positions row t covers (0..P+t); row-major order = flat order."""
    return np.arange(width)[None, :] <= prompt_tokens + np.arange(steps)[:, None]


def _value_problem(chunk: np.ndarray) -> str | None:
    """Describe why a float chunk cannot be stored (non-finite or negative), or None."""
    if not np.isfinite(chunk).all():
        return "has NaN or inf values (or values too large for its dtype)"
    if (chunk < 0).any():
        return "has negative values"
    return None


# ---------------------------------------------------------------- writing


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (Path, tuple, set, frozenset)):
        return str(value) if isinstance(value, Path) else list(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, default=_json_default, separators=(",", ":"))


def _pad(f: BinaryIO) -> int:
    """Zero-pad the file to the next 64-byte boundary and return that offset."""
    pos = f.tell()
    pad = -pos % ALIGN_BYTES
    if pad:
        f.write(b"\x00" * pad)
    return pos + pad


def _write_array(f: BinaryIO, where: str, arr: np.ndarray, dtype_name: str) -> dict:
    """Write one array chunk by chunk (checking float values after conversion); return its record."""
    dtype = _DISK_DTYPES[dtype_name]
    offset = _pad(f)
    crc = 0
    flat = arr.reshape(-1)
    for start in range(0, flat.size, _CHUNK_ELEMS):
        chunk = flat[start: start + _CHUNK_ELEMS]
        with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is reported below
            if dtype == np.float16 and chunk.dtype == np.float32:
                chunk = to_float16(chunk)
            chunk = np.ascontiguousarray(chunk, dtype=dtype)
        if dtype.kind == "f":
            problem = _value_problem(chunk)
            if problem:
                raise TraceError(f"{where} {problem}")
        f.write(memoryview(chunk).cast("B"))
        crc = zlib.crc32(memoryview(chunk).cast("B"), crc)
    return {"offset": offset, "dtype": dtype_name, "shape": list(arr.shape), "crc32": crc}


def _write_request(f: BinaryIO, where: str, req: Request, increments_dtype: str) -> dict:
    """Write a request's arrays and return its header entry."""
    ids = req.token_ids
    if ids.size and (ids.min() < 0 or ids.max() > _INT32_MAX):
        raise TraceError(f"{where} token_ids must lie in 0..2**31-1")
    ids32 = np.ascontiguousarray(ids, dtype="<i4")
    arrays = {"token_ids": _write_array(f, where + " token_ids", ids32, "int32"),
              "prefill": _write_array(f, where + " prefill", req.prefill, "float32"),
              "increments": _write_array(f, where + " increments", req.increments, increments_dtype)}
    if req.layer_pages is not None:
        arrays["layer_pages"] = _write_array(f, where + " layer_pages", req.layer_pages, increments_dtype)
    return {"prompt_tokens": req.prompt_tokens, "generated_tokens": req.generated_tokens, "steps": req.steps,
            "prompt_sha256": hashlib.sha256(ids32[: req.prompt_tokens].tobytes()).hexdigest(),
            "arrays": arrays}


def write_trace(path: str | os.PathLike, requests: Iterable[Request], *, model: dict, generation: dict,
                metadata: dict | None = None, increments_dtype: Any = "float16") -> Path:
    """Stream requests into a new trace file at path, atomically (temp file, fsync, rename)."""
    path = Path(path)
    increments_dtype = np.dtype(increments_dtype).name
    if increments_dtype not in INCREMENTS_DTYPES:
        raise TraceError(f"{path}: increments_dtype {increments_dtype} unsupported, use one of {INCREMENTS_DTYPES}")
    if not isinstance(model, dict) or not isinstance(model.get("id"), str) or not model["id"]:
        raise TraceError(f"{path}: model must be a dict with a non-empty string 'id'")
    model = {"id": model["id"], "shape": model.get("shape", {}), "dtype": model.get("dtype"),
             **{k: v for k, v in model.items() if k not in ("id", "shape", "dtype")}}
    for name, value in (("model", model), ("generation", generation), ("metadata", metadata or {})):
        if not isinstance(value, dict):
            raise TraceError(f"{path}: {name} must be a dict, got {type(value).__name__}")
        try:
            _dumps(value)
        except (TypeError, ValueError) as e:
            raise TraceError(f"{path}: {name} is not JSON-serialisable ({e})") from None
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            f.write(b"\x00" * PREAMBLE_BYTES)
            entries: list[dict] = []
            pages: tuple[int | None, int | None] | None = None
            for i, req in enumerate(requests):
                where = f"{path}: request {i}"
                if not isinstance(req, Request):
                    raise TraceError(f"{where} is a {type(req).__name__}, not a tiersim Request")
                shape = (req.page_size, req.layers)
                if pages is not None and shape != pages:
                    raise TraceError(f"{where} has page_size/layers {shape}, earlier requests {pages}")
                pages = shape
                entries.append(_write_request(f, where, req, increments_dtype))
            page_size, layers = pages or (None, None)
            header = {"format": "tiersim-trace", "format_version": FORMAT_VERSION,
                      "tool_version": __version__,
                      "created": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
                      "model": model, "generation": generation, "increments_dtype": increments_dtype,
                      "page_size": page_size, "layers": layers, "metadata": metadata or {},
                      "requests": entries}
            header_bytes = _dumps(header).encode("utf-8")
            header_offset = _pad(f)
            header_crc = zlib.crc32(header_bytes)
            file_length = header_offset + len(header_bytes) + TRAILER_BYTES
            f.write(header_bytes)
            f.write(_TRAILER.pack(TRAILER_MAGIC, header_offset, len(header_bytes), file_length,
                                  header_crc, FORMAT_VERSION))
            f.seek(0)
            f.write(_PREAMBLE.pack(MAGIC, FORMAT_VERSION, header_crc, header_offset, len(header_bytes),
                                   file_length))
    except OSError as e:
        raise TraceError(f"{path}: cannot write trace ({e.strerror or e})") from None
    return path


# ---------------------------------------------------------------- reading


class Trace:
    """An opened trace: header in memory, request arrays memory-mapped (read-only) on access."""

    def __init__(self, path: Path, header: dict, data_bytes: int, verify_on_access: bool = True) -> None:
        """Wrap an already checked header; use read_trace to open a file."""
        self.path = path
        self.header = header
        self._data_bytes = data_bytes
        self._verify_on_access = verify_on_access
        self._verified: set[int] = set()
        self._map: np.memmap | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"Trace({str(self.path)!r}, requests={len(self)}, model={self.model.get('id')!r})"

    @property
    def version(self) -> int:
        """Trace format version of the file."""
        return int(self.header["format_version"])

    @property
    def tool_version(self) -> str:
        """tiersim version that wrote the file."""
        return str(self.header.get("tool_version"))

    @property
    def model(self) -> dict:
        """Model id, shape and dtype."""
        return self.header["model"]

    @property
    def generation(self) -> dict:
        """Generation settings recorded at capture."""
        return self.header["generation"]

    @property
    def metadata(self) -> dict:
        """Free-form metadata."""
        return self.header["metadata"]

    @property
    def increments_dtype(self) -> str:
        """Storage dtype of increments (float16 or float32)."""
        return self.header["increments_dtype"]

    @property
    def page_size(self) -> int | None:
        """Tokens per page of the per-layer page sums, or None."""
        return self.header.get("page_size")

    @property
    def layers(self) -> int | None:
        """Layers in the per-layer page sums, or None."""
        return self.header.get("layers")

    def __len__(self) -> int:
        return len(self.header["requests"])

    def steps_of(self, i: int) -> int:
        """Decode rows request i holds, from the header (checked when read) alone: no array is mapped or verified."""
        return self.header["requests"][operator.index(i)]["steps"]

    def __iter__(self) -> Iterator[Request]:
        for i in range(len(self)):
            yield self[i]

    def __enter__(self) -> Trace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Drop this trace's file mapping (arrays already handed out stay valid)."""
        self._map = None
        self._closed = True

    def _buffer(self) -> np.memmap:
        if self._closed:
            raise TraceError(f"{self.path}: trace is closed")
        if self._map is None:
            try:
                self._map = np.memmap(self.path, dtype=np.uint8, mode="r", shape=(self._data_bytes,))
            except OSError as e:
                raise TraceError(f"{self.path}: cannot map trace ({e.strerror or e})") from None
        return self._map

    def _raw(self, record: dict) -> np.ndarray:
        """Bytes of one array record as a read-only uint8 memmap view (or an empty array)."""
        nbytes = math.prod(record["shape"]) * _DISK_DTYPES[record["dtype"]].itemsize
        if nbytes == 0:
            return np.zeros(0, np.uint8)
        return self._buffer()[record["offset"]: record["offset"] + nbytes]

    def _check(self, i: int) -> None:
        for name, record in self.header["requests"][i]["arrays"].items():
            raw = self._raw(record)
            crc = 0
            for start in range(0, raw.size, _CRC_CHUNK_BYTES):
                crc = zlib.crc32(raw[start: start + _CRC_CHUNK_BYTES], crc)
            if crc != record["crc32"]:
                raise TraceError(f"{self.path}: request {i} array {name} fails its checksum (file corrupted)")
        self._verified.add(i)

    def __getitem__(self, i: int) -> Request:
        n = len(self)
        i = operator.index(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"request {i} out of range for a trace of {n} requests")
        if self._verify_on_access and i not in self._verified:
            self._check(i)
        entry = self.header["requests"][i]
        arrays = {}
        for name, record in entry["arrays"].items():
            dtype = _DISK_DTYPES[record["dtype"]]
            raw = self._raw(record)
            arr = raw.view(dtype).reshape(record["shape"]) if raw.size else np.zeros(record["shape"], dtype)
            arr.flags.writeable = False
            arrays[name] = arr
        return Request(prompt_tokens=entry["prompt_tokens"], generated_tokens=entry["generated_tokens"],
                       token_ids=arrays["token_ids"], prefill=arrays["prefill"],
                       increments=arrays["increments"], layer_pages=arrays.get("layer_pages"),
                       page_size=self.page_size if "layer_pages" in arrays else None)

    def verify(self) -> None:
        """Check every array's crc32 (reads the whole file); raise TraceError on the first mismatch."""
        for i in range(len(self)):
            self._check(i)


def _read_at(f: BinaryIO, offset: int, size: int) -> bytes:
    f.seek(offset)
    return f.read(size)


def read_trace(path: str | os.PathLike, *, verify_on_access: bool = True) -> Trace:
    """Open a trace, reading only its preamble, header and trailer; arrays map lazily."""
    path = Path(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise TraceError(f"{path}: no such trace file") from None
    except OSError as e:
        raise TraceError(f"{path}: cannot open trace ({e.strerror})") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        pre = f.read(PREAMBLE_BYTES)
        if pre[: len(MAGIC)] != MAGIC[: len(pre)]:
            raise TraceError(f"{path}: not a tiersim trace (wrong magic bytes)")
        if len(pre) < PREAMBLE_BYTES:
            raise TraceError(f"{path}: truncated: {size} bytes, shorter than the {PREAMBLE_BYTES}-byte preamble")
        _, version, header_crc, header_offset, header_length, file_length = _PREAMBLE.unpack_from(pre)
        if version != FORMAT_VERSION:
            raise TraceError(f"{path}: trace format version {version}; tiersim {__version__}"
                             f" reads version {FORMAT_VERSION}")
        if size != file_length:
            tail = _read_at(f, size - TRAILER_BYTES, TRAILER_BYTES) if size >= PREAMBLE_BYTES + TRAILER_BYTES else b""
            if len(tail) == TRAILER_BYTES and tail[:16] == TRAILER_MAGIC and _TRAILER.unpack(tail)[3] == size:
                raise TraceError(f"{path}: corrupted preamble (file length {file_length}, trailer says {size})")
            if size < file_length:
                raise TraceError(f"{path}: truncated: {size} bytes, header says {file_length}")
            raise TraceError(f"{path}: corrupted: {size} bytes, header says {file_length} (data after the trailer)")
        if (header_offset < PREAMBLE_BYTES or header_offset % ALIGN_BYTES
                or header_offset + header_length + TRAILER_BYTES != file_length):
            raise TraceError(f"{path}: corrupted preamble (header at {header_offset}+{header_length}"
                             f" does not fit a {file_length}-byte file)")
        trailer = _TRAILER.unpack(_read_at(f, file_length - TRAILER_BYTES, TRAILER_BYTES))
        if trailer[0] != TRAILER_MAGIC:
            raise TraceError(f"{path}: corrupted trailer (wrong magic bytes)")
        if trailer[1:] != (header_offset, header_length, file_length, header_crc, version):
            raise TraceError(f"{path}: corrupted preamble or trailer (they disagree)")
        raw = _read_at(f, header_offset, header_length)
    if zlib.crc32(raw) != header_crc:
        raise TraceError(f"{path}: corrupted header (checksum mismatch)")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TraceError(f"{path}: corrupted header (invalid JSON: {e})") from None
    problem = _header_problem(header, version, header_offset)
    if problem:
        raise TraceError(f"{path}: corrupted header ({problem})")
    return Trace(path, header, header_offset, verify_on_access)


def _header_problem(header: Any, version: int, data_end: int) -> str | None:
    """Describe what makes a parsed header unusable, or None; keeps readers free of KeyErrors."""
    if not isinstance(header, dict):
        return "not a JSON object"
    if header.get("format_version") != version:
        return f"format_version {header.get('format_version')!r} differs from the preamble's {version}"
    for key, kind in (("model", dict), ("generation", dict), ("metadata", dict), ("requests", list)):
        if not isinstance(header.get(key), kind):
            return f"'{key}' missing or not a {kind.__name__}"
    if header.get("increments_dtype") not in INCREMENTS_DTYPES:
        return f"increments_dtype {header.get('increments_dtype')!r} unsupported"
    page_size, layers = header.get("page_size"), header.get("layers")
    if (page_size is None) != (layers is None):
        return "page_size and layers must both be set or both null"
    for i, entry in enumerate(header["requests"]):
        problem = _entry_problem(entry, page_size, layers, data_end)
        if problem:
            return f"request {i}: {problem}"
    return None


def _entry_problem(entry: Any, page_size: int | None, layers: int | None, data_end: int) -> str | None:
    if not isinstance(entry, dict) or not isinstance(entry.get("arrays"), dict):
        return "not an object with arrays"
    p, g, s = entry.get("prompt_tokens"), entry.get("generated_tokens"), entry.get("steps")
    if not all(isinstance(v, int) and v >= 0 for v in (p, g, s)) or p < 1 or s > g:
        return "bad prompt_tokens/generated_tokens/steps"
    shapes = {"token_ids": [p + g], "prefill": [p], "increments": [increments_length(p, s)]}
    if page_size is not None:
        shapes["layer_pages"] = [layers, int(page_offsets(p, s, page_size)[-1])]
    if set(entry["arrays"]) != set(shapes):
        return f"arrays {sorted(entry['arrays'])}, expected {sorted(shapes)}"
    for name, record in entry["arrays"].items():
        if not isinstance(record, dict) or record.get("dtype") not in _ARRAY_DTYPES[name]:
            return f"array {name} has a bad record"
        if record.get("shape") != shapes[name]:
            return f"array {name} has shape {record.get('shape')}, expected {shapes[name]}"
        offset, crc = record.get("offset"), record.get("crc32")
        if not isinstance(offset, int) or not isinstance(crc, int):
            return f"array {name} has a bad offset or crc32"
        nbytes = math.prod(shapes[name]) * _DISK_DTYPES[record["dtype"]].itemsize
        if offset < PREAMBLE_BYTES or offset % ALIGN_BYTES or offset + nbytes > data_end:
            return f"array {name} at {offset}+{nbytes} lies outside the data region"
    return None


def trace_summary(trace: Trace) -> dict:
    """Small description of a trace from its header alone (no array is read)."""
    entries = trace.header["requests"]
    return {"path": str(trace.path), "format_version": trace.version, "tool_version": trace.tool_version,
            "model": trace.model.get("id"), "requests": len(entries),
            "prompt_tokens": [e["prompt_tokens"] for e in entries],
            "generated_tokens": [e["generated_tokens"] for e in entries],
            "steps": [e["steps"] for e in entries], "increments_dtype": trace.increments_dtype,
            "page_size": trace.page_size, "layers": trace.layers}
