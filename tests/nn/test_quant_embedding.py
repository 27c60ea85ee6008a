"""QuantEmbedding: lookups match the dequantized table; tied heads survive; save/reload exact."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lmpress.data_options import DataOptions
from lmpress.io.load import load_model
from lmpress.nn.quant_embedding import QuantEmbedding
from lmpress.nn.quant_linear import QuantLinear
from lmpress.pipeline import compress
from lmpress.quant.grid import quantize


@pytest.mark.parametrize(("bits", "group", "sym"), [(8, 128, False), (4, 32, False), (4, None, True), (3, 48, False)])
def test_lookup_matches_dequantized_rows(bits: int, group: int | None, sym: bool) -> None:
    torch.manual_seed(0)
    table = torch.randn(50, 96)
    q = quantize(table, bits, group, sym)
    emb = QuantEmbedding.from_quantized(q, sym, torch.float32, torch.float16)
    ids = torch.tensor([[3, 0, 49], [7, 7, 1]])
    out = emb(ids)
    assert out.shape == (2, 3, 96)
    torch.testing.assert_close(out, emb.weight[ids])
    torch.testing.assert_close(emb.weight, q.dequantize(), rtol=2e-3, atol=2e-3)  # float16 scales
    assert emb.qweight.numel() == 50 * 96 * bits // 8


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_embedding_bits_end_to_end(
    arch: str, tiny_model_dir: Callable[..., Path], text_file: Path, tmp_path: Path
) -> None:
    data = DataOptions(source=text_file, seq_len=64, eval_windows=4)
    src, out = tiny_model_dir(arch), tmp_path / "q"
    recipe = {
        "stages": [{"method": "rtn", "bits": 8, "group_size": 32, "embedding_bits": 8, "embedding_group_size": 32}]
    }
    r = compress(src, recipe, data, output=out, measure_speed=False)
    assert isinstance(r.model.get_input_embeddings(), QuantEmbedding)
    if arch == "gpt2":  # the head was tied to the embedding: it keeps the same quantized weights
        assert isinstance(r.model.get_output_embeddings(), QuantLinear)
        assert r.metrics["compressed"]["parameters"] == r.metrics["original"]["parameters"]  # counted once
    assert r.metrics["compressed"]["kl"] < 2e-3
    assert r.metrics["compressed"]["bytes_on_disk"] < 0.5 * r.metrics["original"]["bytes_on_disk"]
    ids = torch.arange(48)[None] % 300
    with torch.no_grad():
        assert torch.equal(load_model(out).model(input_ids=ids).logits, r.model(input_ids=ids).logits)


def test_cast_after_quantization_keeps_the_format(tiny_model_dir: Callable[..., Path]) -> None:
    recipe = {
        "stages": [
            {"method": "hqq", "bits": 4, "group_size": 32, "embedding_bits": 4},
            {"method": "cast", "dtype": "bfloat16"},
        ]
    }
    r = compress(tiny_model_dir("llama"), recipe, run_eval=False)
    emb = r.model.get_input_embeddings()
    assert emb.scales.dtype == torch.float16  # the stored format does not follow the cast
    layer = next(m for m in r.model.modules() if isinstance(m, QuantLinear))
    assert layer.scales.dtype == torch.float16 and layer.fzeros is not None and layer.fzeros.dtype == torch.float16
    with torch.no_grad():
        out = r.model(input_ids=torch.arange(10)[None]).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
