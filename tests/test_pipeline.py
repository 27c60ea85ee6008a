"""compress(): stages run in order, the result is measured against the original and saved."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmpress.data_options import DataOptions
from lmpress.errors import OutputError, RecipeError
from lmpress.io.load import load_model
from lmpress.pipeline import compress


def test_cast_halves_bytes_and_reloads_exactly(
    tiny_model_dir: Callable[..., Path], text_file: Path, tmp_path: Path
) -> None:
    src = tiny_model_dir("llama")
    out = tmp_path / "bf16"
    data = DataOptions(source=text_file, seq_len=64, eval_windows=4)
    result = compress(src, {"stages": [{"method": "cast", "dtype": "bfloat16"}]}, data, output=out, measure_speed=False)
    orig, comp = result.metrics["original"], result.metrics["compressed"]
    assert comp["bytes_on_disk"] / orig["bytes_on_disk"] == pytest.approx(0.5, abs=0.01)
    assert comp["bits_per_weight"] == pytest.approx(16.0, rel=0.01)  # + the safetensors header
    assert comp["kl"] < 1e-3 and comp["top1_agreement"] > 0.95
    assert abs(comp["perplexity"] / orig["perplexity"] - 1) < 0.01
    assert result.stages[0]["method"] == "cast" and result.stages[0]["to"] == "bfloat16"

    meta = json.loads((out / "lmpress.json").read_text())
    assert meta["recipe"]["stages"] == [{"method": "cast", "dtype": "bfloat16"}]
    assert meta["data"]["sha256"] == result.data.sha256  # type: ignore[union-attr]
    assert meta["metrics"]["compressed"]["kl"] == comp["kl"]

    ids = torch.arange(48)[None] % 300
    with torch.no_grad():
        expected = result.model(input_ids=ids).logits
        reloaded = load_model(out).model
        assert next(reloaded.parameters()).dtype == torch.bfloat16
        assert torch.equal(reloaded(input_ids=ids).logits, expected)
        plain = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no lmpress
        assert torch.equal(plain(input_ids=ids).logits, expected)


def test_bad_recipe_or_output_fails_before_loading(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("x")
    with pytest.raises(OutputError):
        compress(tmp_path / "missing-model", "bf16", output=out)
    with pytest.raises(RecipeError):
        compress(tmp_path / "missing-model", {"stages": [{"method": "nope"}]}, output=tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_compress_without_output_or_eval(tiny_model_dir: Callable[..., Path]) -> None:
    result = compress(tiny_model_dir("opt"), "fp16", run_eval=False)
    assert result.metrics == {} and result.output is None
    assert next(result.model.parameters()).dtype == torch.float16
