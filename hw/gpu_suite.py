"""All GPU work in one entry: calibrate, the validate suite, the TieredCache exactness check, under one folder.

    python -m tiersim.hw.gpu_suite --out DIR [--device cpu|cuda|cuda:N] [--quick] [--budget-s SECONDS]

Calibrates on the suite's fit shapes (hw/calibrate.py: copy curves per direction and memory kind, both
directions at once, every copy mechanism against piece size and count, a copy beside a GEMM and beside
attention, host gathers by threads, GEMM and attention roofline points, whole layers and the lm_head,
the launch floor and the per-step overhead), measures the suite's own shapes as held out, then replays
the suite's configurations (validate/suite.py: shapes the fit never saw x strategies x batches x β x
copy mechanisms) and writes eight files, the most a lent device hands back: DIR/profile.toml (with
its [fit] and [validation] tables), DIR/profile.raw.json, DIR/validate_suite.json,
DIR/exactness.json, DIR/summary.json, DIR/README.md (the report: machine, error table, fit
residuals), DIR/report.html and DIR/validation_scatter.png. Sized to finish in under 8 minutes on an
H200: the suite stops starting configurations when its share of the budget is spent (and lists them
as skipped). `--device cpu --quick` runs the same steps, shortened, on this machine (CI runs it);
its results are CPU measurements, never GPU ones.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import click

from tiersim.calibration.profile import write_profile
from tiersim.errors import TiersimError
from tiersim.fileio import atomic_path, write_json
from tiersim.hw.calibrate import calibrate
from tiersim.hw.device import DeviceError, resolve_device
from tiersim.policy import PolicyConfig
from tiersim.validate import run_suite, suite_for
from tiersim.validate.report import write_report

BUDGET_S = 8 * 60


def exactness(device: str, quick: bool) -> dict:
    """hw.TieredCache on the device with a tiny random Llama: with r = 0 the logits of every step are
    bit-identical to transformers' default cache for every β; with r > 0 bit-identical across β."""
    try:  # imported here: it loads torch and transformers, which `import tiersim.hw.gpu_suite` does not need
        from tiersim.hw import tiered_cache
    except ImportError as e:
        return {"ran": False, "reason": f"tiersim.hw.tiered_cache not importable: {e}"}
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).to(device).eval()
    prompt = torch.randint(0, 256, (24,), generator=torch.Generator().manual_seed(1)).tolist()
    new = 40 if quick else 96

    def run(policy: PolicyConfig | None):
        logits = []
        cache = None if policy is None else tiered_cache.TieredCache.for_model(model, policy)
        tiered_cache.decode(model, prompt, cache, new, on_logits=lambda i, x: logits.append(x.detach().cpu()))
        return torch.stack(logits)

    base = run(None)
    knobs = dict(sinks=2, window=8, interval=8)
    out = {"ran": True, "device": device, "model": "random Llama, 2 layers, 4 heads (2 KV), hidden 64",
           "new_tokens": new, "policy": knobs, "r0_identical_to_default": {}, "r_identical_across_beta": {}}
    for beta in (0.3, 0.5, 0.7):
        out["r0_identical_to_default"][str(beta)] = bool(torch.equal(run(PolicyConfig(hbm_ratio=beta, evict_ratio=0.0,
                                                                                         **knobs)), base))
    runs = [run(PolicyConfig(hbm_ratio=beta, evict_ratio=0.1, **knobs)) for beta in (0.3, 0.5, 0.7)]
    out["r_identical_across_beta"]["0.1"] = bool(all(torch.equal(runs[0], r) for r in runs[1:]))
    out["r_differs_from_full"] = bool(not torch.equal(runs[0], base))
    out["passed"] = all(out["r0_identical_to_default"].values()) and all(out["r_identical_across_beta"].values())
    return out


