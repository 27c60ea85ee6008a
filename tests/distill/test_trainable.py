"""Training-time stand-ins: same function as the packed layer, straight-through gradients, exact packing back."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmpress.distill.trainable import TrainableLinear, fake_quant, make_trainable, restore_compressed, to_trainable
from lmpress.nn import QuantLinear, SparseLinear
from lmpress.quant.grid import quantize


def _weight() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(24, 64)


def test_fake_quant_passes_gradients_straight_through_inside_the_grid_only() -> None:
    w = torch.tensor([[0.26, -0.9, 5.0]], requires_grad=True)
    s = torch.tensor([[0.5]], requires_grad=True)
    z = torch.tensor([[2.0]])  # 2 bits: codes 0..3 cover [-1.0, 0.5]
    y = fake_quant(w, s, z, bits=2, group_size=None)
    assert y.tolist() == [[0.5, -1.0, 0.5]]  # 0.26 rounds up, -0.9 to -1.0, 5.0 clamps
    y.sum().backward()
    assert w.grad is not None and s.grad is not None
    assert w.grad.tolist() == [[1.0, 1.0, 0.0]]  # clamped weights get no gradient
    # LSQ: d/ds [(round(w/s)) s] = round(w/s) - w/s inside, the clamped code - z outside
    expect = (1 - 0.52) + (-2 + 1.8) + (3 - 2)
    assert float(s.grad) == pytest.approx(expect, abs=1e-5)


def test_quantized_layer_trains_its_scales_and_keeps_its_codes() -> None:
    q = quantize(_weight(), 3, 32)
    layer = QuantLinear.from_quantized(q, torch.zeros(24), symmetric=False)
    t = to_trainable(layer, codes="frozen")
    assert isinstance(t, TrainableLinear)
    assert [n for n, _ in t.named_parameters()] == ["bias", "scales"]  # codes are buffers
    x = torch.randn(5, 64)
    torch.testing.assert_close(t(x), layer(x), atol=2e-3, rtol=1e-3)
    with torch.no_grad():
        t.scales.mul_(1.1)
    back = t.to_compressed()
    assert isinstance(back, QuantLinear)
    assert torch.equal(back.qweight, layer.qweight)  # every code kept
    torch.testing.assert_close(back.scales.float(), (layer.scales.float() * 1.1), atol=1e-3, rtol=1e-3)


def test_qat_latent_weight_rounds_to_the_forward_codes() -> None:
    q = quantize(_weight(), 4, 32)
    layer = QuantLinear.from_quantized(q, None, symmetric=False)
    t = to_trainable(layer, codes="train")
    assert t is not None and t.weight is not None and t.weight.requires_grad
    with torch.no_grad():
        t.weight.add_(0.3 * torch.randn_like(t.weight))  # training moved the latent weights
    x = torch.randn(5, 64)
    back = t.to_compressed()
    assert not torch.equal(back.qweight, layer.qweight)
    torch.testing.assert_close(back(x), t(x), atol=5e-3, rtol=1e-3)  # packed = what was trained


def test_sparse_layer_keeps_its_mask() -> None:
    w = _weight()
    mask = w.abs() > w.abs().median()
    layer = SparseLinear.from_dense(w, mask, torch.zeros(24))
    model = nn.Sequential(layer)
    swapped = make_trainable(model)
    t = swapped["0"]
    x = torch.randn(5, 64)
    torch.testing.assert_close(t(x), layer(x))
    t(x).pow(2).sum().backward()
    assert t.weight is not None and t.weight.grad is not None
    assert float(t.weight.grad[~mask].abs().max()) == 0.0  # pruned weights get no gradient
    with torch.no_grad():
        t.weight.add_(1.0)  # a step moves every latent weight, the mask still zeroes the pruned ones
    restore_compressed(model, swapped)
    back = model[0]
    assert isinstance(back, SparseLinear) and back.nnz == layer.nnz
    assert torch.equal(back.keep_mask(), mask)
    torch.testing.assert_close(back.dense_weight(), (w + 1.0) * mask)


def test_lora_merges_exactly_into_dense_layers() -> None:
    dense = nn.Linear(64, 24)
    model = nn.Sequential(dense)
    swapped = make_trainable(model, lora_rank=4)
    t = swapped["0"]
    assert sorted(n for n, p in t.named_parameters()) == ["bias", "lora_a", "lora_b"]
    with torch.no_grad():
        t.lora_b.normal_()  # type: ignore[union-attr]
    x = torch.randn(5, 64)
    expect = t(x)
    restore_compressed(model, swapped)
    assert isinstance(model[0], nn.Linear)
    torch.testing.assert_close(model[0](x), expect, atol=1e-5, rtol=1e-5)


def test_sparse_layer_with_codes_packs_back_to_the_same_codes() -> None:
    w = _weight()
    mask = w.abs() > w.abs().median()
    q = quantize(w * mask, 4, 32)
    layer = SparseLinear.from_dense(w, mask, None, q=q)
    t = to_trainable(layer, codes="frozen")
    assert t is not None and t.codes is not None
    x = torch.randn(5, 64)
    torch.testing.assert_close(t(x), layer(x), atol=2e-3, rtol=1e-3)
    back = t.to_compressed()
    assert isinstance(back, SparseLinear)
    assert torch.equal(back.mask, layer.mask) and torch.equal(back.qvalues, layer.qvalues)
