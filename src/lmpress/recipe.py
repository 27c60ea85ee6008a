"""Recipes: ordered compression stages, validated against their methods' configs before any work.

A recipe is YAML with a ``stages`` list; each stage names its ``method`` and that method's keys::

    name: bf16
    stages:
      - method: cast
        dtype: bfloat16

An unknown method, an unknown key, a wrong type or an impossible value fails at once, naming the
stage, the key and what is allowed. A recipe argument is a path to a YAML file (it contains a
``/`` or ends in ``.yaml``/``.yml``) or otherwise the name of a preset shipped in ``lmpress/recipes``.

Hostile files fail in one line too, and fast: a recipe file is a regular file of at most 1 MB, its
parsed value at most 100,000 values and 64 levels deep once YAML aliases are expanded (an alias
bomb is measured by a walk that stops at the cap, never by formatting it), and a message shows at
most a short, bounded repr of any value from the file.
"""

from __future__ import annotations

import os
import reprlib
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from yaml.constructor import ConstructorError

from lmpress.errors import RecipeError
from lmpress.method import MethodConfig
from lmpress.registry import methods

PRESET_DIR = Path(__file__).parent / "recipes"
_TOP_KEYS = {"name", "description", "stages"}
MAX_RECIPE_BYTES = 1_000_000  # a recipe file is at most 1 MB
MAX_RECIPE_VALUES = 100_000  # values once aliases are expanded; a string counts one per 10 characters
MAX_RECIPE_DEPTH = 64
_MAX_ERRORS = 3  # pydantic errors shown per stage

_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxlist, _repr.maxdict, _repr.maxtuple, _repr.maxset = 2, 4, 4, 4, 4
_repr.maxstring, _repr.maxother, _repr.maxlong = 60, 60, 40


def short(value: object) -> str:
    """A bounded repr of a value from a recipe: short however big (or self-referencing) it is."""
    try:
        return _repr.repr(value)
    except Exception:  # a repr that fails is still a value of some type
        return f"<{type(value).__name__}>"


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
    key = (".".join(str(p) for p in err["loc"]) or "stage")[:80]
    if err["type"] == "extra_forbidden":
        allowed = ", ".join(k for k in cls.model_fields if k != "method")
        return f"unknown key {short(key)}; allowed keys: {allowed}"
    msg = str(err["msg"])[:200]
    msg = msg[:1].lower() + msg[1:]
    return f"{key}: {msg}, got {short(err.get('input'))}"


def parse_stage(index: int, raw: object) -> MethodConfig:
    """Validate one stage (``index`` counts from 1 in messages)."""
    if not isinstance(raw, Mapping):
        raise RecipeError(f"recipe stage {index}: must be a mapping with a 'method' key, got {short(raw)}")
    name = raw.get("method")
    known = methods()
    if not isinstance(name, str) or name not in known:
        raise RecipeError(
            f"recipe stage {index}: unknown method {short(name)}; known methods: " + ", ".join(sorted(known))
        )
    cls = known[name].config
    try:
        return cls.model_validate(dict(raw))
    except ValidationError as e:
        errors = e.errors()
        more = f"; and {len(errors) - _MAX_ERRORS} more" if len(errors) > _MAX_ERRORS else ""
        described = "; ".join(_describe(x, cls) for x in errors[:_MAX_ERRORS])
        raise RecipeError(f"recipe stage {index} ({name}): {described}{more}") from None


def parse_recipe(raw: object, default_name: str = "recipe") -> Recipe:
    """A `Recipe` from parsed YAML: a mapping with ``stages`` (or a bare list of stages)."""
    if isinstance(raw, list):
        raw = {"stages": raw}
    if not isinstance(raw, Mapping):
        raise RecipeError(f"a recipe must be a mapping with a 'stages' list, got {type(raw).__name__}")
    extra = [k for k in raw if k not in _TOP_KEYS]
    if extra:
        raise RecipeError(f"recipe: unknown key {short(extra[0])}; allowed keys: description, name, stages")
    text = {key: _scalar(raw, key) for key in ("name", "description")}
    stages = raw.get("stages")
    if not isinstance(stages, list) or not stages:
        raise RecipeError("recipe: 'stages' must be a non-empty list of stages, each with a 'method'")
    return Recipe(
        stages=tuple(parse_stage(i, s) for i, s in enumerate(stages, 1)),
        name=text["name"] or default_name,
        description=text["description"] or "",
    )


def _scalar(raw: Mapping[Any, Any], key: str) -> str | None:
    """A recipe's ``name`` or ``description`` as text (None when absent); a list or mapping is refused."""
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, Mapping | list | tuple | set):
        raise RecipeError(f"recipe: {key!r} must be a string, got a {type(value).__name__}; write one line of text")
    return str(value)


