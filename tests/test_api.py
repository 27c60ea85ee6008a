"""The public API on the built-in model: evaluate, compress with a preset, load, search."""

from __future__ import annotations

from pathlib import Path

import pytest
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


def test_search_builtin_finds_the_smallest_recipe_within_the_quality_budget(tmp_path: Path) -> None:
    space = {"bits": [4, 8], "group_sizes": [32], "head_bits": [None], "embedding_bits": [None]}
    config = {"space": space, "calib_windows": 16, "select_windows": 8, "trials": 3, "seeds": False,
              "budget": {"max_ppl_increase": 0.5}}  # fmt: skip
    data = lmpress.DataOptions(seq_len=32, eval_windows=8)
    found = lmpress.search("builtin", config, data, study_dir=tmp_path / "study", output=tmp_path / "best")
    best, trials = found.study.best, found.study.trials
    assert best is not None and len(trials) == 3
    feasible = [t for t in trials if t["state"] == "COMPLETE" and t["ppl_increase"] <= 0.5]
    assert best["bytes"] == min(t["bytes"] for t in feasible) < 0.7 * found.study.original["bytes"]
    # the best recipe, run alone on the trials' calibration windows, gives its trial's selection perplexity
    assert found.reproduced_selection_perplexity == pytest.approx(best["perplexity"], rel=1e-5)
    original, compressed = found.final.metrics["original"], found.final.metrics["compressed"]
    assert compressed["perplexity"] / original["perplexity"] < 1.15 and compressed["bytes"] < original["bytes"]
    assert found.to_dict()["trials"] == 3 and found.recipe_file.is_file() and found.report.is_file()
    assert lmpress.load(tmp_path / "best").meta["recipe"]["name"] == "best"
