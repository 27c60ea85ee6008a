"""AWQ: scale folding keeps the float model exact on every family; the search beats RTN."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmpress.arch import Adapter, linear_weight
from lmpress.data_options import DataOptions
from lmpress.io.load import load_model
from lmpress.pipeline import compress
from lmpress.quant.awq import awq_scales, fold_scales
from lmpress.quant.base import LayerSettings
from lmpress.quant.grid import quantize
from tests.conftest import TINY_ARCHS, tiny_config


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_folding_scales_keeps_the_model_function(arch: str) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, 300)).eval()
    ids = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        adapter = Adapter(model)
        groups = [g for i in range(adapter.num_blocks) for g in adapter.scale_groups(i)]
        assert groups
        for name, prev, linears in groups:
            width = linear_weight(next(iter(linears.values()))).shape[1]
            fold_scales(prev, linears, torch.rand(width) + 0.5, adapter.norm_kind(name))
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-4, atol=1e-4)


def test_awq_scales_protect_salient_channels() -> None:
    torch.manual_seed(0)
    x = torch.randn(1024, 128)
    x[:, :4] *= 20  # salient input channels
    w = 0.05 * torch.randn(64, 128)
    s = LayerSettings(bits=3, group_size=32, symmetric=False)
    sc, alpha = awq_scales(x, x.abs().mean(0), [w], s, grid=20)
    assert alpha > 0 and sc[:4].min() > sc[4:].max()
    q = quantize(w * sc, 3, 32).dequantize() / sc
    err = (x @ (q - w).T).pow(2).mean()
    err_rtn = (x @ (quantize(w, 3, 32).dequantize() - w).T).pow(2).mean()
    assert err < 0.8 * err_rtn


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_awq_end_to_end(arch: str, tiny_model_dir: Callable[..., Path], text_file: Path, tmp_path: Path) -> None:
    data = DataOptions(source=text_file, seq_len=64, eval_windows=8, calib_windows=16)
    src, out = tiny_model_dir(arch), tmp_path / "awq"
    stage = {"bits": 3, "group_size": 32}
    rtn = compress(src, {"stages": [{"method": "rtn", **stage}]}, data, measure_speed=False)
    awq = compress(src, {"stages": [{"method": "awq", **stage}]}, data, output=out, measure_speed=False)
    assert awq.metrics["compressed"]["kl"] < rtn.metrics["compressed"]["kl"]
    ids = torch.arange(48)[None] % 300
    with torch.no_grad():
        assert torch.equal(load_model(out).model(input_ids=ids).logits, awq.model(input_ids=ids).logits)
