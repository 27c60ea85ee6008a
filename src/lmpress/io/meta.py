"""``lmpress.json``, read once and checked whole: the record lmpress writes beside the weights of a
directory it compressed (`lmpress.io.save`).

`read_meta` returns the record only when every field the loader and ``lmpress inspect`` read has
the shape they read it as: a format version this lmpress knows, ``modules`` an object of module
name -> format record, ``structure`` a list of per-block widths, ``shared`` an object of alias ->
module, ``metrics`` an object of per-model numbers, and so on. Anything else is one
`ModelLoadError` line naming the file, the field and what it holds instead (its type, or a short
repr, never the whole value). Fields it does not know are kept as they are.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from lmpress.errors import ModelLoadError
from lmpress.io.files import FORMAT_VERSION, META_FILE

__all__ = ["read_json", "read_json_object", "read_meta", "show"]

FIX = "re-run the compression"
MAX_BYTES = 1 << 30  # a record of a billion bytes is not one lmpress wrote

# fields of a module's format record (`lmpress.nn` layers' ``lmpress_format``), by the type they hold
_INT_FIELDS = (
    "in_features",
    "out_features",
    "bits",
    "group_size",
    "rank",
    "nnz",
    "num_embeddings",
    "embedding_dim",
    "padding_idx",
    "act_bits",
)
_BOOL_FIELDS = ("bias", "symmetric", "per_channel", "float_zeros", "row_scale")
_STR_FIELDS = ("dtype", "scale_dtype", "codebook_dtype", "type", "pattern", "tied_to")


def show(value: Any, limit: int = 60) -> str:
    """What ``value`` is, in a few words: its JSON type and, for a scalar, a repr cut to ``limit``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return f"an object of {len(value)} key(s)"
    if isinstance(value, list):
        return f"a list of {len(value)} item(s)"
    text = repr(value)
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    if isinstance(value, str):
        return f"a string ({text})"
    if isinstance(value, int):
        return f"an integer ({text})"
    if isinstance(value, float):
        return f"a number ({text})"
    return f"a {type(value).__name__}"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _name(key: str, limit: int = 60) -> str:
    """A key as it goes into a message (quoted, cut to ``limit``)."""
    text = repr(key)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Checker:
    """Checks one record; `fail` raises the one line naming the file."""

    def __init__(self, file: Path) -> None:
        self.file = file

    def fail(self, where: str, wanted: str, value: Any) -> NoReturn:
        raise ModelLoadError(f"{self.file}: {where} must be {wanted}, got {show(value)}; {FIX}")

    def expect(self, where: str, wanted: str, value: Any, ok: Callable[[Any], bool], optional: bool = True) -> None:
        """``value`` passes ``ok`` (or is absent/null, when ``optional``)."""
        self.require(where, wanted, value, (value is None and optional) or ok(value))

    def require(self, where: str, wanted: str, value: Any, ok: bool) -> None:
        if not ok:
            self.fail(where, wanted, value)

    def module(self, where: str, fmt: Any, depth: int = 0) -> None:
        if not isinstance(fmt, dict):
            self.fail(where, "an object with a 'format'", fmt)
        self.expect(f"{where} 'format'", "a string", fmt.get("format"), lambda v: isinstance(v, str), optional=False)
        for key in _INT_FIELDS:
            self.expect(f"{where} {key!r}", "an integer", fmt.get(key), _is_int)
        for key in _BOOL_FIELDS:
            self.expect(f"{where} {key!r}", "true or false", fmt.get(key), lambda v: isinstance(v, bool))
        for key in _STR_FIELDS:
            self.expect(f"{where} {key!r}", "a string", fmt.get(key), lambda v: isinstance(v, str))
        if fmt["format"] == "lora" or "base" in fmt:
            if depth > 0:
                self.fail(f"{where} 'base'", "a plain layer's format (not another adapter)", fmt.get("base"))
            self.module(f"{where} 'base'", fmt.get("base"), depth + 1)

    def record(self, meta: Any) -> dict[str, Any]:
        if not isinstance(meta, dict):
            raise ModelLoadError(f"{self.file} must hold a JSON object, got {show(meta)}; {FIX}")
        version: Any = meta.get("format_version")
        if not _is_int(version) or version < 1:
            self.fail("'format_version'", f"an integer 1..{FORMAT_VERSION}", version)
        if version > FORMAT_VERSION:
            raise ModelLoadError(
                f"{self.file} is lmpress format {version}; this lmpress reads up to {FORMAT_VERSION}: upgrade lmpress"
            )
        modules = meta.get("modules", {})
        self.expect("'modules'", "an object of module name -> format", modules, lambda v: isinstance(v, dict))
        for name, fmt in (modules or {}).items():
            self.module(f"module {_name(name)}", fmt)
        structure = meta.get("structure")
        self.expect("'structure'", "a list of per-block widths", structure, lambda v: isinstance(v, list))
        for i, block in enumerate(structure or []):
            ok = isinstance(block, dict) and all(_is_int(w) and w >= 0 for w in block.values())
            self.require(f"'structure' block {i}", "an object of name -> width (integers >= 0)", block, ok)
        shared = meta.get("shared")
        self.expect("'shared'", "an object of alias -> module name", shared, lambda v: isinstance(v, dict))
        for alias, source in (shared or {}).items():
            ok = bool(alias) and isinstance(source, str) and bool(source)
            self.require(f"'shared' {_name(alias)}", "a module name", source, ok)
        for key in ("recipe", "calibration", "data", "versions"):
            self.expect(repr(key), "an object", meta.get(key), lambda v: isinstance(v, dict))
        recipe = meta.get("recipe") or {}
        for key in ("name", "description"):
            self.expect(f"'recipe' {key!r}", "a string", recipe.get(key), lambda v: isinstance(v, str))
        stages = meta.get("stages")
        self.expect("'stages'", "a list of stage reports", stages, lambda v: isinstance(v, list))
        for i, report in enumerate(stages or []):
            self.expect(f"'stages' item {i}", "an object", report, lambda v: isinstance(v, dict), optional=False)
        metrics = meta.get("metrics")
        self.expect("'metrics'", "an object of model -> metrics", metrics, lambda v: isinstance(v, dict))
        for model, table in (metrics or {}).items():
            self.expect(f"'metrics' {_name(model)}", "an object", table, lambda v: isinstance(v, dict))
            for key, value in (table or {}).items():
                self.expect(f"metric {_name(model)} {_name(key)}", "a number", value, _is_number)
        for key in ("created", "source_model"):
            self.expect(repr(key), "a string", meta.get(key), lambda v: isinstance(v, str))
        self.expect("'bytes_on_disk'", "an integer", meta.get("bytes_on_disk"), lambda v: _is_int(v) and v >= 0)
        return meta


