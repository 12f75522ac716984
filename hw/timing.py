"""Measurements you can trust: warm-up, enough repeats for a stated confidence interval of the median, the
measuring thread pinned where the OS allows, and the spread recorded with every point.

`time_op` runs warm-up calls, then timed groups of `inner` back-to-back calls (CUDA events on CUDA,
`perf_counter` on CPU). Every point keeps its median, p10/p90, min/max, coefficient of variation (CV =
standard deviation / mean of the group times) and a distribution-free 95% confidence interval of the
median (order statistics of a Binomial(n, 1/2); at n = 5 the interval is [min, max], 93.75% coverage).

A point whose CV exceeds `cv_limit` (default 10%) is measured again, doubling its groups, until it is
below the limit or `max_repeats` groups or `budget_s` seconds are spent; if it is still above, it is
flagged (`flagged: true` with the reason) so that a fit drops or down-weights it and says so, never
fitting it silently. On CPU each group's thread CPU time is compared with its wall time: a group in which
the measuring thread held its core less than `CPU_SHARE_MIN` of the time (other processes took it) is
set aside when enough undisturbed groups remain, and the point says how many were set aside; when too
few remain (a busy machine), the thread's CPU time per call stands in for its wall time and the point
says so (the compute of the CPU device runs on one torch thread, the calling one).

`combine_rounds` merges one point measured in several interleaved rounds (hw/compute_rounds.py): the median
of the rounds' medians, with the CV across rounds; drift beyond the limit flags the point.

`noop_s` measures what a kernel launch costs when there is nothing to compute: the floor under the
per-layer launch cost that `calibrate` fits (calibration/fit.py bounds it by that measurement).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np

CV_LIMIT = 0.10  # a point whose groups vary more than this (std / mean) is repeated, then flagged
CPU_SHARE_MIN = 0.9  # CPU: a group in which the thread ran less than this share of the wall time was disturbed
CONFIDENCE = 0.95


@dataclass(frozen=True, slots=True)
class Timing:
    """Seconds per call: median, spread and a confidence interval of the median over timed groups."""

    median_s: float
    p10_s: float
    p90_s: float
    min_s: float
    max_s: float
    repeats: int  # groups kept for the statistics
    inner: int  # calls per group
    cv: float = 0.0  # std / mean of the kept groups
    ci_low_s: float = 0.0  # 95% confidence interval of the median (order statistics)
    ci_high_s: float = 0.0
    disturbed: int = 0  # CPU: groups in which the thread lost its core (set aside when enough others remain)
    flagged: bool = False
    reason: str = ""

    @property
    def spread(self) -> float:
        """(p90 - p10) / median."""
        return (self.p90_s - self.p10_s) / self.median_s if self.median_s > 0 else 0.0

    @property
    def ci_rel(self) -> float:
        """Half the confidence interval's width over the median."""
        return (self.ci_high_s - self.ci_low_s) / (2 * self.median_s) if self.median_s > 0 else 0.0

    def to_dict(self) -> dict:
        """Fields plus the spread."""
        return {**asdict(self), "spread": self.spread}


