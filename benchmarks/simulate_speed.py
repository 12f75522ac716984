"""Simulator speed, ratios measured in one run (issue 11 targets).

- the default `tiersim simulate` (r1-qwen-14b on h200-sxm: 48 layers, batch 256, 4,096 generated tokens,
  with the verdict's comparison runs, as the CLI does) in <= 1 s cold on a quiet 2-core machine;
- >= 20,000 batched decode steps simulated per wall second at batch 256 (the timeline alone);
- batch 1024 costs at most 1.5x batch 256.

Cold: an empty schedule cache (the policy is replayed over every trace request); warm: schedules reused
from the cache, as the next `tiersim simulate` finds them; both with nothing remembered in the process
(workload.build.forget), as a fresh CLI run starts. Again: the same run once more in the same process,
as in a sweep, where workloads and decoded schedules are remembered. Times are in-process (imports,
~0.3-0.4 s of the CLI's, are not counted: benchmarks/import_time.py has those), the best of --repeat runs.
The timeline rate is measured for the exact recurrence (sim/recurrence.py) and for the SimPy engine it
replaces (sim/engine.py, the reference), on the same plans.

    python benchmarks/simulate_speed.py [--trace FILE] [--no-simpy] [--no-timeline] [--repeat N]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace

from tiersim.sim import SimConfig, engine, recurrence, simulate
from tiersim.sim.costs import CostModel
from tiersim.sim.plan import choose_copy, make_plan
from tiersim.workload.build import block_totals, forget
from tiersim.workload.demand import run_workload


def timed_simulate(trace, cache: str, fresh: bool = True, **kw) -> tuple[float, dict]:
    """Seconds of one default simulation with its comparison; `fresh`: nothing remembered in the process first."""
    os.environ["TIERSIM_CACHE_DIR"] = cache
    if fresh:
        forget()
    cfg = SimConfig(model="r1-qwen-14b", hardware="h200-sxm", trace=trace, **kw)
    start = time.perf_counter()
    s = simulate(cfg, compare=True).summary
    return time.perf_counter() - start, s


def best_cold(trace, repeat: int, **kw) -> float:
    """Best of `repeat` runs, each on an empty schedule cache."""
    times = []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as empty:
            times.append(timed_simulate(trace, empty, **kw)[0])
    return min(times)


def plan_of(trace, strategy: str, batch: int):
    cfg = SimConfig(model="r1-qwen-14b", hardware="h200-sxm", trace=trace, strategy=strategy, batch=batch)
    w = run_workload(cfg)
    cost = CostModel(cfg.model, cfg.hardware, cfg.pinned, cfg.fixed_compute_ms, cfg.weight_bits, share=cfg.share)
    blocks = block_totals(w, cfg.block_size)
    cost = replace(cost, copy=choose_copy(w, cost, cfg, blocks)[0])
    return make_plan(strategy, w, cost, cfg, blocks)[0]


def steps_per_s(run, plan, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        run(plan)
        best = min(best, time.perf_counter() - start)
    return plan.steps / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default=None, help="trace file (default: the embedded one)")
    ap.add_argument("--no-simpy", action="store_true", help="skip the SimPy reference timings (slow)")
    ap.add_argument("--no-timeline", action="store_true", help="skip the timeline rates (only the default run)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per timing; the best is kept (default 3)")
    args = ap.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        timed_simulate(args.trace, scratch)  # load the modules a run imports lazily, so no timing pays for them
    with tempfile.TemporaryDirectory() as cache:
        for batch in (256, 1024):
            cold = best_cold(args.trace, args.repeat, batch=batch)
            timed_simulate(args.trace, cache, batch=batch)  # fill the shared cache
            warm = min(timed_simulate(args.trace, cache, batch=batch)[0] for _ in range(args.repeat))
            again, s = min((timed_simulate(args.trace, cache, fresh=False, batch=batch) for _ in range(args.repeat)),
                           key=lambda r: r[0])
            rows[batch] = (cold, warm, again, s["timeline_engine"], s["sim_events"])
    print(f"{'simulate (with comparison)':<28} {'cold s':>7} {'warm s':>7} {'again s':>8}  engine, events")
    for batch, (cold, warm, again, eng, events) in rows.items():
        print(f"{'batch ' + str(batch):<28} {cold:>7.2f} {warm:>7.2f} {again:>8.2f}  {eng}, {events:,}")
    print(f"default run: {rows[256][0]:.2f} s cold, {rows[256][1]:.2f} s warm (target <= 1 s cold, quiet 2 cores)")
    print(f"batch 1024 / batch 256: {rows[1024][0] / rows[256][0]:.2f}x cold, "
          f"{rows[1024][1] / rows[256][1]:.2f}x warm (target <= 1.5x)")
    if not args.no_timeline:
        print(f"\n{'timeline, decode steps per wall second':<40} {'recurrence':>11} {'SimPy':>9} {'ratio':>6}")
        for strategy in ("prefetch-layer", "prefetch-sync", "cpu-attention", "full"):
            for batch in (256, 1024):
                plan = plan_of(args.trace, strategy, batch)
                fast = steps_per_s(recurrence.run, plan, 5)
                ref = float("nan") if args.no_simpy else steps_per_s(engine.run, plan, 1)
                print(f"{strategy + ' batch ' + str(batch):<40} {fast:>11,.0f} {ref:>9,.0f} {fast / ref:>6.0f}")
        print("target: >= 20,000 steps/s at batch 256 (48 layers)")
    cores = os.cpu_count()
    print(f"timings are one machine's ({cores} cores, load average {os.getloadavg()[0]:.2f} at the end), noisy when "
          "it is shared")


if __name__ == "__main__":
    main()
