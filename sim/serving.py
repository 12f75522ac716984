"""A serving run: requests arrive (open loop) or fill N slots (closed loop), the scheduler batches them, and
the run reports what a serving engineer reads — TTFT, TPOT, latency percentiles, throughput, goodput under an
SLO, preemptions, queue length, concurrency and memory over time.

Definitions (times in ms in the metrics, seconds in the records):
- TTFT = first token − arrival; TPOT = (finish − first token) / (output tokens − 1), requests of more than one
  output token; end-to-end latency = finish − arrival. Percentiles over the requests that finished.
- Throughput: tokens generated in the run (finished or not) and requests finished, per second of the run.
- Goodput under an SLO: a finished request meets it when TTFT <= slo_ttft_ms and TPOT <= slo_tpot_ms. Its share is
  counted over the requests whose outcome is known at the end: the finished ones, and the unfinished ones already
  certain to miss (no first token after slo_ttft_ms, or elapsed decode time already over slo_tpot_ms x (output − 1)).
  A rate is sustainable when >= 90% of the requests that arrived meet it (`max_sustainable_rate`: each trial runs
  on past its arrivals until every outcome is known, so an unfinished request never counts as a pass).
- Mean queue length and concurrency are time averages over the run: the sum of every request's time waiting
  (running) divided by the run's length. Occupancy: the blocks held each step × bytes per block (+ staging).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import simpy

from tiersim import check
from tiersim.errors import ConfigError
from tiersim.sim.blocks import BlockManager, KVCapacity
from tiersim.sim.scheduler import DEFAULT_CONFIG, WAITING, ExtraTime, KVSplit, RequestState, Scheduler, SchedulerConfig
from tiersim.sim.step_time import StepTime
from tiersim.workload.arrivals import LengthSpec, Request, poisson_requests

SUSTAINABLE_SHARE = 0.90  # a rate is sustainable when >= 90% of the requests that arrived meet the SLO
PERCENTILES = (50, 90, 99)


@dataclass(frozen=True, slots=True)
class SLO:
    """Latency targets of a request: time to first token and time per output token."""

    ttft_ms: float
    tpot_ms: float

    def __post_init__(self) -> None:
        check.number("slo_ttft_ms", self.ttft_ms, 0, low_open=True)
        check.number("slo_tpot_ms", self.tpot_ms, 0, low_open=True)


@dataclass(slots=True)
class ServingResult:
    """Per-request records, per-step records and the metrics of one serving run."""

    requests: pd.DataFrame  # one row per request: arrival_s, first_token_s, finish_s, preemptions, status, ...
    steps: pd.DataFrame  # one row per scheduler step: start_s, step_s, batch, queue, hbm_bytes, ddr_bytes
    metrics: dict = field(default_factory=dict)


def serve(requests: Sequence[Request], step_time: StepTime, capacity: KVCapacity,
          config: SchedulerConfig = DEFAULT_CONFIG, *, concurrency: int | None = None,
          until_s: float | None = None, slo: SLO | None = None, split: KVSplit | None = None,
          extra_s: ExtraTime | None = None) -> ServingResult:
    """Serve `requests` and measure it.

    Open loop (`concurrency` None): each request arrives at its `arrival_s`. Closed loop: the first
    `concurrency` requests enter at 0 and each one that finishes lets the next one in (their
    `arrival_s` is ignored). The run stops at `until_s` seconds (requests still queued or running
    are reported as such), or when every request has finished (None).
    """
    if not requests:
        raise ConfigError("requests", "requests is empty; a serving run needs at least one request")
    check.integer("concurrency", concurrency, 1, optional=True)
    check.number("until_s", until_s, 0, low_open=True, optional=True)
    arrival = [r.arrival_s for r in requests]
    back = np.flatnonzero(np.diff(arrival) < 0) if concurrency is None else ()
    if len(back):
        i = int(back[0]) + 1
        raise ConfigError("arrivals", f"arrivals must not go back in time: request {i} arrives at {arrival[i]} s, "
                                      f"after request {i - 1} at {arrival[i - 1]} s")
    state = RequestState(arrival, [r.prompt_tokens for r in requests], [r.output_tokens for r in requests])
    env = simpy.Environment()
    blocks = BlockManager(capacity, len(state))
    pending = iter(range(min(concurrency or 0, len(state)), len(state)))

    def enter_next(_finished: int) -> None:  # closed loop: a freed slot takes the next request now
        rid = next(pending, None)
        if rid is not None:
            state.arrival_s[rid] = env.now
            sched.add(rid)

    sched = Scheduler(env, state, blocks, step_time, config, split, extra_s,
                      enter_next if concurrency is not None else None)
    if concurrency is None:
        env.process(_arrivals(env, sched, state.arrival_s))
    else:
        state.arrival_s[:] = np.nan
        state.arrival_s[:min(concurrency, len(state))] = 0.0
        for rid in range(min(concurrency, len(state))):
            sched.add(rid)
    env.process(sched.run())
    env.run(until=until_s)
    end_s = env.now if until_s is None else until_s
    result = _result(state, sched, capacity, end_s, slo, [r.id for r in requests])
    result.metrics["sim_events"] = next(env._eid)  # SimPy numbers its events from this counter
    return result


def _arrivals(env: simpy.Environment, sched: Scheduler, arrival_s: np.ndarray):
    """The arrival process: each request joins the waiting queue at its time."""
    for rid, t in enumerate(arrival_s.tolist()):
        if t > env.now:
            yield env.timeout(t - env.now)
        sched.add(rid)


def _result(state: RequestState, sched: Scheduler, capacity: KVCapacity, end_s: float, slo: SLO | None,
            ids: list[int]) -> ServingResult:
    """Records and metrics of a finished run (`end_s`: the run's length)."""
    r = state
    waiting = r.status == WAITING
    r.queued_s[waiting] += end_s - r.queue_since[waiting]  # still queued at the end
    steps = pd.DataFrame(sched.log.as_arrays())
    requests = pd.DataFrame({
        "id": ids, "arrival_s": r.arrival_s, "prompt_tokens": r.prompt, "output_tokens": r.output,
        "first_token_s": r.first_s, "finish_s": r.finish_s, "generated": r.generated,
        "preemptions": r.preemptions, "queued_s": r.queued_s,
        "status": pd.Categorical.from_codes(np.where(r.status < 0, 4, r.status),
                                            ["waiting", "running", "finished", "rejected", "not arrived"]),
    })
    requests["ttft_s"] = r.first_s - r.arrival_s
    requests["tpot_s"] = np.where(r.output > 1, (r.finish_s - r.first_s) / np.maximum(r.output - 1, 1), np.nan)
    requests["latency_s"] = r.finish_s - r.arrival_s
    return ServingResult(requests, steps, metrics(requests, steps, capacity, end_s, slo))


def metrics(requests: pd.DataFrame, steps: pd.DataFrame, capacity: KVCapacity, end_s: float, slo: SLO | None) -> dict:
    """The serving metrics of DESIGN.md §3 from the request and step records (times in ms, sizes in GB)."""
    done = requests[requests["status"] == "finished"]
    arrived = int((requests["status"] != "not arrived").sum())
    out = {
        "duration_s": end_s,
        "requests_arrived": arrived,
        "requests_finished": len(done),
        "requests_running": int((requests["status"] == "running").sum()),
        "requests_waiting": int((requests["status"] == "waiting").sum()),
        "requests_rejected": int((requests["status"] == "rejected").sum()),
        "tokens_generated": int(requests["generated"].sum()),
        "tokens_finished": int(done["output_tokens"].sum()),
        "preemptions": int(requests["preemptions"].sum()),
        "steps": len(steps),
    }
    for name, column in (("ttft_ms", "ttft_s"), ("tpot_ms", "tpot_s"), ("latency_ms", "latency_s")):
        values = done[column].dropna().to_numpy() * 1e3
        for p in PERCENTILES:
            out[f"{name}_p{p}"] = float(np.percentile(values, p)) if values.size else None
        out[f"{name}_mean"] = float(values.mean()) if values.size else None
    out["throughput_tok_s"] = out["tokens_generated"] / end_s if end_s else 0.0
    out["throughput_req_s"] = len(done) / end_s if end_s else 0.0
    span = (np.minimum(steps["start_s"] + steps["step_s"], end_s) - steps["start_s"]).clip(lower=0).to_numpy()
    out["mean_queue"] = float(requests["queued_s"].sum()) / end_s if end_s else 0.0
    out["mean_concurrency"] = float((steps["running"].to_numpy() * span).sum()) / end_s if end_s else 0.0
    for pool in ("hbm", "ddr"):
        b = steps[f"{pool}_bytes"].to_numpy()
        out[f"{pool}_kv_gb_peak"] = float(b.max()) / 1e9 if b.size else 0.0
        out[f"{pool}_kv_gb_mean"] = float((b * span).sum()) / end_s / 1e9 if end_s else 0.0
    out["hbm_kv_gb_capacity"] = capacity.hbm_blocks * capacity.block_bytes / 1e9
    out["ddr_kv_gb_capacity"] = capacity.ddr_blocks * capacity.block_bytes / 1e9
    out.update(goodput(requests, end_s, slo))
    return out


def goodput(requests: pd.DataFrame, end_s: float, slo: SLO | None) -> dict:
    """Share and rate of requests meeting the SLO, over the requests whose outcome is known at `end_s`."""
    if slo is None:
        return {"slo_ttft_ms": None, "slo_tpot_ms": None, "goodput_share": None, "goodput_req_s": None,
                "slo_known": None}
    ttft, tpot = slo.ttft_ms * 1e-3, slo.tpot_ms * 1e-3
    status = requests["status"]
    finished = (status == "finished").to_numpy()
    met = finished & (requests["ttft_s"] <= ttft).to_numpy() & ~(requests["tpot_s"] > tpot).to_numpy()
    open_ = ((status == "waiting") | (status == "running")).to_numpy()
    first = requests["first_token_s"].to_numpy()
    arrival = requests["arrival_s"].to_numpy()
    waited = np.where(np.isnan(first), end_s, first) - arrival
    decode_floor = (end_s - first) / np.maximum(requests["output_tokens"].to_numpy() - 1, 1)
    missed_open = open_ & ((waited > ttft) | (~np.isnan(first) & (decode_floor > tpot)))
    known = int(finished.sum() + missed_open.sum() + (status == "rejected").sum())
    return {"slo_ttft_ms": slo.ttft_ms, "slo_tpot_ms": slo.tpot_ms,
            "goodput_share": float(met.sum()) / known if known else None,
            "goodput_req_s": float(met.sum()) / end_s if end_s else 0.0, "slo_known": known}


def known_by_s(requests: Sequence[Request], slo: SLO) -> float:
    """When every request's SLO outcome is known: the last arrival + TTFT target + the longest output's TPOT budget.

    By then a request either finished, or is certain to miss: no first token within the TTFT target, or (first
    token in time) more than `tpot_ms` × (output − 1) spent decoding since (`goodput`'s rule for open requests).
    """
    last = max(r.arrival_s for r in requests)
    longest = max(r.output_tokens for r in requests)
    return last + (slo.ttft_ms + slo.tpot_ms * longest) * 1e-3


@dataclass(frozen=True, slots=True)
class RateSearch:
    """The largest arrival rate served within the SLO, and every rate tried (rate, goodput share)."""

    rate: float  # req/s; 0 when even the lowest rate tried fails
    trials: tuple[tuple[float, float], ...]
    share: float = SUSTAINABLE_SHARE


def max_sustainable_rate(step_time: StepTime, capacity: KVCapacity, slo: SLO, *, duration_s: float,
                         prompt_tokens: LengthSpec = 512, output_tokens: LengthSpec = "gsm8k",
                         config: SchedulerConfig = DEFAULT_CONFIG, split: KVSplit | None = None,
                         extra_s: ExtraTime | None = None, seed: int = 0, start_rate: float = 1.0,
                         rel_tol: float = 0.05, max_trials: int = 24) -> RateSearch:
    """Bisect the Poisson arrival rate at which >= 90% of the requests that arrived meet `slo`.

    Each trial draws `duration_s` seconds of arrivals with the same seed (times scale with 1/rate,
    lengths are the same), so goodput falls with the rate and the search brackets it: double or halve
    from `start_rate` until one rate passes and one fails, then bisect until the bracket is within
    `rel_tol` of the rate. A trial is served past `duration_s` until every arrival's outcome is known
    (`known_by_s`), so no request still running at the end counts as a pass; a trial whose goodput is
    still unknown all the same, or in which no request arrived, fails.
    """
    check.number("duration_s", duration_s, 0, low_open=True)
    check.number("start_rate", start_rate, 0, low_open=True)
    check.number("rel_tol", rel_tol, 0, 1, low_open=True, high_open=True)
    trials: list[tuple[float, float]] = []

    def passes(rate: float) -> bool:
        reqs = poisson_requests(rate, duration_s=duration_s, prompt_tokens=prompt_tokens,
                                output_tokens=output_tokens, seed=seed)
        if not reqs:  # nothing arrived: nothing shown sustainable (unknown is not a pass)
            trials.append((rate, 0.0))
            return False
        m = serve(reqs, step_time, capacity, config, until_s=known_by_s(reqs, slo), slo=slo, split=split,
                  extra_s=extra_s).metrics
        known = m["goodput_share"] is not None and m["slo_known"] == m["requests_arrived"]
        share = m["goodput_share"] if known else 0.0  # unknown is not a pass
        trials.append((rate, share))
        return share >= SUSTAINABLE_SHARE

    low, high = None, None
    rate = start_rate
    while len(trials) < max_trials and (low is None or high is None):
        if passes(rate):
            low, rate = rate, rate * 2
        else:
            high, rate = rate, rate / 2
    if low is None:
        return RateSearch(0.0, tuple(trials))
    while high is not None and len(trials) < max_trials and high - low > rel_tol * low:
        mid = 0.5 * (low + high)
        if passes(mid):
            low = mid
        else:
            high = mid
    return RateSearch(low, tuple(trials))


