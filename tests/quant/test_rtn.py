"""rtn end to end: layers replaced, sizes shrink, quality bounded, save/reload exact, bad targets."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lmpress.data_options import DataOptions
from lmpress.errors import LmpressError
from lmpress.io.load import load_model
from lmpress.nn.quant_linear import QuantLinear
from lmpress.pipeline import compress


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rtn_w8_and_w4_end_to_end(
    arch: str, tiny_model_dir: Callable[..., Path], text_file: Path, tmp_path: Path
) -> None:
    data = DataOptions(source=text_file, seq_len=64, eval_windows=4)
    src = tiny_model_dir(arch)
    n_linears = {"llama": 14, "gpt2": 8}[arch]
    for bits, group, max_kl in [(8, None, 1e-4), (4, 32, 5e-3)]:
        recipe = {"stages": [{"method": "rtn", "bits": bits, "group_size": group, "symmetric": bits == 8}]}
        out = tmp_path / f"w{bits}"
        r = compress(src, recipe, data, output=out, measure_speed=False)
        quant = [m for m in r.model.modules() if isinstance(m, QuantLinear)]
        assert len(quant) == n_linears  # every block projection; lm_head ignored by default
        assert r.metrics["compressed"]["kl"] < max_kl
        assert r.metrics["compressed"]["bytes_on_disk"] < r.metrics["original"]["bytes_on_disk"]
        ids = torch.arange(48)[None] % 300
        with torch.no_grad():
            assert torch.equal(load_model(out).model(input_ids=ids).logits, r.model(input_ids=ids).logits)


def test_untouched_layers_stay_bit_identical(tiny_model_dir: Callable[..., Path]) -> None:
    src = tiny_model_dir("llama")
    before = load_model(src).model.state_dict()
    r = compress(src, {"stages": [{"method": "rtn", "targets": ["re:.*mlp\\..*"]}]}, run_eval=False)
    after = r.model.state_dict()
    for k, v in before.items():
        if ".mlp." not in k:
            assert torch.equal(after[k], v), k


def test_target_matching_nothing_is_an_error(tiny_model_dir: Callable[..., Path]) -> None:
    with pytest.raises(LmpressError, match="match no linear layer; names look like"):
        compress(tiny_model_dir("llama"), {"stages": [{"method": "rtn", "targets": ["re:.*expert.*"]}]}, run_eval=False)


def test_overrides_set_per_layer_bits(tiny_model_dir: Callable[..., Path]) -> None:
    recipe = {
        "stages": [
            {"method": "rtn", "bits": 4, "group_size": 32, "overrides": [{"targets": ["re:.*down_proj"], "bits": 8}]}
        ]
    }
    r = compress(tiny_model_dir("llama"), recipe, run_eval=False)
    bits = {n: m.bits for n, m in r.model.named_modules() if isinstance(m, QuantLinear)}
    assert bits["model.layers.0.mlp.down_proj"] == 8 and bits["model.layers.0.mlp.up_proj"] == 4
    assert r.stages[0]["layers"] == {"w4g32": 12, "w8g32": 2}
