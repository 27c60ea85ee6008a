"""llama.cpp's i-quant types (IQ4_NL, IQ4_XS, IQ3_S, IQ3_XXS and the IQ2s): bytes bit-exact with
the ``gguf`` package's dequantizers, the importance-weighted scale search, and the layer computing
with the decoded weights."""

from __future__ import annotations

import typing

import numpy as np
import pytest
import torch
from torch import nn

from lmpress.formats import ggml, ggml_bytes, iquant
from lmpress.formats.iquant_grids import iq3s_grid
from lmpress.nn.gguf_linear import GGUFLinear
from lmpress.quant import ggml_fit
from lmpress.quant.base import QuantError, WeightQuantConfig, grid_settings
from lmpress.quant.gptq import GPTQConfig
from lmpress.quant.gptq import apply as gptq_apply

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
IQ = {
    "iq4_nl": Q.IQ4_NL,
    "iq4_xs": Q.IQ4_XS,
    "iq3_s": Q.IQ3_S,
    "iq3_xxs": Q.IQ3_XXS,
    "iq2_s": Q.IQ2_S,
    "iq2_xs": Q.IQ2_XS,
    "iq2_xxs": Q.IQ2_XXS,
}
# relative squared error on heavy-tailed weights: at most ratio x the k-quant's (iq3_xxs 3.06 bits
# against q3_k's 3.44; iq2_s 2.56, iq2_xs 2.31, iq2_xxs 2.06 against q2_k's 2.63); measured iq4_nl
# 0.0087, iq4_xs 0.0089, iq3_s 0.024, iq3_xxs 0.040, iq2_s 0.091, iq2_xs 0.108, iq2_xxs 0.16
# against q4_0 0.0125 (4.5 bits), q3_k 0.031 (3.44 bits), q2_k 0.090
BEATS = {
    "iq4_nl": ("q4_0", 0.8),
    "iq4_xs": ("q4_0", 0.8),
    "iq3_s": ("q3_k", 0.85),
    "iq3_xxs": ("q3_k", 1.5),
    "iq2_s": ("q2_k", 1.05),
    "iq2_xs": ("q2_k", 1.3),
    "iq2_xxs": ("q2_k", 2.0),
}


def _random_bytes(t: ggml.GGMLType, rows: int, n: int, seed: int = 0) -> torch.Tensor:
    """Random blocks of type ``t`` whose float16 scale is finite.  (rows, row_bytes) uint8"""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (rows, t.row_bytes(n)), dtype=torch.uint8, generator=g)
    d = torch.randn(rows * n // t.block, generator=g).half().view(torch.uint8).view(-1, 2)
    raw.view(-1, t.type_size)[:, :2] = d
    return raw


def _gguf_decode(raw: torch.Tensor, name: str) -> np.ndarray:
    return gguf.quants.dequantize(raw.numpy(), IQ[name])  # type: ignore[no-any-return]


def _weights(rows: int, n: int, seed: int = 0) -> torch.Tensor:
    """Heavy-tailed weights, like a trained layer's (a few large outliers per row).  (rows, n)"""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, n, generator=g)
    chi = torch.randn(rows, n, 4, generator=g).pow(2).mean(-1)
    return 0.02 * z / chi.sqrt()  # Student t with 4 degrees of freedom


@pytest.mark.parametrize("name", list(IQ))
def test_bytes_decode_bit_exactly_as_gguf(name: str) -> None:
    t = ggml.ggml_type(name)
    raw = _random_bytes(t, 6, 512)
    b = ggml_bytes.unpack(raw, t, 512)
    assert torch.equal(ggml_bytes.pack(b), raw)  # every byte is read back
    ours = ggml.dequantize(b).numpy()
    ref = _gguf_decode(raw, name).reshape(ours.shape)
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))


def test_iq4_xs_sub_scales_span_the_signed_6_bit_range() -> None:
    t = ggml.ggml_type("iq4_xs")
    b = ggml_bytes.unpack(_random_bytes(t, 8, 1024), t, 1024)
    assert b.sc is not None and int(b.sc.min()) == -32 and int(b.sc.max()) == 31


