"""Offline re-fits of this folder's calibration (cpu.raw.json) with other compute-model structures, each scored on
the per-layer and lm_head times that the three suite runs measured in their `full` replays (run*/validate_suite.json).

    python calibration/measured/cpu-vm-2026-12-01-loop3/refit.py

Structures: the cost model's own (bandwidth, FLOP rate, launch, per-GEMM cost, attention efficiency, roofline
overlap free), the overlap held at 0 (memory and FLOP time add) and at 1 (the plain max), and the first plus a cost
per output row of every GEMM (ns per row, a candidate for CPU GEMVs whose reduction width sets their speed).
Printed per validated shape and batch: the relative error of each of the six full replays (3 runs x 2 configs).
"""

import json
from pathlib import Path

import numpy as np
from scipy.optimize import least_squares

from tiersim.calibration.fit_compute import Work, layer_work
from tiersim.calibration.profile import shapes_of
from tiersim.specs.catalog import model_spec
from tiersim.validate.suite import _spec

HERE = Path(__file__).parent
GB = 1e9
QWEN05 = _spec("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B config.json", layers=24, attention_heads=14, kv_heads=2, head_dim=64,
               hidden=896, intermediate=4864, vocab=151936, tied_embeddings=True, family="qwen2")
SHAPES = {"smollm2-135m": model_spec("smollm2-135m"), "qwen2.5-0.5b": QWEN05}
SUITE_KV = 190  # mean KV tokens per sequence of the suite's replays (32 prompt + 320 generated, mid-run)


def rows_of(m, kind: str) -> int:
    """Output rows of the GEMMs of one layer (fused qkv, o, fused gate/up, down) or of the lm_head."""
    if kind == "head":
        return m.vocab
    return (m.attention_heads + 2 * m.kv_heads) * m.head_dim + 2 * m.hidden + 2 * m.intermediate


def fitted_work(raw: dict) -> tuple[Work, np.ndarray]:
    parts, rows = [], []
    for m, layers, head in shapes_of(raw, "fitted"):
        lp = [p for p in layers if not p.get("flagged")]
        hp = [p for p in head if not p.get("flagged")]
        parts.append(layer_work(m, lp, hp))
        rows += [rows_of(m, "layer")] * len(lp) + [rows_of(m, "head")] * len(hp)
    return Work.join(parts), np.array(rows, float)


def suite_work() -> tuple[Work, np.ndarray, list[str]]:
    parts, rows, names = [], [], []
    for i in (1, 2, 3):
        for c in json.loads((HERE / f"run{i}/validate_suite.json").read_text())["configs"]:
            cf, r = c["config"], c["replay_full"]
            m, b = SHAPES[cf["model"]], cf["batch"]
            layer = r["layers_ms_mean"] / cf["layers_replayed"] / 1e3
            parts.append(layer_work(m, [{"tokens": b, "batch": b, "kv_tokens": SUITE_KV, "median_s": layer}],
                                    [{"tokens": b, "median_s": r["head_ms_mean"] / 1e3}]))
            rows += [rows_of(m, "layer"), rows_of(m, "head")]
            names += [f"{cf['model']} batch {b} layer", f"{cf['model']} batch {b} lm_head"]
    return Work.join(parts), np.array(rows, float), names


def predict(w: Work, rows: np.ndarray, x, overlap: float | None) -> np.ndarray:
    gbps, tflops, launch_us, fixed_us, att, ov, row_ns = x
    return w.predict(gbps * GB, tflops * 1e12, launch_us * 1e-6, att, ov if overlap is None else overlap,
                     fixed_us * 1e-6) + rows * row_ns * 1e-9


def main() -> None:
    raw = json.loads((HERE / "cpu.raw.json").read_text())
    fw, frows = fitted_work(raw)
    sw, srows, names = suite_work()
    cases = (("cost model (overlap free)", None, False), ("overlap 0: memory + FLOP time", 0.0, False),
             ("overlap 1: the plain max", 1.0, False), ("cost model + ns per GEMM output row", None, True))
    for label, overlap, per_row in cases:
        hi_row = 500.0 if per_row else 1e-9
        fit = least_squares(lambda x, o=overlap: predict(fw, frows, x, o) / fw.time - 1,
                            [10, 0.2, 100, 50, 0.8, 0.5, 0.0 if not per_row else 20],
                            bounds=([1, 0.01, 0, 0, 0.05, 0, 0], [50, 5, 400, 300, 1, 1, hi_row]))
        rms = float(np.sqrt(np.mean(fit.fun**2)))
        print(f"{label}: GB/s {fit.x[0]:.2f}, TFLOP/s {fit.x[1]:.3f}, launch {fit.x[2]:.0f} us, per GEMM "
              f"{fit.x[3]:.0f} us, attention eff {fit.x[4]:.2f}, overlap {fit.x[5] if overlap is None else overlap:.2f}, "
              f"per row {fit.x[6]:.1f} ns; residual on the fitted shapes {100 * rms:.1f}% rms")
        err = predict(sw, srows, fit.x, overlap) / sw.time - 1
        by: dict[str, list[float]] = {}
        for n, e in zip(names, err, strict=True):
            by.setdefault(n, []).append(e)
        for n, es in by.items():
            print(f"    {n:<34} " + " ".join(f"{100 * e:+4.0f}%" for e in es))


if __name__ == "__main__":
    main()
