"""hw/copy_bench.ReplayPieces: the mechanism benchmarks stage pieces through the replay's own copy engine."""

import pytest

torch = pytest.importorskip("torch")

from tiersim.hw.copies import CPU_METHODS  # noqa: E402
from tiersim.hw.copy_bench import ReplayPieces  # noqa: E402


@pytest.mark.parametrize("method", CPU_METHODS)
@pytest.mark.parametrize(("piece_bytes", "pieces"), [(256, 64), (16 * 1024, 8), (100, 3)])
def test_every_piece_lands_in_the_attention_order(method, piece_bytes, pieces):
    pc = ReplayPieces(torch.device("cpu"), piece_bytes, pieces, seed=1)
    pc.host.copy_(torch.randn(pc.host.shape).to(pc.host.dtype))
    pc.fn(method)()
    expected = pc.host.index_select(0, torch.as_tensor(pc.gather))
    assert torch.equal(pc.out, expected)
    assert pc.nbytes == pc.S * pieces and pc.S >= 256  # a piece is at least one token's rows


def test_the_copy_engine_counts_what_it_staged():
    pc = ReplayPieces(torch.device("cpu"), 1024, 16)
    copier = pc.copier("dma")
    staged = pc.staged_set()
    staged.prepare("dma", pc.device)
    copier.stage(0, pc.host, None, staged, pc.out)
    assert copier.counts.h2d_pieces[0] == 16 and copier.counts.h2d_bytes[0] == pc.nbytes
    assert copier.counts.h2d_calls[0] == 16  # dma: one copy call per piece


def test_the_simulator_charges_a_dma_piece_what_the_mechanism_fit_measured():
    """dma_half_size_kb is the per-piece excess at the pinned link rate the simulator divides it by, so that a dma piece
    costs copy_latency_us + the excess: the fit's own cost per piece (on the committed fifth-pass calibration)."""
    import json
    from pathlib import Path

    from tiersim.calibration.profile import build_profile, fits
    from tiersim.sim.copies import CopyCost, available_methods

    raw = json.loads((Path(__file__).resolve().parents[1] / "calibration" / "measured" / "cpu-vm-2026-12-01-loop5"
                      / "cpu.raw.json").read_text())
    fitted = fits(raw)
    profile = build_profile(raw, fitted)
    dma = next(m for m in available_methods(profile) if m.name == "dma")
    cost = CopyCost(dma, profile, profile.ddr_gbps)
    pieces = 1000
    seconds = float(cost.seconds(1.0, pieces, pieces, profile.h2d_gbps_pinned))  # one byte: the per-piece terms alone
    assert seconds / pieces * 1e6 == pytest.approx(fitted["mechanisms"]["dma"]["latency_us"], rel=1e-6)
