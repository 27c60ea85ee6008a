"""Export an lmpress model to the file format of the runtime it will be deployed with.

``lmpress.export(model, "gguf", path)`` writes a GGUF file for llama.cpp (`lmpress.export.gguf`);
``"compressed-tensors"`` a Hugging Face directory that transformers (with the compressed-tensors
package) and vLLM load (`lmpress.export.compressed_tensors`); ``"onnx"`` a decoder graph with its KV
cache for ONNX Runtime (`lmpress.export.onnx`). Each format is one small module over the shared
walk of the model's modules (`lmpress.export.walk`), and writes lmpress's own codes and scales
without a second rounding.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lmpress.errors import OutputError
from lmpress.export.walk import ExportError
from lmpress.io import LoadedModel

FORMATS = ("gguf", "compressed-tensors", "onnx")
# the optional package each format needs to be written, and the extra that installs it
PACKAGES = {"compressed-tensors": ("compressed_tensors", "compressed-tensors"), "onnx": ("onnx", "onnx")}

__all__ = [
    "FORMATS",
    "ExportError",
    "check_export_output",
    "check_export_source",
    "check_output_file",
    "default_output",
    "export",
]


def check_export_output(to: str, path: Path, overwrite: bool = False, source: Path | None = None) -> None:
    """Fail before any work: an unknown format, a missing optional package, an output that cannot be
    written (GGUF is one file, the other formats a directory), one inside the model ``source``."""
    if to not in FORMATS:
        raise ExportError(f"unknown export format {to!r}; choose one of {', '.join(FORMATS)}")
    if to in PACKAGES:
        import importlib.util

        module, extra = PACKAGES[to]
        if importlib.util.find_spec(module) is None:
            raise ExportError(f"{to} export needs the {module} package: pip install 'lmpress[{extra}]'")
    from lmpress.io.files import check_not_input

    check_not_input(path, source)
    if to == "gguf":
        check_output_file(path, overwrite)
    else:
        from lmpress.io import check_output_dir

        if path.suffix.lower() in (".gguf", ".onnx", ".json", ".safetensors"):
            raise OutputError(f"{to} export writes a directory; give -o a directory name, not {path.name}")
        check_output_dir(path, overwrite, source)


def check_export_source(model: str | Path | LoadedModel) -> None:
    """Refuse a model that is itself an export (a GGUF file, an ONNX directory)."""
    if isinstance(model, LoadedModel):
        return
    from lmpress.preflight import exported_runtime

    if runtime := exported_runtime(model):
        raise ExportError(
            f"{model} is already an export (it runs in {runtime}); export the lmpress or Hugging Face "
            "directory it came from"
        )


def default_output(to: str, output: Path) -> Path:
    """Where ``compress --export`` writes beside the saved directory ``output``."""
    return output.with_name(output.name + ".gguf") if to == "gguf" else output.with_name(f"{output.name}-{to}")


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
    import tempfile

    try:  # a real probe: permissions alone do not tell (read-only mounts, /proc, running as root)
        os.close((probe := tempfile.mkstemp(prefix=".lmpress-probe-", dir=parent))[0])
        os.unlink(probe[1])
    except OSError:
        raise OutputError(f"cannot write {path}: {parent} is not writable; choose another -o") from None


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
    ``requantize`` (GGUF), the KL that rounding cost is measured on ``kl_windows`` windows of the
    built-in corpus's evaluation split (0: not measured). ``densify`` writes layers the format has no
    type for (sparse, low-rank, codebook) as the exact dense weights they compute with."""
    from lmpress.api import load

    path = Path(path)
    check_export_output(to, path, overwrite)
    check_export_source(model)
    if requantize is not None and to != "gguf":
        raise ExportError(f"--requantize rounds to GGUF types; {to} export writes lmpress's own codes only")
    if to != "gguf":
        loaded = model if isinstance(model, LoadedModel) else load(model, device="cpu")
        if to == "compressed-tensors":
            from lmpress.export.compressed_tensors import export_compressed_tensors

            return export_compressed_tensors(loaded.model, loaded.tokenizer, path, densify=densify, overwrite=overwrite)
        from lmpress.export.onnx import export_onnx

        return export_onnx(loaded.model, loaded.tokenizer, path, densify=densify, overwrite=overwrite)
    if requantize is not None:
        from lmpress.formats.ggml import ggml_type

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
