"""HQQ: calibration-free, never worse than its start, beats RTN; stored with float zero points."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lmpress.data_options import DataOptions
from lmpress.io.load import load_model
from lmpress.nn.quant_linear import QuantLinear
from lmpress.pipeline import compress
from lmpress.quant.grid import quantize
from lmpress.quant.hqq import hqq_quantize, shrink_lp


def test_shrink_is_soft_thresholding() -> None:
    x = torch.tensor([-2.0, -0.01, 0.0, 0.01, 2.0])
    y = shrink_lp(x, beta=10.0, p=0.7)
    assert y[2] == 0 and y[1] == 0 and y[3] == 0  # small values vanish
    assert 0 < y[4] < 2 and y[0] == -y[4]


@pytest.mark.parametrize(("bits", "group", "max_ratio"), [(4, 64, 0.92), (3, 64, 0.85), (2, 64, 0.7)])
def test_hqq_beats_rtn_without_data(bits: int, group: int, max_ratio: float) -> None:
    torch.manual_seed(0)
    W = 0.02 * torch.randn(128, 256)
    W[torch.rand_like(W) < 0.002] *= 8  # outliers, as in trained weights
    X = torch.randn(512, 256)
    q = hqq_quantize(W, bits, group)
    assert not torch.equal(q.zeros, q.zeros.round())  # fractional zero points
    err = (X @ (q.dequantize() - W).T).pow(2).mean()
    err_rtn = (X @ (quantize(W, bits, group).dequantize() - W).T).pow(2).mean()
    assert err / err_rtn < max_ratio


def test_hqq_end_to_end(tiny_model_dir: Callable[..., Path], text_file: Path, tmp_path: Path) -> None:
    data = DataOptions(source=text_file, seq_len=64, eval_windows=4)
    src, out = tiny_model_dir("gpt2"), tmp_path / "hqq"
    r = compress(
        src, {"stages": [{"method": "hqq", "bits": 4, "group_size": 32}]}, data, output=out, measure_speed=False
    )
    layers = [m for m in r.model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 8 and all(m.fzeros is not None and m.qzeros is None for m in layers)
    assert r.metrics["compressed"]["kl"] < 5e-3
    ids = torch.arange(48)[None] % 300
    with torch.no_grad():
        assert torch.equal(load_model(out).model(input_ids=ids).logits, r.model(input_ids=ids).logits)


def test_symmetric_override_is_refused() -> None:
    from lmpress.errors import RecipeError
    from lmpress.recipe import parse_recipe

    with pytest.raises(RecipeError, match="symmetric must be false for hqq"):
        parse_recipe({"stages": [{"method": "hqq", "overrides": [{"targets": ["re:.*"], "symmetric": True}]}]})
