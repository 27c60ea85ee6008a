"""The public API on the built-in model: evaluate, compress with a preset, load."""

from __future__ import annotations

from pathlib import Path

import torch

import lmpress
from lmpress.nn.quant_linear import QuantLinear


def test_evaluate_builtin() -> None:
    result = lmpress.evaluate(data=lmpress.DataOptions(eval_windows=8), measure_speed=False)
    m = result.metrics
    assert 2 < m["perplexity"] < 30 and m["eval_tokens"] == 8 * 255
    assert result.data.split == "eval" and result.data.windows == 8


def test_compress_builtin_w4_and_reload(tmp_path: Path) -> None:
    out = tmp_path / "w4"
    data = lmpress.DataOptions(eval_windows=8, calib_windows=32)
    r = lmpress.compress("builtin", "w4", data, output=out, measure_speed=False)
    orig, comp = r.metrics["original"], r.metrics["compressed"]
    assert comp["perplexity"] / orig["perplexity"] < 1.15  # GPTQ 4-bit costs little
    assert comp["top1_agreement"] > 0.85
    assert comp["bytes_on_disk"] < 0.75 * orig["bytes_on_disk"]  # embeddings and head stay 16-bit
    layers = [m for m in r.model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 28 and all(m.kernel_path() == "int4" for m in layers)
    ids = torch.arange(64)[None]
    with torch.no_grad():
        assert torch.equal(lmpress.load(out).model(input_ids=ids).logits, r.model(input_ids=ids).logits)