def test_nearest_in_table_is_the_brute_force_nearest() -> None:
    x = torch.randn(64, 32) * 3
    S = torch.rand(64, 1) * 0.1 - 0.02  # some negative scales: the table's order flips
    codes = ggml.nearest_in_table(x, S).long()
    err = (x[..., None] - S[..., None] * ggml.TABLE).abs()  # (64, 32, 16)
    assert torch.allclose(err.gather(-1, codes[..., None]).squeeze(-1), err.amin(-1), atol=1e-6)


def test_grid_names_are_the_types() -> None:
    assert typing.get_args(ggml.GridName) == ggml.GRID_NAMES


@pytest.mark.parametrize("name", ["iq3_s", "iq3_xxs", "iq2_s", "iq2_xs", "iq2_xxs"])
def test_codebooks_are_llama_cpps(name: str) -> None:
    lat, theirs = iquant.LATTICES[name], getattr(gguf.quants, name.upper())
    theirs.init_grid()
    ours = torch.tensor(lat.values)[lat.grid().long()]
    assert np.array_equal(ours.numpy(), theirs.grid.reshape(ours.shape))


def test_lattice_codes_are_the_weighted_nearest_codebook_points() -> None:
    x, wt = torch.randn(8, 64), torch.rand(8, 64)
    S = torch.rand(8, 2) * 0.3 + 0.05  # (rows, n/32)
    lat = iquant.LATTICES["iq3_s"]
    mag, sgn = iquant.lattice_values(iquant.lattice_codes(x, S, lat, wt), lat)
    assert torch.equal(sgn, torch.where(x < 0, -1.0, 1.0))
    s = S.repeat_interleave(32, dim=1).view(-1, 4, 1)  # (groups, 4, 1)
    points = (2 * iq3s_grid().float() + 1).T[None]  # (1, 4, 512)
    a, w = x.abs().view(-1, 4, 1), wt.view(-1, 4, 1)
    best = (w * (a - s * points).pow(2)).sum(1).amin(-1)  # (groups,)
    ours = (w * (a - s * mag.view(-1, 4, 1)).pow(2)).sum(1)[:, 0]
    assert torch.allclose(ours, best, rtol=1e-5, atol=1e-6)


def test_iq3_s_codes_off_the_codebook_are_refused() -> None:
    codes = torch.zeros(1, 256, dtype=torch.uint8)  # magnitudes (1, 1, 1, 1): a codebook point
    lat = iquant.LATTICES["iq3_s"]
    assert int(iquant.grid_indices(codes, lat)[0, 0]) == 0
    codes[0, :4] = torch.tensor([7, 7, 7, 7], dtype=torch.uint8)  # (15, 15, 15, 15) is not
    with pytest.raises(ValueError, match="no point of its codebook"):
        iquant.grid_indices(codes, lat)


@pytest.mark.parametrize("name", ["iq2_xs", "iq2_xxs", "iq3_xxs"])
def test_parity_signs_are_even_and_flip_the_cheapest_weight(name: str) -> None:
    x = torch.randn(16, 256) * 0.02
    b = ggml_fit.quantize(x, name)
    neg = ((b.codes >> 3) & 1).view(16, -1, 8)
    assert bool((neg.sum(-1) % 2 == 0).all())
    wrong = (neg.view(16, 256) == 1) != (x < 0)  # weights whose stored sign is not their own
    assert int(wrong.view(16, -1, 8).sum(-1).max()) <= 1  # at most one per group of 8
    mag, _ = iquant.lattice_values(b.codes, iquant.LATTICES[name])
    cost = (x.abs() * mag).view(16, -1, 8)
    flipped = wrong.view(16, -1, 8).any(-1)
    assert torch.equal(
        wrong.view(16, -1, 8).float().argmax(-1)[flipped], cost.argmin(-1)[flipped]
    )  # the flip goes where it costs least