def median_ci(samples: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Distribution-free confidence interval of the median: order statistics j and n-1-j, j the largest index
    with P(Binomial(n, 1/2) <= j) <= (1 - confidence) / 2 (at least [min, max])."""
    from scipy.stats import binom

    s = np.sort(np.asarray(samples, dtype=np.float64))
    n = len(s)
    if n == 0:
        return math.nan, math.nan
    j = int(binom.ppf((1 - confidence) / 2, n, 0.5)) - 1  # ppf gives the first count whose cdf reaches the tail
    j = max(0, min(j, (n - 1) // 2))
    return float(s[j]), float(s[n - 1 - j])


def summarize(samples, inner: int, cv_limit: float | None = CV_LIMIT, disturbed: int = 0, reason: str = "") -> Timing:
    """A Timing from per-call group times; flagged when the CV exceeds `cv_limit` (None: never)."""
    s = np.asarray(samples, dtype=np.float64)
    cv = float(s.std() / s.mean()) if s.mean() > 0 else 0.0
    lo, hi = median_ci(s)
    why = [reason] if reason else []
    if cv_limit is not None and cv > cv_limit:
        why.append(f"CV {cv:.2f} above the {cv_limit:.2f} limit after {len(s)} groups")
    return Timing(float(np.median(s)), float(np.percentile(s, 10)), float(np.percentile(s, 90)), float(s.min()),
                  float(s.max()), len(s), inner, cv, lo, hi, disturbed, bool(why), "; ".join(why))


def _sync(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def _groups(fn: Callable, device, inner: int, count: int) -> tuple[list[float], list[float], list[float]]:
    """Time `count` groups of `inner` calls: wall seconds per call, the thread's share of its core over the group,
    and its CPU seconds per call (CPU device; on CUDA the share is 1 and the CPU time the wall time)."""
    times, shares, cpu = [], [], []
    if device.type == "cuda":
        import torch

        for _ in range(count):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e-3 / inner)
            shares.append(1.0)
        return times, shares, times
    alone = _one_thread()
    for _ in range(count):
        c, t = time.thread_time(), time.perf_counter()
        for _ in range(inner):
            fn()
        wall = time.perf_counter() - t
        used = time.thread_time() - c
        times.append(wall / inner)
        # With more torch threads the work is not all on this thread: its CPU time says nothing of a busy core.
        shares.append(min(1.0, used / wall) if wall > 0 and alone else 1.0)
        cpu.append(used / inner if alone else wall / inner)
    return times, shares, cpu


def _one_thread() -> bool:
    """Whether torch (if loaded) computes on the calling thread alone."""
    import sys

    torch = sys.modules.get("torch")
    return torch is None or torch.get_num_threads() == 1


def time_op(fn: Callable, device, warmup: int = 2, repeats: int = 7, inner: int | None = None,
            min_repeat_s: float = 2e-3, cv_limit: float | None = CV_LIMIT, max_repeats: int | None = None,
            budget_s: float = 5.0, pin: bool = True) -> Timing:
    """Time fn(): `warmup` calls, then `repeats` groups of `inner` back-to-back calls (chosen so that a group lasts
    about `min_repeat_s`); more groups while the CV is above `cv_limit` (up to `max_repeats`, default 3 x repeats,
    and `budget_s` seconds); flagged when it stays above. CUDA events on CUDA, perf_counter on CPU, where the
    measuring thread is pinned to its core for the while (`pin`)."""
    with pinned_thread(pin and device.type == "cpu"):
        return _time_op(fn, device, warmup, repeats, inner, min_repeat_s, cv_limit, max_repeats, budget_s)


def _time_op(fn, device, warmup, repeats, inner, min_repeat_s, cv_limit, max_repeats, budget_s) -> Timing:
    for _ in range(warmup):
        fn()
    _sync(device)
    if inner is None:
        t = time.perf_counter()
        fn()
        _sync(device)
        once = max(time.perf_counter() - t, 1e-7)
        inner = int(min(1000, max(1, math.ceil(min_repeat_s / once))))
    most = 3 * repeats if max_repeats is None else max(repeats, max_repeats)
    start = time.monotonic()  # the budget's clock; perf_counter stays the measuring one
    times, shares, cpu = _groups(fn, device, inner, repeats)
    while True:
        kept, aside, enough = _undisturbed(times, shares, repeats)
        s = np.array(kept)
        quiet = cv_limit is None or float(s.std() / s.mean() if s.mean() > 0 else 0.0) <= cv_limit
        if quiet and enough or len(times) >= most or time.monotonic() - start > budget_s:
            break
        more = _groups(fn, device, inner, min(len(times), most - len(times)))
        times, shares, cpu = times + more[0], shares + more[1], cpu + more[2]
    if not enough:
        # The thread kept losing its core to other processes: its own CPU time per call is what a call costs on a
        # quiet core (one torch thread computes in the calling thread), and it is said so.
        reason = (f"busy machine: only {len(times) - aside} of {len(times)} groups held the core >= "
                  f"{CPU_SHARE_MIN:.0%} of the time; the thread's CPU time per call stands in for wall time")
        timing = summarize(cpu, inner, cv_limit, aside)
    else:
        reason = f"{aside} of {len(times)} groups set aside (the thread lost its core)" if aside else ""
        timing = summarize(kept, inner, cv_limit, aside)
    return timing if not reason else Timing(**{**asdict(timing), "reason": "; ".join(r for r in (timing.reason, reason) if r)})


def _undisturbed(times: list[float], shares: list[float], need: int) -> tuple[list[float], int, bool]:
    """The groups in which the thread held its core, how many were set aside, and whether at least `need` held it
    (when fewer did, every group is kept: set-aside would leave too few)."""
    good = [t for t, s in zip(times, shares) if s >= CPU_SHARE_MIN]
    if len(good) >= need:
        return good, len(times) - len(good), True
    return list(times), len(times) - len(good), False


@contextlib.contextmanager
def pinned_thread(enabled: bool = True) -> Iterator[int | None]:
    """Pin the calling thread to the core it runs on (Linux `sched_setaffinity` of thread 0 = the caller), and
    restore its affinity afterwards; yields the core, or None where the OS does not allow it."""
    if not enabled or not hasattr(os, "sched_setaffinity") or threading.current_thread() is not threading.main_thread():
        yield None
        return
    try:
        before = os.sched_getaffinity(0)
        core = _current_core(before)
        os.sched_setaffinity(0, {core})
    except OSError:
        yield None
        return
    try:
        yield core
    finally:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, before)


def _current_core(allowed: set[int]) -> int:
    """The core this thread runs on now (field 39 of /proc/thread-self/stat), else the lowest allowed one."""
    try:
        with open("/proc/thread-self/stat") as f:
            core = int(f.read().rsplit(")", 1)[1].split()[36])
        return core if core in allowed else min(allowed)
    except (OSError, ValueError, IndexError):
        return min(allowed)


def combine_rounds(rounds: list[Timing], cv_limit: float | None = CV_LIMIT) -> dict:
    """One point measured in several interleaved rounds (hw/microbench.py `interleaved`): the median of the rounds'
    medians, the CV across rounds (slow drift of a shared machine shows here, not inside a round), the range of
    the rounds' medians as its interval (the distribution-free interval of a median of 3 to 5 rounds is
    [min, max]), every round's own median and CV; flagged when the CV across rounds exceeds `cv_limit` or most
    rounds were flagged themselves."""
    med = np.array([t.median_s for t in rounds], dtype=np.float64)
    cv = float(med.std() / med.mean()) if med.mean() > 0 else 0.0
    lo, hi = median_ci(med)
    why = []
    if cv_limit is not None and cv > cv_limit:
        why.append(f"CV {cv:.2f} across {len(rounds)} rounds above the {cv_limit:.2f} limit")
    flagged_rounds = sum(t.flagged for t in rounds)
    if 2 * flagged_rounds > len(rounds):
        why.append(f"{flagged_rounds} of {len(rounds)} rounds flagged: " + "; ".join(t.reason for t in rounds if t.flagged))
    return {"median_s": float(np.median(med)), "p10_s": float(np.percentile(med, 10)), "p90_s": float(np.percentile(med, 90)),
            "min_s": float(min(t.min_s for t in rounds)), "max_s": float(max(t.max_s for t in rounds)),
            "repeats": sum(t.repeats for t in rounds), "inner": rounds[0].inner, "cv": cv, "ci_low_s": lo, "ci_high_s": hi,
            "disturbed": sum(t.disturbed for t in rounds), "flagged": bool(why), "reason": "; ".join(why),
            "spread": float((np.percentile(med, 90) - np.percentile(med, 10)) / np.median(med)) if med.any() else 0.0,
            "rounds": [round(float(x), 9) for x in med], "round_cv": [round(t.cv, 4) for t in rounds]}


def noop_s(device, repeats: int = 9) -> Timing:
    """One launch of a kernel with nothing to compute (an in-place add of 0 to a one-element tensor)."""
    import torch

    x = torch.zeros(1, device=device)
    with torch.inference_mode():
        return time_op(lambda: x.add_(0.0), device, warmup=20, repeats=repeats, min_repeat_s=5e-3)


__all__ = ["CONFIDENCE", "CPU_SHARE_MIN", "CV_LIMIT", "Timing", "combine_rounds", "median_ci", "noop_s", "pinned_thread",
           "summarize", "time_op"]
