"""Round-to-nearest grids: error bounds, symmetric/asymmetric, short last groups."""

import pytest
import torch

from lmpress.quant.grid import fake_quantize


def sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - x).pow(2).sum()))


@pytest.mark.parametrize(("bits", "min_db"), [(8, 40.0), (4, 17.0), (3, 11.0), (2, 4.0)])
def test_rtn_sqnr(bits: int, min_db: float) -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    assert sqnr_db(w, fake_quantize(w, bits, 64)) > min_db


def test_levels_and_error_bound() -> None:
    torch.manual_seed(0)
    w = torch.randn(8, 128)
    q = fake_quantize(w, 4, 32)
    for g in range(4):
        block = q[:, 32 * g : 32 * (g + 1)]
        assert all(len(row.unique()) <= 16 for row in block)
        scale = (
            w[:, 32 * g : 32 * (g + 1)].amax(1).clamp(min=0) - w[:, 32 * g : 32 * (g + 1)].amin(1).clamp(max=0)
        ) / 15
        assert ((block - w[:, 32 * g : 32 * (g + 1)]).abs() <= scale[:, None] / 2 + 1e-5).all()
    sym = fake_quantize(w, 4, 32, symmetric=True)
    assert sqnr_db(w, sym) > 15


def test_short_last_group_and_dtype() -> None:
    torch.manual_seed(0)
    w = torch.randn(16, 100, dtype=torch.bfloat16)  # 100 = 64 + a short group of 36
    q = fake_quantize(w, 8, 64)
    assert q.shape == w.shape and q.dtype == torch.bfloat16
    assert sqnr_db(w.float(), q.float()) > 35
    with pytest.raises(ValueError, match="bits must be 2..8, got 12"):
        fake_quantize(w, 12)
