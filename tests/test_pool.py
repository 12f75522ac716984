"""calibration/pool.py: repeated calibrations pooled point by point, on the two real calibrations committed under
calibration/measured (the fourth and fifth CPU passes, 40 minutes apart on the same VM)."""

import json
from pathlib import Path

import pytest

from tiersim.calibration.pool import pool, spread
from tiersim.calibration.profile import build_profile, fits
from tiersim.errors import TiersimError

MEASURED = Path(__file__).resolve().parents[1] / "calibration" / "measured"


@pytest.fixture(scope="module")
def raws() -> list[dict]:
    return [json.loads((MEASURED / f"cpu-vm-2026-12-01-{p}" / "cpu.raw.json").read_text()) for p in ("loop4", "loop5")]


def test_pooled_timings_are_medians_of_the_repeats(raws):
    pooled = pool(raws)
    a, b = (r["copies"]["h2d_pinned"][3]["median_s"] for r in raws)
    assert pooled["copies"]["h2d_pinned"][3]["median_s"] == pytest.approx((a + b) / 2)  # the median of two
    assert pooled["copies"]["h2d_pinned"][3]["bytes"] == raws[0]["copies"]["h2d_pinned"][3]["bytes"]
    assert pooled["wall_s"] == pytest.approx(raws[0]["wall_s"] + raws[1]["wall_s"])
    assert "fits" not in pooled and "profile" not in pooled  # derived: refitted after pooling


def test_three_repeats_take_the_middle_and_flags_follow_the_majority(raws):
    first = raws[0]
    slow, fast = json.loads(json.dumps(first)), json.loads(json.dumps(first))
    point = ("launch", "noop_layer")
    slow[point[0]][point[1]]["median_s"] *= 3.0
    fast[point[0]][point[1]]["median_s"] *= 0.5
    slow[point[0]][point[1]]["flagged"] = True
    slow[point[0]][point[1]]["reason"] = "CV too wide"
    pooled = pool([slow, first, fast])
    assert pooled["launch"]["noop_layer"]["median_s"] == first["launch"]["noop_layer"]["median_s"]
    assert pooled["launch"]["noop_layer"]["flagged"] is False  # one of three
    assert pooled["launch"]["noop_layer"]["reason"] == ""


def test_pooled_raw_fits_into_a_profile_between_the_repeats(raws):
    pooled = pool(raws)
    profile = build_profile(pooled, fits(pooled))
    each = [r["profile"]["hbm_gbps_effective"] for r in raws]
    assert 0.8 * min(each) <= profile.hbm_gbps_effective <= 1.2 * max(each)
    apart = spread([r["profile"] for r in raws])
    assert apart["hbm_gbps_effective"]["values"] == each
    half = (max(each) - min(each)) / 2
    assert apart["hbm_gbps_effective"]["spread_pct"] == pytest.approx(100 * half / apart["hbm_gbps_effective"]["median"])


def test_a_list_whose_length_differs_takes_the_common_length(raws):
    short = json.loads(json.dumps(raws[0]))
    short["copies"]["h2d_pinned"] = short["copies"]["h2d_pinned"][:-1]
    pooled = pool([raws[0], raws[1], short])
    assert len(pooled["copies"]["h2d_pinned"]) == len(raws[0]["copies"]["h2d_pinned"])


def test_nothing_to_pool_is_an_error():
    with pytest.raises(TiersimError, match="at least one"):
        pool([])
