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


def test_every_search_space_key_is_in_the_search_guide() -> None:
    from lmpress.recipe_search import SearchSpace

    text = (DOCS.parent / "search.md").read_text(encoding="utf-8")
    for key in SearchSpace.model_fields:
        assert f"\n{key}: " in text, key  # in the example search file
    flags = "--max-bytes --max-ppl-increase --min-speedup --objective --speed --recovery-steps --recovery-top"
    for flag in (flags + " --save-pareto --storage --study-dir --no-prune --select-windows").split():
        assert flag in text, flag


def test_readme_and_docs_link_only_to_files_in_the_repository() -> None:
    """A person who clones lmpress has only the repository: every relative link and every path the
    text points to (``docs/x.md``, ``../shared/...``) must be a file in it."""
    import re

    root = DOCS.parent.parent
    for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        text = page.read_text(encoding="utf-8")
        assert "../shared" not in text, f"{page.name} points outside the repository (../shared)"
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # a URL
            assert (page.parent / target).resolve().is_relative_to(root), (page.name, target)
            assert (page.parent / target).exists(), (page.name, target)