def read_json(file: Path, fix: str) -> Any:
    """The JSON value in ``file``; one `ModelLoadError` line (ending in ``; FIX``) when it is unreadable,
    not UTF-8 or not JSON."""
    try:
        size = file.stat().st_size
        if size > MAX_BYTES:
            raise ModelLoadError(f"{file} is {size:,} bytes, too large to be what it should be; {fix}")
        return json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{file} does not exist; {fix}") from None
    except OSError as e:
        raise ModelLoadError(f"cannot read {file} ({e.strerror or type(e).__name__}); {fix}") from None
    except UnicodeDecodeError:
        raise ModelLoadError(f"{file} is not UTF-8 text; {fix}") from None
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{file} is not valid JSON ({e}); {fix}") from None
    except (ValueError, RecursionError) as e:  # an integer of thousands of digits, nesting too deep
        raise ModelLoadError(f"{file} is not valid JSON ({type(e).__name__}); {fix}") from None


def read_json_object(file: Path, fix: str) -> dict[str, Any]:
    """`read_json`, refusing anything but a JSON object."""
    value = read_json(file, fix)
    if not isinstance(value, dict):
        raise ModelLoadError(f"{file} must hold a JSON object, got {show(value)}; {fix}")
    return value


def read_meta(path: Path) -> dict[str, Any]:
    """``path``'s ``lmpress.json``, checked (see the module docstring); raises `ModelLoadError`."""
    file = path / META_FILE
    return _Checker(file).record(read_json(file, FIX))
