"""A method is one module plus one registry line: a method defined here and entered in the registry
(as `registry.methods()`'s one line would) is validated in recipes, listed by ``lmpress methods``,
run by ``lmpress compress``, saved and reloaded, with no other change."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import pytest
import torch
from pydantic import Field
from torch import nn
from typer.testing import CliRunner

import lmpress
from lmpress.arch import Adapter, linear_weight
from lmpress.cli import app
from lmpress.data_options import DataOptions
from lmpress.method import Context, Method, MethodConfig, StageReport
from lmpress.registry import methods

runner = CliRunner()


class ScaleConfig(MethodConfig):
    """Multiply every block linear's weight by ``factor`` (a method with no storage of its own)."""

    method: Literal["scale_weights"] = "scale_weights"
    factor: float = Field(0.5, gt=0)


def apply(model: nn.Module, config: ScaleConfig, ctx: Context) -> StageReport:
    layers = Adapter(model).linears()
    with torch.no_grad():
        for m in layers.values():
            linear_weight(m).mul_(config.factor)
    return {"layers": len(layers)}


METHOD = Method("scale_weights", ScaleConfig, apply, "scale every block linear's weight")


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(methods(), METHOD.name, METHOD)  # the registry's one line


def test_a_registered_method_runs_end_to_end(
    registered: None, tiny_model_dir: Callable[..., Path], text_file: Path, tmp_path: Path
) -> None:
    src, out = tiny_model_dir("llama"), tmp_path / "scaled"
    recipe = {"stages": [{"method": "scale_weights", "factor": 0.25}]}
    data = DataOptions(source=text_file, seq_len=32, eval_windows=2, calib_windows=2)
    r = lmpress.compress(src, recipe, data, output=out, measure_speed=False)
    assert r.stages[0]["method"] == "scale_weights" and r.stages[0]["layers"] == 14
    before = lmpress.load(src).model.model.layers[0].mlp.up_proj.weight  # type: ignore[union-attr]
    after = lmpress.load(out).model.model.layers[0].mlp.up_proj.weight  # type: ignore[union-attr]
    assert torch.equal(after, before * 0.25)
    assert json.loads((out / "lmpress.json").read_text())["recipe"]["stages"][0]["factor"] == 0.25


def test_a_registered_method_is_validated_and_listed(registered: None, tmp_path: Path) -> None:
    with pytest.raises(lmpress.errors.RecipeError, match="factor"):
        lmpress.compress("builtin", {"stages": [{"method": "scale_weights", "factor": -1}]}, run_eval=False)
    listed = runner.invoke(app, ["methods"])
    assert listed.exit_code == 0 and "scale_weights" in listed.stdout
