"""Speed of the serving loop: an hour of open-loop serving at 10 req/s (issue 11: <= 30 s of wall time).

r1-qwen-14b on h200-sxm, `full`, vLLM defaults (max_num_seqs 256, max_num_batched_tokens 8192),
Poisson arrivals, 512-token prompts, GSM8K-preset outputs (lognormal, median 2,500). Prints the
wall time, scheduler steps and SimPy events per wall second, measured in one run.

    python benchmarks/serving_speed.py [--hours 1] [--rate 10] [--strategy full]
"""

from __future__ import annotations

import argparse
import time

from tiersim.sim.blocks import kv_capacity
from tiersim.sim.costs import CostModel
from tiersim.sim.scheduler import fraction_split
from tiersim.sim.serving import SLO, serve
from tiersim.sim.step_time import CostStepTime
from tiersim.specs import hardware_spec, model_spec
from tiersim.strategy import get_strategy
from tiersim.workload.arrivals import poisson_requests


def main() -> None:
    """Run the serving loop once and print its speed."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hours", type=float, default=1.0)
    ap.add_argument("--rate", type=float, default=10.0)
    ap.add_argument("--strategy", default="full")
    ap.add_argument("--model", default="r1-qwen-14b")
    ap.add_argument("--hardware", default="h200-sxm")
    args = ap.parse_args()
    model, hw, strategy = model_spec(args.model), hardware_spec(args.hardware), get_strategy(args.strategy)
    duration = 3600.0 * args.hours
    t0 = time.perf_counter()
    requests = poisson_requests(args.rate, duration_s=duration, prompt_tokens=512, output_tokens="gsm8k", seed=0)
    t1 = time.perf_counter()
    result = serve(requests, CostStepTime(CostModel(model, hw), strategy), kv_capacity(model, hw, strategy),
                   until_s=duration, slo=SLO(2000, 50),
                   split=fraction_split(0.5, 0.1, keeps_ddr=strategy.keeps_ddr) if strategy.applies_policy else None)
    t2 = time.perf_counter()
    m = result.metrics
    wall = t2 - t1
    print(f"{args.model} on {args.hardware}, {strategy.name}: {duration:.0f} s at {args.rate} req/s, "
          f"{len(requests):,} requests ({t1 - t0:.2f} s to draw)")
    print(f"  serve: {wall:.2f} s wall  ({'OK' if wall <= 30 * args.hours else 'OVER'} the 30 s/hour target)")
    print(f"  {m['steps']:,} scheduler steps = {m['steps'] / wall:,.0f} steps/s; {m['sim_events']:,} SimPy events = "
          f"{m['sim_events'] / wall:,.0f} events/s; {m['tokens_generated'] / wall:,.0f} simulated tokens/s")
    print(f"  served: {m['requests_finished']:,} finished, {m['requests_waiting']:,} waiting, "
          f"{m['throughput_tok_s']:,.0f} tok/s, TPOT p50 {m['tpot_ms_p50']:.1f} ms, "
          f"mean concurrency {m['mean_concurrency']:.0f}, preemptions {m['preemptions']:,}")


if __name__ == "__main__":
    main()
