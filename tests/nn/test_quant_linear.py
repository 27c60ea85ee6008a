"""QuantLinear: packed storage, kernels that agree with dequantization, state-dict round trips."""

from __future__ import annotations

import pytest
import torch

from lmpress.nn.quant_linear import QuantLinear
from lmpress.quant.grid import quantize

CASES = [
    (8, None, True, "int8"),
    (4, 128, False, "int4"),
    (4, 64, True, "int4"),
    (3, 128, False, "dequant"),
    (2, 64, False, "dequant"),
    (8, 128, False, "dequant"),
    (4, 100, False, "dequant"),  # group does not divide the width: short last group
]


@pytest.mark.parametrize(("bits", "group", "sym", "path"), CASES)
def test_forward_matches_dequantized_weight(bits: int, group: int | None, sym: bool, path: str) -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 128)
    q = quantize(lin.weight.data, bits, group, sym)
    layer = QuantLinear.from_quantized(q, lin.bias.data, sym)
    assert layer.kernel_path() == path
    assert torch.equal(layer.codes(), q.codes)
    # decode (kernel), a few rows, and prefill (bf16 dequantization + GEMM on the kernel paths)
    for x in (torch.randn(2, 1, 256), torch.randn(3, 5, 256), torch.randn(2, 64, 256)):
        ref = x @ layer.dequantize_weight().T + lin.bias
        y = layer(x)
        assert y.shape == (*x.shape[:-1], 128) and y.dtype == torch.float32
        tol = 0.02 if path != "dequant" else 1e-4  # the kernels and the prefill path compute in bfloat16
        assert (y - ref).abs().max() / ref.abs().max() < tol
    w16 = layer.dequantize_weight(torch.bfloat16)  # fast half-precision path: within bf16 rounding
    assert w16.dtype == torch.bfloat16 and w16.shape == (128, 256)
    w32 = layer.dequantize_weight()
    assert ((w16.float() - w32).abs() <= w32.abs() * 2**-6 + 1e-6).all()
    assert layer.qweight.numel() == 128 * 256 * bits // 8  # the bytes the format costs
    assert layer.num_logical_params() == 128 * 256 + 128


def test_state_dict_round_trip_and_format() -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32, bias=False)
    layer = QuantLinear.from_quantized(quantize(lin.weight.data, 3, 16), None, symmetric=False)
    fmt = layer.lmpress_format()
    assert fmt["format"] == "quant" and fmt["bits"] == 3 and fmt["scale_dtype"] == "float16"
    assert set(layer.state_dict()) == {"qweight", "scales", "qzeros"}
    empty = QuantLinear.from_format(fmt, torch.float32)
    empty.load_state_dict(layer.state_dict())
    x = torch.randn(4, 64)
    assert torch.equal(empty(x), layer(x))


def test_symmetric_8bit_bytes_are_int8() -> None:
    w = torch.tensor([[-1.0, 0.0, 0.5, 1.0]])
    layer = QuantLinear.from_quantized(quantize(w, 8, None, symmetric=True), None, symmetric=True)
    assert layer.qweight.view(torch.int8).tolist() == [[-127, 0, 64, 127]]


def test_the_int4_kernel_layout_replaces_the_stored_codes() -> None:
    """Once the int4 kernel layout exists it is the only copy of the codes in memory; everything that
    reads the codes (state_dict, codes, prefill, a move) gets them back exactly from it."""
    from lmpress.evaluation import tensor_bytes
    from lmpress.nn.quant_linear import INT4_BLOCK_N

    assert INT4_BLOCK_N is not None  # probed on this machine's CPU kernel
    torch.manual_seed(0)
    for out_f, sym in ((128, False), (80, True), (176, False)):  # 80, 176: a last, shorter row block
        w = torch.randn(out_f, 256)
        layer = QuantLinear.from_quantized(quantize(w, 4, 128, symmetric=sym), torch.randn(out_f), symmetric=sym)
        stored, codes = layer.qweight.clone(), layer.codes()
        x, xs = torch.randn(3, 256), torch.randn(300, 256)  # decode (kernel) and prefill (dequantized) rows
        before = tensor_bytes(layer)
        with torch.no_grad():
            y = layer(x)
        assert layer.kernel_path() == "int4" and layer.qweight.is_meta
        assert tensor_bytes(layer) - before < out_f * 2 * 2 * 2 + 64  # only the bf16 scale/zero pairs added
        assert torch.equal(layer.state_dict()["qweight"], stored) and torch.equal(layer.codes(), codes)
        with torch.no_grad():
            assert torch.equal(layer(x), y)
            ys = layer(xs)
        fresh = QuantLinear.from_quantized(quantize(w, 4, 128, symmetric=sym), layer.bias, symmetric=sym)
        with torch.no_grad():
            assert torch.equal(ys, fresh(xs))  # prefill dequantizes from the layout exactly
        layer.to(torch.float32)  # a move brings qweight back first
        assert torch.equal(layer.qweight, stored)
    int8 = QuantLinear.from_quantized(quantize(w, 8, None, True), None, symmetric=True)
    b8 = tensor_bytes(int8)
    int8(torch.randn(1, 256))
    assert tensor_bytes(int8) - b8 < 176 * 4  # the int8 kernel reads the stored bytes (only bf16 scales added)


def test_a_layer_with_its_codes_in_the_kernel_layout_saves_and_reloads(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    layer = QuantLinear.from_quantized(quantize(torch.randn(64, 128), 4, 32), None, symmetric=False)
    stored = layer.qweight.clone()
    with torch.no_grad():
        y = layer(torch.randn(2, 128))
    save_file(layer.state_dict(), str(tmp_path / "l.safetensors"))
    again = QuantLinear.from_format(layer.lmpress_format(), torch.float32)
    again.load_state_dict(load_file(str(tmp_path / "l.safetensors")))
    assert torch.equal(again.qweight, stored)
    layer.load_state_dict(again.state_dict())  # loading into a layer whose codes were dropped
    assert torch.equal(layer.qweight, stored) and y.shape == (2, 64)


def test_float_zeros_dequantize_in_half_precision() -> None:
    torch.manual_seed(0)
    q = quantize(torch.randn(64, 256), 4, 64, False)
    q.zeros += torch.rand_like(q.zeros) - 0.5  # fractional zero points, as half-quadratic finds
    layer = QuantLinear.from_quantized(q, None, False, float_zeros=True)
    assert layer.fzeros is not None and layer.qzeros is None
    w32 = layer.dequantize_weight()
    w16 = layer.dequantize_weight(torch.bfloat16).float()
    assert (w16 - w32).abs().max() <= w32.abs().max() * 2**-6
