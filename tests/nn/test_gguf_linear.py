"""GGUFLinear / GGUFEmbedding: forwards match their dequantized weights; formats reload."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmpress.formats import ggml
from lmpress.nn.gguf_linear import GGUFEmbedding, GGUFLinear
from lmpress.quant import ggml_fit


@pytest.mark.parametrize("name", ["q6_k", "q3_k", "q8_0", "q5_1"])
def test_dequant_forward_is_the_stored_weight(name: str) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(256, 64)
    layer = GGUFLinear.from_blocks(ggml_fit.quantize(lin.weight, name), lin.bias)
    assert layer.kernel_path() == "dequant"
    x = torch.randn(5, 256)
    ref = x @ ggml.dequantize(layer.ggml_blocks()).T + lin.bias
    assert torch.allclose(layer(x), ref, atol=1e-5)
    assert layer.blocks.numel() == 64 * ggml.ggml_type(name).row_bytes(256)  # the type's bytes, nothing dense


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q4_k"])
def test_int4_kernel_matches_the_dequantized_weight(name: str) -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 512) * 0.02
    layer = GGUFLinear.from_blocks(ggml_fit.quantize(w, name), None)
    assert layer.kernel_path() == "int4"
    x = torch.randn(3, 512)
    ref = x @ layer.dequantize_weight().T
    y = layer(x)
    assert float((y - ref).norm() / ref.norm()) < 1e-2  # bf16 kernel
    big = torch.randn(300, 512)  # many rows: bf16 GEMM on the dequantized weight
    assert (
        float((layer(big) - big @ layer.dequantize_weight().T).norm() / (big @ layer.dequantize_weight().T).norm())
        < 1e-2
    )


def test_embedding_gathers_rows() -> None:
    torch.manual_seed(0)
    table = torch.randn(100, 256)
    emb = GGUFEmbedding.from_blocks(ggml_fit.quantize(table, "q4_k"), torch.float32)
    ids = torch.tensor([[3, 7], [99, 0]])
    full = ggml.dequantize(ggml_fit.quantize(table, "q4_k"))
    assert torch.equal(emb(ids), full[ids])
    again = GGUFEmbedding.from_format(emb.lmpress_format(), torch.float32)
    again.load_state_dict(emb.state_dict())
    assert torch.equal(again(ids), emb(ids))
