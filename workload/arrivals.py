"""Requests of a serving run: when each arrives and how long its prompt and its output are.

Three sources: Poisson arrivals at `rate` requests/s (for a duration or a count), a file of
arrival times with lengths (CSV or JSONL, columns `arrival_s`, `prompt_tokens`, `output_tokens`),
or, for the closed loop, just a pool of lengths (arrival times are then set by the serving run).

Lengths are a `LengthDist`: a fixed count, an empirical list (e.g. the trace's request lengths,
or a file of them), or a lognormal. The reasoning-length presets are lognormals whose medians are
DESIGN.md §4's generated-token counts for R1-Distill-Qwen-7B (GSM8K ~2.5K, MATH-500 ~4K,
AIME ~13K). Their spread is not in that source: sigma 0.5 is an assumption (the middle 50% of
lengths within ×0.71–×1.40 of the median), clipped to [16, 32768] tokens, R1's generation limit.
Replace them by the lengths of a captured trace where one exists.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tiersim import check
from tiersim.errors import ConfigError

ARRIVAL_COLUMNS = ("arrival_s", "prompt_tokens", "output_tokens")
PRESET_SIGMA = 0.5
PRESET_LIMITS = (16, 32768)
# Median generated tokens of R1-Distill-Qwen-7B per benchmark (DESIGN.md §4).
REASONING_PRESETS: dict[str, float] = {"gsm8k": 2500.0, "math500": 4000.0, "aime": 13000.0}


@dataclass(frozen=True, slots=True)
class Request:
    """One request of a serving run."""

    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    id: int = 0


@dataclass(frozen=True, slots=True)
class LengthDist:
    """Token counts to draw from: fixed (`values` one count), empirical (`values`), or lognormal (`median`, `sigma`)."""

    kind: str  # "fixed", "empirical", "lognormal"
    values: tuple[int, ...] = ()
    median: float = 0.0
    sigma: float = 0.0
    low: int = 1
    high: int | None = None
    name: str = ""

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """`n` counts drawn with `rng` (int64)."""
        if self.kind == "fixed":
            return np.full(n, self.values[0], dtype=np.int64)
        if self.kind == "empirical":
            return np.asarray(self.values, dtype=np.int64)[rng.integers(len(self.values), size=n)]
        draws = np.rint(self.median * np.exp(self.sigma * rng.standard_normal(n)))
        return np.clip(draws, self.low, self.high if self.high is not None else np.inf).astype(np.int64)

    def describe(self) -> str:
        """One line for a summary: what the lengths are drawn from."""
        if self.kind == "fixed":
            return f"{self.values[0]} tokens"
        if self.kind == "empirical":
            return f"{self.name or 'list'} ({len(self.values)} lengths, median {np.median(self.values):.0f})"
        return f"{self.name or 'lognormal'}: lognormal median {self.median:.0f}, sigma {self.sigma}, " \
               f"clipped to [{self.low}, {self.high}]"


LengthSpec = int | str | Path | Sequence[int] | LengthDist


def length_dist(spec: LengthSpec, field: str) -> LengthDist:
    """A LengthDist from a count, a preset name (gsm8k, math500, aime), a file of lengths, or a list of counts."""
    if isinstance(spec, LengthDist):
        return spec
    if isinstance(spec, int) and not isinstance(spec, bool):
        check.integer(field, spec, 1)
        return LengthDist("fixed", (spec,))
    if isinstance(spec, str) and spec in REASONING_PRESETS:
        return LengthDist("lognormal", median=REASONING_PRESETS[spec], sigma=PRESET_SIGMA, low=PRESET_LIMITS[0],
                          high=PRESET_LIMITS[1], name=spec)
    if isinstance(spec, str | Path):
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(field, f"{field} {str(spec)!r} is neither a count, a preset "
                                     f"({', '.join(REASONING_PRESETS)}) nor a readable file")
        return LengthDist("empirical", tuple(read_lengths(path, field)), name=path.name)
    if isinstance(spec, Sequence) and len(spec) > 0:
        values = tuple(spec)
        for v in values:
            check.integer(field, v, 1)
        return LengthDist("empirical", values)
    raise ConfigError(field, f"{field} must be a count >= 1, a preset ({', '.join(REASONING_PRESETS)}), a file of "
                             f"lengths or a non-empty list of counts, got {spec!r:.80}")


def poisson_requests(rate: float, *, duration_s: float | None = None, count: int | None = None,
                     prompt_tokens: LengthSpec = 512, output_tokens: LengthSpec = "gsm8k",
                     seed: int = 0) -> list[Request]:
    """Poisson arrivals at `rate` requests/s over `duration_s` seconds or for `count` requests, lengths drawn.

    The same seed gives the same unit-rate arrival sequence and lengths at every rate (times scale as
    1/rate), so runs at different rates differ only in the load.
    """
    check.number("rate", rate, 0, low_open=True)
    if (duration_s is None) == (count is None):
        raise ConfigError("duration_s", "give exactly one of duration_s and count")
    check.number("duration_s", duration_s, 0, low_open=True, optional=True)
    check.integer("count", count, 1, optional=True)
    check.integer("seed", seed, 0)
    prompts, outputs = length_dist(prompt_tokens, "prompt_tokens"), length_dist(output_tokens, "output_tokens")
    times_rng, lengths_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    if count is not None:
        times = np.cumsum(times_rng.exponential(1.0, count)) / rate
    else:
        unit, horizon = [], duration_s * rate  # draw unit-rate gaps in chunks until past the horizon
        total = 0.0
        while total <= horizon:
            gaps = times_rng.exponential(1.0, max(16, int(1.1 * (horizon - total)) + 16))
            unit.append(gaps)
            total += gaps.sum()
        times = np.cumsum(np.concatenate(unit))
        times = times[times < horizon] / rate
    n = len(times)
    return requests_from_arrays(times, prompts.sample(lengths_rng, n), outputs.sample(lengths_rng, n))


def pool_requests(count: int, *, prompt_tokens: LengthSpec = 512, output_tokens: LengthSpec = "gsm8k",
                  seed: int = 0) -> list[Request]:
    """`count` requests with drawn lengths and no arrival time yet (closed loop: they enter as slots free)."""
    check.integer("count", count, 1)
    check.integer("seed", seed, 0)
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(2)[1])
    prompts = length_dist(prompt_tokens, "prompt_tokens").sample(rng, count)
    return requests_from_arrays(np.zeros(count), prompts, length_dist(output_tokens, "output_tokens").sample(rng,
                                                                                                              count))


def requests_from_arrays(arrival_s, prompt_tokens, output_tokens) -> list[Request]:
    """Request records from three equal-length arrays, ids 0..n-1."""
    return [Request(float(t), int(p), int(o), i)
            for i, (t, p, o) in enumerate(zip(np.asarray(arrival_s).tolist(), np.asarray(prompt_tokens).tolist(),
                                              np.asarray(output_tokens).tolist()))]


def read_arrivals(path: str | Path, *, prompt_tokens: LengthSpec | None = None,
                  output_tokens: LengthSpec | None = None, seed: int = 0) -> list[Request]:
    """Requests from a CSV or JSONL file of `arrival_s`, `prompt_tokens`, `output_tokens`.

    A length column may be left out only when `prompt_tokens` / `output_tokens` says what to draw
    instead. Arrival times are seconds >= 0 that never decrease (equal times are a burst); lengths
    are integers >= 1. Anything else is a ConfigError on `arrivals` naming the file, row and column.
    """
    path = Path(path)
    rows = _read_rows(path, "arrivals")
    if not rows:
        raise ConfigError("arrivals", f"{path}: no requests in the file")
    fallback = {"prompt_tokens": prompt_tokens, "output_tokens": output_tokens}
    present = set(rows[0])
    for column in ARRIVAL_COLUMNS:
        if column not in present and (column == "arrival_s" or fallback[column] is None):
            raise ConfigError("arrivals", f"{path}: missing column {column!r}; an arrivals file needs columns "
                                          f"{', '.join(ARRIVAL_COLUMNS)}")
    times = np.array([_cell(path, i, row, "arrival_s", float) for i, row in enumerate(rows)])
    bad = np.flatnonzero((times < 0) | ~np.isfinite(times))
    if bad.size:
        raise ConfigError("arrivals", f"{path}: row {bad[0] + 1}: column 'arrival_s' is {times[bad[0]]}; arrival "
                                      f"times are finite seconds >= 0")
    back = np.flatnonzero(np.diff(times) < 0)
    if back.size:
        i = back[0] + 1
        raise ConfigError("arrivals", f"{path}: row {i + 1}: column 'arrival_s' goes back in time ({times[i]} after "
                                      f"{times[i - 1]}); arrival times must not decrease")
    rng = np.random.default_rng(seed)
    lengths = {}
    for column in ("prompt_tokens", "output_tokens"):
        if column in present:
            lengths[column] = [_cell(path, i, row, column, int) for i, row in enumerate(rows)]
        else:
            lengths[column] = length_dist(fallback[column], column).sample(rng, len(rows))
    return requests_from_arrays(times, lengths["prompt_tokens"], lengths["output_tokens"])


def read_lengths(path: str | Path, field: str = "output_tokens") -> list[int]:
    """Token counts from a file: a CSV or JSONL column named `field`, or plain text with one count per line."""
    path = Path(path)
    if path.suffix.lower() in (".csv", ".jsonl", ".json"):
        rows = _read_rows(path, field)
        if not rows or field not in rows[0]:
            raise ConfigError(field, f"{path}: missing column {field!r}")
        values = [_cell(path, i, row, field, int, field) for i, row in enumerate(rows)]
    else:
        lines = [line.strip() for line in path.read_text().splitlines()]
        values = [_cell(path, i, {field: line}, field, int, field) for i, line in enumerate(lines) if line]
    if not values:
        raise ConfigError(field, f"{path}: no lengths in the file")
    return values


def _read_rows(path: Path, field: str) -> list[dict]:
    """The rows of a CSV (header line) or JSONL (one object a line) file."""
    if not path.is_file():
        raise ConfigError(field, f"{path}: no such file")
    text = path.read_text()
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = []
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(field, f"{path}: line {i + 1} is not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ConfigError(field, f"{path}: line {i + 1} is not a JSON object")
            rows.append(row)
        return rows
    if path.suffix.lower() != ".csv":
        raise ConfigError(field, f"{path}: unknown format; use .csv (with a header line) or .jsonl")
    return [{k.strip(): v for k, v in row.items() if k is not None} for row in csv.DictReader(text.splitlines())]


def _cell(path: Path, i: int, row: dict, column: str, kind: type, field: str = "arrivals"):
    """One value of a row, converted and checked (lengths: integers >= 1)."""
    value = row.get(column)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(field, f"{path}: row {i + 1}: column {column!r} is {value!r}, not a number") from None
    if kind is int:
        if not number.is_integer() or number < 1:
            raise ConfigError(field, f"{path}: row {i + 1}: column {column!r} is {value!r}; token counts are "
                                     f"integers >= 1")
        return int(number)
    return number