def run(out: Path, device: str = "cuda", quick: bool = False, budget_s: float = BUDGET_S, log=print) -> dict:
    """Calibrate, validate the suite with the fresh profile, check exactness; write everything under `out`."""
    dev = resolve_device(device)
    wall = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    suite = suite_for(device, quick)
    first, *more = suite.fit_shapes
    held = () if quick else tuple(s.model for s in suite.shapes)
    log(f"calibrating {device} on {', '.join(m.name for m in suite.fit_shapes)} shapes"
        f"{'' if not held else ', ' + ', '.join(m.name for m in held) + ' held out'}{' (quick)' if quick else ''} ...")
    cal = calibrate(device, first, quick=quick, shapes=more, held_out=held)
    toml_path, raw_path = cal.write(out / "profile.toml")
    log(f"wrote {toml_path} and {raw_path} ({time.perf_counter() - wall:.0f} s)")
    left = budget_s - (time.perf_counter() - wall) - (15 if quick else 60)  # keep time for the exactness check
    log("validate suite ...")
    result = run_suite(device, cal.profile, Path(tempfile.mkdtemp(prefix="tiersim-suite-")), quick=quick,
                       budget_s=max(0.0, left), report=False,
                       progress=lambda r: log(f"  {r['config']['model']:>14} {r['config']['strategy']:>14} "
                                              f"{r['config']['copy_method']:>11} batch {r['config']['batch']:>4} "
                                              f"β {r['config']['policy']['hbm_ratio']}: measured "
                                              f"{r['measured_step_ms']:.3f} ms, predicted {r['predicted_step_ms']:.3f} ms "
                                              f"({r['step_error_pct']:+.1f}%)"))
    write_json(out / "validate_suite.json", result)
    if result["validation"]:
        write_profile(dataclasses.replace(cal.profile, validation=result["validation"]), toml_path,
                      f"Written by `python -m tiersim.hw.gpu_suite`; raw measurements and fits in {raw_path.name}; "
                      "[validation] from validate_suite.json.")
    log("exactness check ...")
    exact = exactness(str(dev), quick)
    write_json(out / "exactness.json", exact)
    summary = {"device": result["device"], "profile": str(toml_path), "suite": result["summary"],
               "validation": result["validation"], "fit": cal.profile.fit, "skipped": result["skipped"],
               "exactness_passed": exact.get("passed"), "exactness_ran": exact["ran"],
               "wall_s": time.perf_counter() - wall, "quick": quick}
    write_json(out / "summary.json", summary)
    report = write_report(result, out, formats=("png",), name="README.md")
    note = (f"\n{'Shortened (--quick) run. ' if quick else ''}Profile: `profile.toml`; suite: `validate_suite.json`; "
            f"exactness: `exactness.json` ({'passed' if exact.get('passed') else 'not run' if not exact['ran'] else 'FAILED'})"
            f"; {summary['wall_s']:.0f} s in all.\n")
    with atomic_path(report[0]) as tmp:
        Path(tmp).write_text(report[0].read_text() + note)
    log(f"done in {summary['wall_s']:.0f} s; results in {out}")
    return summary


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
               help=__doc__.split("\n\n")[0])
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for every result (created).")
@click.option("--device", default="cuda", show_default=True, metavar="cpu|cuda|cuda:N",
              help="Where to measure; cpu is a real measurement of this machine, never a GPU result.")
@click.option("--quick", is_flag=True, help="Fewer sizes, shapes, repeats and configurations (CI runs it with --device cpu).")
@click.option("--budget-s", type=click.FloatRange(min=0), default=BUDGET_S, show_default=True, metavar="SECONDS",
              help="Wall-clock budget; the suite starts no configuration past it.")
def command(out: Path, device: str, quick: bool, budget_s: float) -> None:
    """Calibrate, validate the suite and check exactness on one device; everything under --out."""
    run(out, device, quick, budget_s)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: exit 0 on success, 2 when the device is missing or the usage is wrong, 1 on other
    input errors; each error is one line."""
    try:
        command.main(args=argv, prog_name="python -m tiersim.hw.gpu_suite", standalone_mode=False)
    except DeviceError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    except TiersimError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.Abort:
        print("Aborted.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
