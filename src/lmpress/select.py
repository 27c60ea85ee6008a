"""Selecting modules by name: exact names, or full-match regexes with the ``re:`` prefix.

The convention torchao and llm-compressor users know: ``targets: ["re:.*mlp\\..*_proj"]``,
``ignore: ["lm_head"]``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Annotated

from pydantic import AfterValidator
from torch import nn


def matches(name: str, patterns: Iterable[str]) -> bool:
    """True if ``name`` equals a pattern or full-matches one written ``re:REGEX``."""
    for p in patterns:
        if p.startswith("re:"):
            if re.fullmatch(p[3:], name):
                return True
        elif p == name:
            return True
    return False


def select(named: Mapping[str, nn.Module], targets: Iterable[str], ignore: Iterable[str] = ()) -> dict[str, nn.Module]:
    """The modules of ``named`` matched by ``targets`` and by none of ``ignore``, in order."""
    targets, ignore = list(targets), list(ignore)
    return {n: m for n, m in named.items() if matches(n, targets) and not matches(n, ignore)}


def check_patterns(patterns: list[str]) -> list[str]:
    """Validate ``re:`` patterns when a config is parsed, not when a model is already loaded."""
    for p in patterns:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise ValueError(f"invalid regex {p!r} ({e})") from None
    return patterns


Patterns = Annotated[list[str], AfterValidator(check_patterns)]