def check_size(raw: object, what: str = "recipe") -> None:
    """Refuse a parsed recipe that is too big once YAML aliases are expanded, or nested too deeply.

    Walks the value without formatting it and stops counting at the cap, so a billion-laughs bomb
    (or a structure that contains itself) is refused after at most ``MAX_RECIPE_VALUES`` steps.
    A string counts one value per 10 characters, so aliases cannot multiply a long string either."""
    budget = MAX_RECIPE_VALUES
    stack: list[tuple[object, int]] = [(raw, 0)]
    while stack:
        value, depth = stack.pop()
        budget -= 1 + (len(value) // 10 if isinstance(value, str | bytes) else 0)
        if budget < 0:
            raise RecipeError(
                f"{what} expands to more than {MAX_RECIPE_VALUES} values (YAML aliases?); write the values out"
            )
        if depth > MAX_RECIPE_DEPTH:
            raise RecipeError(f"{what} nests deeper than {MAX_RECIPE_DEPTH} levels; write a flat recipe")
        if isinstance(value, Mapping):
            stack.extend((item, depth + 1) for pair in value.items() for item in pair)
        elif isinstance(value, list | tuple | set):
            stack.extend((item, depth + 1) for item in value)


def presets() -> dict[str, Path]:
    """Preset name -> recipe file shipped with lmpress."""
    return {p.stem: p for p in sorted(PRESET_DIR.glob("*.yaml"))}


def load_recipe(source: str | Path | Recipe | Mapping[str, Any]) -> Recipe:
    """A validated recipe from a YAML file, a preset name, a mapping, or a `Recipe`."""
    if isinstance(source, Recipe):
        return source
    if isinstance(source, Mapping):
        check_size(source)
        return parse_recipe(source)
    text = str(source)
    if isinstance(source, Path) or "/" in text or text.endswith((".yaml", ".yml")):
        path = Path(source)
    else:
        found = presets()
        if text not in found:
            raise RecipeError(
                f"recipe {short(text)} is not a preset; presets: {', '.join(found)} (or give a .yaml file)"
            )
        path = found[text]
    raw = load_yaml_file(path)
    return parse_recipe(raw, default_name=path.stem)


def load_yaml_file(path: Path, what: str = "recipe") -> object:
    """A YAML file read within the recipe limits (a regular UTF-8 file of at most 1 MB whose values,
    aliases expanded, stay under ``MAX_RECIPE_VALUES``); ``what`` names it in messages. An empty
    recipe is an error; another empty file is None."""
    data = _read_recipe_file(path, what)
    try:
        raw = yaml.safe_load(data)
    except ConstructorError as e:  # a tag safe_load does not construct (!!python/object), an unhashable key
        problem = str(e.problem or "a value YAML cannot construct")[:160]
        hint = f"a {what} holds plain YAML values, no !!python tags" if "python/" in problem else "fix the value"
        raise RecipeError(f"{what} {path}{_line(e)}: {problem}; {hint}") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{what} {path} is not valid YAML{_line(e)}; fix the syntax") from None
    except RecursionError:
        raise RecipeError(f"{what} {path} nests too deeply to read; write a flat {what}") from None
    if raw is None and what == "recipe":
        raise RecipeError(f"{what} {path} is empty; write a mapping with a 'stages' list (see lmpress presets)")
    check_size(raw, f"{what} {path}")
    return raw


def _line(e: yaml.YAMLError) -> str:
    where = getattr(e, "problem_mark", None)
    return f" (line {where.line + 1})" if where is not None else ""


def _read_recipe_file(path: Path, what: str = "recipe") -> str:
    """A recipe file's text: a regular UTF-8 file of at most ``MAX_RECIPE_BYTES`` (never a stream)."""
    try:
        st = path.stat()
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the name
        if isinstance(e, FileNotFoundError | NotADirectoryError | ValueError):
            raise RecipeError(
                f"{what} file {short(str(path))} does not exist; give a YAML file"
                + (" or a preset name" if what == "recipe" else "")
            ) from None
        raise RecipeError(f"cannot read {what} {path}: {e.strerror or e}; check the path") from None
    if stat.S_ISDIR(st.st_mode):
        raise RecipeError(f"{what} {path} is a directory; give a YAML file in it or a preset name")
    if not stat.S_ISREG(st.st_mode):
        raise RecipeError(f"{what} {path} is not a regular file (a FIFO, device or socket); give a YAML file")
    too_big = f"{what}s are at most {MAX_RECIPE_BYTES / 1e6:g} MB"
    if st.st_size > MAX_RECIPE_BYTES:
        size = f"{st.st_size / 1e6:.1f} MB" if st.st_size >= 1.1e6 else f"{st.st_size:,} bytes"
        raise RecipeError(f"{what} {path} is {size}; {too_big}")
    try:  # opened without blocking and checked again: a FIFO put in the file's place is not waited on
        with open(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise RecipeError(f"{what} {path} is not a regular file (a FIFO, device or socket); give a YAML file")
            data = f.read(MAX_RECIPE_BYTES + 1)  # a file that grew since stat still stops here
    except OSError as e:
        raise RecipeError(f"cannot read {what} {path}: {e.strerror or e}; check the path") from None
    if len(data) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{what} {path} is over {MAX_RECIPE_BYTES / 1e6:g} MB; {too_big}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{what} {path} is not UTF-8 text (byte {e.start}); give a YAML file") from None
