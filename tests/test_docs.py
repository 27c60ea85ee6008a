"""The recipe reference in docs/ is generated from the method configs; this fails when it is stale."""

from __future__ import annotations

from pathlib import Path

from lmpress.recipe_docs import render
from lmpress.registry import methods

DOCS = Path(__file__).parent.parent / "docs" / "recipes.md"


def test_recipe_reference_is_up_to_date() -> None:
    assert DOCS.read_text(encoding="utf-8") == render(), (
        "docs/recipes.md is stale: run `python -m lmpress.recipe_docs > docs/recipes.md`"
    )


def test_every_method_and_key_is_documented() -> None:
    text = render()
    for name, m in methods().items():
        assert f"### `{name}`" in text
        for key in m.config.model_fields:
            if key != "method":
                assert f"| `{key}` |" in text, (name, key)
