"""SparseLinear: stores only the kept weights, forwards exactly, round-trips its state dict."""

from __future__ import annotations

import pytest
import torch

from lmpress.formats.grid import dequantize
from lmpress.nn.sparse_linear import SparseLinear
from lmpress.prune.masks import nm_mask, topk_mask
from lmpress.quant.grid import quantize


@pytest.mark.parametrize("sparsity", [0.5, 0.95])
def test_forward_matches_masked_dense(sparsity: float) -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 96)
    mask = topk_mask(lin.weight.abs(), sparsity)
    layer = SparseLinear.from_dense(lin.weight.data, mask, lin.bias.data)
    assert layer.kernel_path() == ("csr" if sparsity > 0.9 else "dense")
    assert layer.nnz == int(mask.sum()) and layer.values is not None and layer.values.numel() == layer.nnz
    assert torch.equal(layer.keep_mask(), mask)
    assert torch.equal(layer.dense_weight(), lin.weight.data * mask)
    x = torch.randn(3, 5, 256)
    ref = x @ (lin.weight.data * mask).T + lin.bias.data
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    assert layer.num_logical_params() == layer.nnz + 96
    # storage: the bitmask plus the kept values, well below the dense bytes
    stored = sum(t.numel() * t.element_size() for t in layer.state_dict().values())
    assert stored == 96 * 256 // 8 + layer.nnz * 4 + 96 * 4


def test_nm_quantized_values_and_state_dict_round_trip() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    mask = nm_mask(w.abs(), 2, 4)
    q = quantize(w, 4, 32)
    layer = SparseLinear.from_dense(w, mask, None, "2:4", q)
    assert layer.qvalues is not None and layer.qvalues.numel() == 64 * 64 // 2  # 4-bit codes of the kept half
    ref = dequantize(q.codes, q.scales.half().float(), q.zeros, 32) * mask  # scales stored in float16
    torch.testing.assert_close(layer.dense_weight(), ref)
    fmt = layer.lmpress_format()
    assert fmt["format"] == "sparse" and fmt["pattern"] == "2:4" and fmt["bits"] == 4
    fresh = SparseLinear.from_format(fmt, torch.float32)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(4, 128)
    assert torch.equal(fresh(x), layer(x))
    bf = fresh.to(torch.bfloat16)
    assert bf.scales is not None and bf.scales.dtype == torch.float16  # the format survives a cast
    assert bf(x.bfloat16()).dtype == torch.bfloat16


def test_symmetric_quantized_values_decode_around_the_midpoint() -> None:
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    mask = topk_mask(w.abs(), 0.5)
    q = quantize(w, 4, 32, symmetric=True)
    layer = SparseLinear.from_dense(w, mask, None, q=q, symmetric=True)
    assert layer.qzeros is None  # a symmetric grid stores no zero points
    ref = dequantize(q.codes, q.scales.half().float(), q.zeros, 32) * mask
    torch.testing.assert_close(layer.dense_weight(), ref)
