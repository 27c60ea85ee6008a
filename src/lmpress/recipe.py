"""Recipes: ordered compression stages, validated against their methods' configs before any work.

A recipe is YAML with a ``stages`` list; each stage names its ``method`` and that method's keys::

    name: bf16
    stages:
      - method: cast
        dtype: bfloat16

An unknown method, an unknown key, a wrong type or an impossible value fails at once, naming the
stage, the key and what is allowed. A recipe argument is a path to a YAML file (it contains a
``/`` or ends in ``.yaml``/``.yml``) or otherwise the name of a preset shipped in ``lmpress/recipes``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from lmpress.errors import RecipeError
from lmpress.method import MethodConfig
from lmpress.registry import methods

PRESET_DIR = Path(__file__).parent / "recipes"
_TOP_KEYS = {"name", "description", "stages"}


@dataclass(frozen=True)
class Recipe:
    """A validated recipe: ordered stage configs plus a name for reports."""

    stages: tuple[MethodConfig, ...]
    name: str = "recipe"
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "stages": [s.model_dump(mode="json") for s in self.stages],
        }


def _describe(err: Mapping[str, Any], cls: type[MethodConfig]) -> str:
    """One pydantic error as 'key: what is wrong, got VALUE'."""
    key = ".".join(str(p) for p in err["loc"]) or "stage"
    if err["type"] == "extra_forbidden":
        allowed = ", ".join(k for k in cls.model_fields if k != "method")
        return f"unknown key {key!r}; allowed keys: {allowed}"
    msg = err["msg"][0].lower() + err["msg"][1:]
    return f"{key}: {msg}, got {err['input']!r}"


def parse_stage(index: int, raw: object) -> MethodConfig:
    """Validate one stage (``index`` counts from 1 in messages)."""
    if not isinstance(raw, Mapping):
        raise RecipeError(f"recipe stage {index}: must be a mapping with a 'method' key, got {raw!r}")
    name = raw.get("method")
    known = methods()
    if name not in known:
        raise RecipeError(f"recipe stage {index}: unknown method {name!r}; known methods: " + ", ".join(sorted(known)))
    cls = known[name].config
    try:
        return cls.model_validate(dict(raw))
    except ValidationError as e:
        raise RecipeError(
            f"recipe stage {index} ({name}): " + "; ".join(_describe(x, cls) for x in e.errors())
        ) from None


def parse_recipe(raw: object, default_name: str = "recipe") -> Recipe:
    """A `Recipe` from parsed YAML: a mapping with ``stages`` (or a bare list of stages)."""
    if isinstance(raw, list):
        raw = {"stages": raw}
    if not isinstance(raw, Mapping):
        raise RecipeError(f"a recipe must be a mapping with a 'stages' list, got {type(raw).__name__}")
    extra = set(raw) - _TOP_KEYS
    if extra:
        raise RecipeError(f"recipe: unknown key {sorted(extra)[0]!r}; allowed keys: description, name, stages")
    stages = raw.get("stages")
    if not isinstance(stages, list) or not stages:
        raise RecipeError("recipe: 'stages' must be a non-empty list of stages, each with a 'method'")
    return Recipe(
        stages=tuple(parse_stage(i, s) for i, s in enumerate(stages, 1)),
        name=str(raw.get("name", default_name)),
        description=str(raw.get("description", "")),
    )


def presets() -> dict[str, Path]:
    """Preset name -> recipe file shipped with lmpress."""
    return {p.stem: p for p in sorted(PRESET_DIR.glob("*.yaml"))}


def load_recipe(source: str | Path | Recipe | Mapping[str, Any]) -> Recipe:
    """A validated recipe from a YAML file, a preset name, a mapping, or a `Recipe`."""
    if isinstance(source, Recipe):
        return source
    if isinstance(source, Mapping):
        return parse_recipe(source)
    text = str(source)
    if isinstance(source, Path) or "/" in text or text.endswith((".yaml", ".yml")):
        path = Path(source)
        if not path.is_file():
            raise RecipeError(f"recipe file {text!r} does not exist; give a YAML file or a preset name")
    else:
        found = presets()
        if text not in found:
            raise RecipeError(f"recipe {text!r} is not a preset; presets: {', '.join(found)} (or give a .yaml file)")
        path = found[text]
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise RecipeError(f"recipe {path} is not valid YAML{line}; fix the syntax") from None
    except UnicodeDecodeError:
        raise RecipeError(f"recipe {path} is not UTF-8 text; give a YAML file") from None
    return parse_recipe(raw, default_name=path.stem)
