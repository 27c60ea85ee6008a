"""Recipes validate before any work, naming stage, key and allowed values."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmpress.errors import RecipeError
from lmpress.quant.cast import CastConfig
from lmpress.recipe import load_recipe, parse_recipe, presets


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_valid_recipe_file(tmp_path: Path) -> None:
    r = load_recipe(write(tmp_path, "name: half\nstages:\n  - method: cast\n    dtype: float16\n"))
    assert r.name == "half"
    assert r.stages == (CastConfig(dtype="float16"),)
    assert r.to_dict()["stages"] == [{"method": "cast", "dtype": "float16"}]


def test_presets_load() -> None:
    assert {"bf16", "fp16", "w8", "w4", "w8a8"} <= set(presets())
    for name in presets():
        assert load_recipe(name).description
    assert load_recipe("fp16").stages[0] == CastConfig(dtype="float16")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("stages: [method: cast\n", r"not valid YAML \(line \d+\)"),
        (
            "stages:\n  - method: prune_everything\n",
            "stage 1: unknown method 'prune_everything'; known methods: awq, cast, cluster, distill, "
            "drop_blocks, federated, gptq, hidden, hqq, lowrank, magnitude, qat, rtn, share, sparsegpt, structured, "
            "vocab, w8a8, wanda",
        ),
        (
            "stages:\n  - method: cast\n    colour: red\n",
            "stage 1 \\(cast\\): unknown key 'colour'; allowed keys: dtype",
        ),
        (
            "stages:\n  - method: cast\n    dtype: 16\n",
            "stage 1 \\(cast\\): dtype: input should be 'float16', 'bfloat16' or 'float32', got 16",
        ),
        ("stages:\n  - method: cast\n  - method: cast\n    dtype: int3\n", "stage 2 \\(cast\\): dtype: .*got 'int3'"),
        ("stages: []\n", "non-empty list"),
        ("stages:\n  - cast\n", "stage 1: must be a mapping"),
        ("steps:\n  - method: cast\n", "unknown key 'steps'"),
        ("just a string\n", "must be a mapping"),
    ],
)
def test_bad_recipes(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        load_recipe(write(tmp_path, text))


def test_unknown_recipe_name() -> None:
    with pytest.raises(
        RecipeError,
        match="is not a preset; presets: bf16, distill-half, edge, fp16, gguf-q3_k_m, gguf-q4_k_m, gguf-q5_k_m, "
        "gguf-q8_0, sparse50, w4-sparse, w4, w8, w8a8",
    ):
        load_recipe("no-such-recipe")
    with pytest.raises(RecipeError, match="recipe file 'missing.yaml' does not exist"):
        load_recipe("missing.yaml")


def test_invalid_regex_fails_at_parse_time() -> None:
    with pytest.raises(RecipeError, match=r"stage 1 \(rtn\): targets: value error, invalid regex 're:\['"):
        parse_recipe({"stages": [{"method": "rtn", "targets": ["re:["]}]})


def test_config_is_frozen_and_list_form_accepted() -> None:
    r = parse_recipe([{"method": "cast"}])
    with pytest.raises(ValueError):
        r.stages[0].dtype = "float16"  # type: ignore[misc]
    assert r.stages[0] == CastConfig(dtype="bfloat16")
