"""The export formats lmpress knows, by the name ``--to`` takes: the one place a format is
registered. A new format is one module defining an `Exporter` plus one entry here."""

from __future__ import annotations

from pathlib import Path

from lmpress.errors import ExportError
from lmpress.export import compressed_tensors, gguf_exporter, onnx_exporter
from lmpress.export.base import Exporter

__all__ = ["DEFAULT_FORMAT", "EXPORTERS", "exporter", "exporter_for"]

EXPORTERS: dict[str, Exporter] = {
    e.name: e for e in (gguf_exporter.EXPORTER, compressed_tensors.EXPORTER, onnx_exporter.EXPORTER)
}
DEFAULT_FORMAT = gguf_exporter.EXPORTER.name  # what ``lmpress export`` writes without --to


def exporter(name: str, flag: str = "") -> Exporter:
    """The exporter registered as ``name``; ``flag`` (``--export``) names the option in the refusal."""
    if name not in EXPORTERS:
        choices = ", ".join(EXPORTERS)
        if flag:
            raise ExportError(f"{flag} {name}: unknown format; choose one of {choices}")
        raise ExportError(f"unknown export format {name!r}; choose one of {choices}")
    return EXPORTERS[name]


def exporter_for(source: str | Path) -> Exporter | None:
    """The exporter whose artifact ``source`` is (a GGUF file, an ONNX directory), when it runs in
    a runtime of its own; None for anything PyTorch loads."""
    return next((e for e in EXPORTERS.values() if e.recognizes(source)), None)
