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
    expected = pc.host.index_select(0, torch.as_tensor(pc.staged.gather))
    assert torch.equal(pc.out, expected)
    assert pc.nbytes == pc.S * pieces and pc.S >= 256  # a piece is at least one token's rows


def test_the_copy_engine_counts_what_it_staged():
    pc = ReplayPieces(torch.device("cpu"), 1024, 16)
    copier = pc.copier("dma")
    pc.staged.prepare("dma", pc.device)
    copier.stage(0, pc.host, None, pc.staged, pc.out)
    assert copier.counts.h2d_pieces[0] == 16 and copier.counts.h2d_bytes[0] == pc.nbytes
    assert copier.counts.h2d_calls[0] == 16  # dma: one copy call per piece
