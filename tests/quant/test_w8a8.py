"""W8A8: the int8 matmul matches float math closely; smoothing keeps quality; save/reload exact."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lmpress.data_options import DataOptions
from lmpress.io.load import load_model
from lmpress.nn.quant_linear import QuantLinear, int8_matmul
from lmpress.pipeline import compress
from lmpress.quant.w8a8 import smooth_scales


def test_int8_matmul_close_to_float() -> None:
    torch.manual_seed(0)
    x, w = torch.randn(40, 256), torch.randn(64, 256)
    s_w = w.abs().amax(1) / 127
    wq = (w / s_w[:, None]).round().to(torch.int8)
    y = int8_matmul(x, wq.T, s_w[None, :])
    ref = x @ w.T
    assert ((y - ref).pow(2).mean() / ref.pow(2).mean()) < 1e-3


def test_smooth_scales_balance_ranges() -> None:
    act = torch.tensor([100.0, 1.0])
    wmax = torch.tensor([1.0, 1.0])
    s = smooth_scales(act, wmax, 0.5)
    assert s.tolist() == pytest.approx([10.0, 1.0])
    assert (act / s).max() / (act / s).min() == pytest.approx(10.0)  # 100x spread becomes 10x


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_w8a8_end_to_end(arch: str, tiny_model_dir: Callable[..., Path], text_file: Path, tmp_path: Path) -> None:
    data = DataOptions(source=text_file, seq_len=64, eval_windows=4, calib_windows=8)
    out = tmp_path / "w8a8"
    r = compress(tiny_model_dir(arch), {"stages": [{"method": "w8a8"}]}, data, output=out, measure_speed=False)
    layers = [m for m in r.model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.kernel_path() == "w8a8" for m in layers)
    assert r.metrics["compressed"]["kl"] < 1e-3 and r.metrics["compressed"]["top1_agreement"] > 0.97
    assert r.stages[0]["smoothed"]
    ids = torch.arange(48)[None] % 300
    with torch.no_grad():
        assert torch.equal(load_model(out).model(input_ids=ids).logits, r.model(input_ids=ids).logits)


def test_smoothing_folds_into_ignored_siblings_too(tiny_model_dir: Callable[..., Path], text_file: Path) -> None:
    """A layer kept dense still reads the smoothed norm output, so it must get the scales too."""
    data = DataOptions(source=text_file, seq_len=64, eval_windows=4, calib_windows=8)
    recipe = {"stages": [{"method": "w8a8", "ignore": ["lm_head", "re:.*gate_proj"]}]}
    r = compress(tiny_model_dir("llama"), recipe, data, measure_speed=False)
    assert r.metrics["compressed"]["kl"] < 1e-3
