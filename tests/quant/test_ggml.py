"""GGML block types: bytes and dequantization bit-exact with the gguf package, fitting error bounds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmpress.formats import ggml, ggml_bytes
from lmpress.quant import ggml_fit
from lmpress.quant.base import QuantError, grid_settings

gguf = pytest.importorskip("gguf")

# relative squared error of a fitted Gaussian matrix, an upper bound per type (measured ~20% below)
REL_MSE = {
    "q8_0": 3e-5, "q6_k": 4e-4, "q5_1": 1.5e-3, "q5_k": 1.6e-3, "q5_0": 2e-3,
    "q4_1": 6e-3, "q4_k": 6.5e-3, "q4_0": 8.5e-3, "q3_k": 2.6e-2, "q2_k": 9e-2,
    "iq4_nl": 6.2e-3, "iq4_xs": 6.2e-3, "iq3_s": 1.9e-2, "iq3_xxs": 0.037,
    "iq2_s": 0.065, "iq2_xs": 0.09, "iq2_xxs": 0.12,
}  # fmt: skip


def _gauss(rows: int = 16, n: int = 512, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, n, generator=g) * 0.02


@pytest.mark.parametrize("name", ggml.GRID_NAMES)
def test_bytes_and_dequantize_match_the_gguf_package(name: str) -> None:
    t = ggml.ggml_type(name)
    w = _gauss()
    b = ggml_fit.fit_grid(w, t)
    raw = ggml_bytes.pack(b)
    assert raw.shape == (16, t.row_bytes(512)) and raw.dtype == torch.uint8
    theirs = gguf.quants.dequantize(raw.numpy(), gguf.GGMLQuantizationType(t.type_id)).reshape(16, 512)
    assert np.array_equal(ggml.dequantize(b).numpy(), theirs)  # bit-exact
    back = ggml_bytes.unpack(raw, t, 512)
    assert torch.equal(back.codes, b.codes) and torch.equal(ggml_bytes.pack(back), raw)


@pytest.mark.parametrize("name", ggml.GRID_NAMES)
def test_any_bytes_unpack_and_pack_back(name: str) -> None:
    """Every bit of a block is read and written back: random bytes with finite float16 scales."""
    t = ggml.ggml_type(name)
    g = torch.Generator().manual_seed(1)
    raw = torch.randint(0, 256, (4, t.row_bytes(512)), dtype=torch.uint8, generator=g)
    b = ggml_bytes.unpack(raw, t, 512)
    b.d = torch.where(torch.isfinite(b.d.float()), b.d, torch.zeros_like(b.d))
    if b.dmin is not None:
        b.dmin = torch.where(torch.isfinite(b.dmin.float()), b.dmin, torch.zeros_like(b.dmin))
    raw = ggml_bytes.pack(b)
    assert torch.equal(ggml_bytes.pack(ggml_bytes.unpack(raw, t, 512)), raw)
    theirs = gguf.quants.dequantize(raw.numpy(), gguf.GGMLQuantizationType(t.type_id)).reshape(4, 512)
    assert np.array_equal(ggml.dequantize(b).numpy(), theirs, equal_nan=True)


@pytest.mark.parametrize("name", ggml.GRID_NAMES)
def test_fit_error_bounds(name: str) -> None:
    w = _gauss(64, 1024)
    deq = ggml.dequantize(ggml_fit.quantize(w, name))
    rel = float((deq - w).pow(2).mean() / w.pow(2).mean())
    assert rel < REL_MSE[name]


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"])
def test_fit_beats_the_reference_rounding(name: str) -> None:
    """Least-squares scale search: no worse than the gguf package's (llama.cpp's reference) rounding."""
    t = ggml.ggml_type(name)
    w = _gauss(64, 1024)
    ours = ggml.dequantize(ggml_fit.quantize(w, name))
    qtype = gguf.GGMLQuantizationType(t.type_id)
    ref = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), qtype), qtype)
    assert float((ours - w).pow(2).mean()) <= float(((torch.from_numpy(ref) - w) ** 2).mean())


def test_importance_lowers_the_weighted_error() -> None:
    w = _gauss(32, 512)
    imp = torch.rand(512, generator=torch.Generator().manual_seed(3)) ** 4 * 100
    plain = ggml.dequantize(ggml_fit.quantize(w, "q3_k"))
    weighted = ggml.dequantize(ggml_fit.quantize(w, "q3_k", importance=imp))
    err = lambda d: float(((d - w).pow(2) * imp).sum())  # noqa: E731
    assert err(weighted) < 0.9 * err(plain)


def test_grid_of_reproduces_the_stored_weights() -> None:
    """The (scale, zero) GPTQ rounds on gives the stored weights to float32 rounding."""
    for name in ("q4_k", "q2_k", "q3_k", "q6_k", "q4_1"):
        b = ggml_fit.quantize(_gauss(), name)
        S, Z = ggml.grid_of(b)
        u = b.codes.float().view(16, -1, b.type.sub)
        approx = ((u - Z[..., None]) * S[..., None]).view(16, 512)
        assert torch.allclose(approx, ggml.dequantize(b), atol=1e-6, rtol=1e-5), name


def test_rows_off_the_super_block_fall_back_like_llama_cpp() -> None:
    assert grid_settings("x", 768, "q4_k").grid == "q4_k"
    assert grid_settings("x", 896, "q4_k").grid == "q5_0"
    assert grid_settings("x", 896, "q6_k").grid == "q8_0"
    assert grid_settings("x", 896, "q3_k").grid == "q4_0"
    with pytest.raises(QuantError, match="not a multiple of 32"):
        grid_settings("x", 100, "q4_k")
