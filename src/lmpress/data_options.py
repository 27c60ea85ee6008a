"""`DataOptions`: where a run's text comes from (evaluation, calibration, training) and how it is windowed."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from lmpress.data import Split, TokenData, load_windows, select_split
from lmpress.errors import DataError
from lmpress.sources import STDLIB, load_documents


@dataclass(frozen=True)
class DataOptions:
    """Where evaluation and calibration text comes from and how it is windowed.

    The window counts default to ``$LMPRESS_MAX_WINDOWS`` / ``$LMPRESS_CALIB_WINDOWS`` when set (read
    when the options are made: every command quickly, with rough numbers), else to
    ``BUILTIN_WINDOWS``."""

    BUILTIN_WINDOWS: ClassVar[dict[str, int]] = {"eval_windows": 64, "calib_windows": 128}

    source: str | Path = STDLIB
    seq_len: int = 256
    eval_windows: int | None = field(default_factory=lambda: DataOptions.env_windows("eval_windows"))
    calib_windows: int = field(default_factory=lambda: DataOptions.env_windows("calib_windows"))
    train_windows: int | None = None  # None: every window of the train split (training stages)
    pattern: str = "**/*"
    text_field: str = "text"

    def prompts(self, n: int, chars: int = 120) -> list[str]:
        """``n`` openings of evaluation text, cut at a line end: prompts for generation samples. The
        first documents' beginnings first; fewer documents than ``n`` give openings further in."""
        docs = select_split(load_documents(self.source, pattern=self.pattern, text_field=self.text_field), "eval")
        texts = [d.text for d in docs if len(d.text.strip()) >= 20]
        out: list[str] = []
        for k in range(n):  # round k: the opening at k/n of each document (at a line start)
            for text in texts:
                start = 0 if k == 0 else text.find("\n", k * len(text) // n) + 1
                piece = text[start:].lstrip()
                cut = piece.rfind("\n", 0, chars)
                if len(piece) >= 20:
                    out.append(piece[: cut + 1] if cut > 20 else piece[:chars])
                if len(out) == n:
                    return out
        return out

    def load(self, tokenizer: Any, split: Split, max_windows: int | None) -> TokenData:
        return load_windows(
            tokenizer,
            self.source,
            split,
            self.seq_len,
            max_windows,
            pattern=self.pattern,
            text_field=self.text_field,
        )

    def texts(self) -> list[str]:
        """Every text of the source, all splits (what a vocabulary stage counts tokens on)."""
        return [d.text for d in load_documents(self.source, pattern=self.pattern, text_field=self.text_field)]

    @staticmethod
    def env_windows(name: str) -> int:
        """The default of ``eval_windows`` or ``calib_windows``: its environment variable, else built in."""
        var = {"eval_windows": "LMPRESS_MAX_WINDOWS", "calib_windows": "LMPRESS_CALIB_WINDOWS"}[name]
        text = os.environ.get(var, "").strip()
        if not text:
            return DataOptions.BUILTIN_WINDOWS[name]
        if not text.isdigit() or int(text) < 1:
            raise DataError(f"{var} must be a whole number of windows >= 1, got {text[:40]!r}")
        return int(text)

    @classmethod
    def of(cls, data: DataOptions | str | Path | None) -> DataOptions:
        """``data`` as options: a source alone (a path or "stdlib"; None: the stdlib) gets the defaults."""
        return data if isinstance(data, DataOptions) else cls(source=data or STDLIB)


# `lmpress --help` reads the defaults from the class; a default_factory field leaves no class attribute
DataOptions.eval_windows = DataOptions.BUILTIN_WINDOWS["eval_windows"]
DataOptions.calib_windows = DataOptions.BUILTIN_WINDOWS["calib_windows"]