@pytest.mark.parametrize("name", list(IQ))
def test_quantized_weights_decode_as_gguf_and_beat_the_k_quant(name: str) -> None:
    """At 4.5 (IQ4_NL), 4.25 (IQ4_XS) and 3.44 (IQ3_S) bits per weight the i-quant's error is
    below Q4_0's (4.5 bits) or Q3_K's (3.44 bits) on heavy-tailed weights; the layer's weight is the
    bytes' gguf decoding."""
    w = _weights(64, 512)
    b = ggml_fit.quantize(w, name)
    raw = ggml_bytes.pack(b)
    decoded = torch.from_numpy(_gguf_decode(raw, name)).view(64, 512)
    assert torch.equal(decoded, ggml.dequantize(b))
    err = float((decoded - w).pow(2).mean() / w.pow(2).mean())
    other, ratio = BEATS[name]
    err_k = float((ggml.dequantize(ggml_fit.quantize(w, other)) - w).pow(2).mean() / w.pow(2).mean())
    assert err < ratio * err_k, (err, err_k)


def test_scale_search_beats_the_largest_weight_on_the_table_end() -> None:
    """Without importance the error is weighted by x² (llama.cpp's choice); with a flat importance
    vector it is the plain squared error. Either way the search beats the first candidate."""
    w = _weights(128, 256, seed=1)
    t = ggml.ggml_type("iq4_nl")
    amax = w.view(-1, 32).gather(-1, w.view(-1, 32).abs().argmax(-1, keepdim=True)).view(128, -1)
    plain = ggml.dequantize(ggml.from_sub_grid(w, t, amax / -127)) - w
    fitted = ggml.dequantize(ggml_fit.quantize(w, t)) - w
    flat = ggml.dequantize(ggml_fit.quantize(w, t, importance=torch.ones(256))) - w
    # measured: x²-weighted 2.08e-4 vs 2.41e-4; squared 0.218 vs 0.235
    assert (fitted * w).pow(2).sum() < 0.9 * (plain * w).pow(2).sum()
    assert flat.pow(2).sum() < 0.95 * plain.pow(2).sum()


@pytest.mark.parametrize("name", list(IQ))
def test_importance_lowers_the_error_where_it_weighs(name: str) -> None:
    w = _weights(64, 512, seed=2)
    imp = torch.ones(512)
    imp[::8] = 100.0  # one column in eight matters much more
    plain, weighted = ggml_fit.quantize(w, name), ggml_fit.quantize(w, name, importance=imp)

    def err(b: ggml.GGMLBlocks) -> float:
        return float(((ggml.dequantize(b) - w).pow(2) * imp).sum())

    assert err(weighted) < 0.9 * err(plain), (err(weighted), err(plain))


@pytest.mark.parametrize("name", list(IQ))
def test_layer_computes_with_the_decoded_weights(name: str) -> None:
    w = _weights(32, 256, seed=3)
    layer = GGUFLinear.from_blocks(ggml_fit.quantize(w, name), None)
    assert layer.kernel_path() == "dequant"  # not the uniform int4 kernel
    x = torch.randn(3, 256)
    decoded = torch.from_numpy(_gguf_decode(layer.blocks, name)).view(32, 256)
    assert torch.equal(layer(x), nn.functional.linear(x, decoded))


def test_widths_fall_back_as_llama_cpp_does() -> None:
    assert grid_settings("mlp", 576, "iq4_xs").grid == "iq4_nl"  # 576 = 2.25 super-blocks
    assert grid_settings("mlp", 512, "iq4_xs").grid == "iq4_xs"
    assert grid_settings("mlp", 576, "iq3_s").grid == "iq4_nl"
    assert grid_settings("mlp", 576, "iq2_xxs").grid == "iq4_nl"
    assert grid_settings("mlp", 576, "iq2_xs").grid == "iq4_nl"
    assert grid_settings("mlp", 576, "iq2_s").grid == "iq4_nl"
    assert grid_settings("mlp", 576, "iq3_xxs").grid == "iq4_nl"
    with pytest.raises(QuantError, match="multiple of 32"):
        grid_settings("mlp", 48, "iq4_nl")
    with pytest.raises(ValueError, match="non-uniform"):
        ggml.grid_of(ggml_fit.quantize(_weights(2, 32), "iq4_nl"))


def test_gptq_on_a_non_uniform_grid_is_refused_in_one_line() -> None:
    config = GPTQConfig(grid="iq4_xs")
    assert isinstance(config, WeightQuantConfig)
    with pytest.raises(QuantError, match="non-uniform grid iq4_xs"):
        gptq_apply(nn.Linear(256, 256), config, None)  # type: ignore[arg-type]
