"""Export an lmpress model to the file format of the runtime it will be deployed with.

``export(model, "gguf", path)`` writes a GGUF file for llama.cpp; ``"compressed-tensors"`` a
Hugging Face directory that transformers (with the compressed-tensors package) and vLLM load;
``"onnx"`` a decoder graph with its KV cache for ONNX Runtime. Each format is an `Exporter`
(`lmpress.export.base`: check, write, load back for evaluation) registered by name in
`lmpress.export.registry`; the writers share one walk of the model's modules
(`lmpress.export.walk`) and write lmpress's own codes and scales without a second rounding.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

from lmpress.errors import ExportError, OutputError
from lmpress.export.base import Exporter, ExportOptions, Report, check_output_file
from lmpress.export.registry import EXPORTERS, exporter, exporter_for
from lmpress.io import LoadedModel, check_output_dir, load_model
from lmpress.io.files import check_not_input

__all__ = [
    "EXPORTERS",
    "ExportError",
    "check_export_output",
    "check_export_source",
    "default_output",
    "export",
]


def check_export_output(to: str, path: Path, overwrite: bool = False, source: Path | None = None) -> Exporter:
    """Fail before any work: an unknown format, a missing optional package, an output that cannot be
    written (one file or a directory, as the format writes), one inside the model ``source``.
    Returns the format's exporter."""
    chosen = exporter(to)
    if chosen.package is not None:
        module, extra = chosen.package
        if importlib.util.find_spec(module) is None:
            raise ExportError(f"{to} export needs the {module} package: pip install 'lmpress[{extra}]'")
    check_not_input(path, source)
    if chosen.writes_file:
        check_output_file(path, overwrite, chosen.suffix)
    else:
        files = {s for e in EXPORTERS.values() for s in (e.suffix, *e.file_suffixes) if s}
        if path.suffix.lower() in files:
            raise OutputError(f"{to} export writes a directory; give -o a directory name, not {path.name}")
        check_output_dir(path, overwrite, source)
    return chosen


def check_export_source(model: str | Path | LoadedModel) -> None:
    """Refuse a model that is itself an export (a GGUF file, an ONNX directory)."""
    if isinstance(model, LoadedModel):
        return
    if (found := exporter_for(model)) is not None:
        raise ExportError(
            f"{model} is already an export (it runs in {found.runtime}); export the lmpress or Hugging Face "
            "directory it came from"
        )


def default_output(to: str, output: Path) -> Path:
    """Where ``compress --export`` writes beside the saved directory ``output``."""
    chosen = EXPORTERS[to]
    if chosen.writes_file:
        return output.with_name(output.name + chosen.suffix)
    return output.with_name(f"{output.name}-{to}")


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
) -> Report:
    """Write ``model`` (an lmpress or Hugging Face directory, ``builtin``, or a loaded model) in
    format ``to`` at ``path``; returns the format's report (for GGUF a `GGUFReport`). With
    ``requantize`` (GGUF), the KL that rounding cost is measured on ``kl_windows`` windows of the
    built-in corpus's evaluation split (0: not measured). ``densify`` writes layers the format has no
    type for (sparse, low-rank, codebook) as the exact dense weights they compute with."""
    path = Path(path)
    chosen = check_export_output(to, path, overwrite)
    check_export_source(model)
    options = ExportOptions(requantize, densify, overwrite, kl_windows=kl_windows)
    chosen.check(options)  # before the model loads
    loaded = model if isinstance(model, LoadedModel) else load_model(model, device="cpu")
    options = replace(options, name=name or Path(loaded.source).name or "lmpress")
    return chosen.write(loaded.model, loaded.tokenizer, path, options)
