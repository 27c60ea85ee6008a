"""Export an lmpress model to the file format of the runtime it will be deployed with.

``lmpress.export(model, "gguf", path)`` writes a GGUF file for llama.cpp (`lmpress.export.gguf`).
Each format is one small module over the shared walk of the model's modules (`lmpress.export.walk`),
and writes lmpress's own codes and scales without a second rounding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmpress.errors import OutputError
from lmpress.export.walk import ExportError
from lmpress.models.loading import LoadedModel

FORMATS = ("gguf",)

__all__ = ["FORMATS", "ExportError", "check_output_file", "export"]


def check_output_file(path: Path, overwrite: bool = False, suffix: str = ".gguf") -> None:
    """Fail before any work if ``path`` cannot be written as a new file."""
    if path.suffix.lower() != suffix:
        raise OutputError(f"output {path} should end in {suffix}; name the file e.g. model{suffix}")
    if path.is_dir():
        raise OutputError(f"output {path} is a directory; give a file name ending in {suffix}")
    if path.exists() and not overwrite:
        raise OutputError(f"output {path} exists; choose another name or pass --overwrite")
    parent = path.resolve().parent
    if not parent.is_dir():
        raise OutputError(f"cannot write {path}: directory {parent} does not exist; create it first")
    import os

    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write {path}: {parent} is not writable; choose another -o")


def export(
    model: str | Path | LoadedModel,
    to: str,
    path: str | Path,
    *,
    requantize: str | None = None,
    densify: bool = False,
    overwrite: bool = False,
    name: str | None = None,
    kl_windows: int = 8,
) -> Any:
    """Write ``model`` (an lmpress or Hugging Face directory, ``builtin``, or a loaded model) in
    format ``to`` at ``path``; returns the format's report (for GGUF a `GGUFReport`). With
    ``requantize``, the KL that rounding cost is measured on ``kl_windows`` windows of the built-in
    corpus's evaluation split (0: not measured)."""
    from lmpress.api import load

    if to not in FORMATS:
        raise ExportError(f"unknown export format {to!r}; choose one of {', '.join(FORMATS)}")
    path = Path(path)
    check_output_file(path, overwrite)
    if requantize is not None:
        from lmpress.quant.ggml import ggml_type

        try:
            ggml_type(requantize)
        except ValueError as e:
            raise ExportError(f"--requantize: {e}") from None
    loaded = model if isinstance(model, LoadedModel) else load(model, device="cpu")
    from lmpress.export.gguf import export_gguf

    label = name or Path(loaded.source).name or "lmpress"
    windows = None
    if requantize is not None and kl_windows:  # what the requantization costs, on held-out text
        from lmpress.data import load_windows

        windows = load_windows(loaded.tokenizer, "stdlib", "eval", 256, kl_windows).windows
    return export_gguf(
        loaded.model, loaded.tokenizer, path, name=label, requantize=requantize, densify=densify, kl_windows=windows
    )
