"""What an export format is: the `Exporter` interface every format implements.

An exporter names its format (what ``--to`` takes), says whether it writes one file (its suffix)
or a directory, which optional package it needs, refuses options it cannot honour before anything
loads (`Exporter.check`), writes a loaded model (`Exporter.write`), and, when the result runs in a
runtime of its own (llama.cpp, ONNX Runtime), recognizes such an artifact, loads it back there for
evaluation (`Exporter.load_back`) and reads what it holds for ``lmpress inspect``
(`Exporter.contents`). The formats lmpress knows are registered in `lmpress.export.registry`.
"""

from __future__ import annotations

import os
import tempfile
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from lmpress.errors import ExportError, ModelLoadError, OutputError
from lmpress.io import LoadedModel

__all__ = ["Contents", "ExportOptions", "Exporter", "Report", "VocabStub", "check_output_file", "runtime_missing"]


@dataclass(frozen=True)
class ExportOptions:
    """What the user asked of an export; a format refuses in `Exporter.check` what it cannot do.

    ``requantize``: round layers with no exact type of the format to this type; ``densify``: write
    layers the format has no type for as the exact dense weights they compute with; ``name``: the
    model's name inside the file; ``kl_windows``: held-out windows the requantization's KL is
    measured on (0: not measured)."""

    requantize: str | None = None
    densify: bool = False
    overwrite: bool = False
    name: str = "lmpress"
    kl_windows: int = 8


class Report(Protocol):
    """What a write returns: ``to_dict()`` has at least path, bytes and types (type -> count)."""

    def to_dict(self) -> dict[str, Any]: ...


@dataclass
class Contents:
    """What an exported artifact holds, read without running it (for ``lmpress inspect``).

    ``modules``: one row per stored module, (storage format, weights, weights kept, bytes);
    ``architecture``: the model's shape as the artifact records it, or None to read the
    ``config.json`` beside it."""

    modules: list[tuple[str, int, int, int]] = field(default_factory=list)
    bytes_on_disk: int = 0
    architecture: dict[str, Any] | None = None


class Exporter(ABC):
    """One export format; see the module docstring. Instances are registered by `name`."""

    name: ClassVar[str]  # what --to takes
    help: ClassVar[str]  # where it runs, for the CLI's help
    artifact: ClassVar[str]  # what ``lmpress inspect`` calls one ("GGUF file")
    suffix: ClassVar[str] = ""  # the one file it writes; "" when it writes a directory
    file_suffixes: ClassVar[tuple[str, ...]] = ()  # the files a directory export holds
    package: ClassVar[tuple[str, str] | None] = None  # (module it needs, the extra that installs it)
    runtime: ClassVar[str | None] = None  # where its artifacts run, when not in PyTorch

    @property
    def writes_file(self) -> bool:
        return bool(self.suffix)

    def check(self, options: ExportOptions) -> None:
        """Refuse, before the model loads, options this format cannot honour."""
        if options.requantize is not None:
            raise ExportError(f"--requantize rounds to GGUF types; {self.name} export writes lmpress's own codes only")

    @abstractmethod
    def write(self, model: nn.Module, tokenizer: Any, path: Path, options: ExportOptions) -> Report:
        """Write ``model`` (with its ``tokenizer``) at ``path``; refuse what the format cannot hold
        before anything is written."""

    def recognizes(self, source: str | Path) -> bool:
        """Whether ``source`` is an artifact of this format that runs in `runtime`."""
        return False

    def load_back(self, path: Path, tokenizer: str | Path | None = None) -> LoadedModel:
        """The artifact at ``path`` running in its runtime, measured like any lmpress model."""
        raise ExportError(f"{self.name} exports load as Hugging Face directories, not in a runtime of their own")

    def contents(self, path: Path) -> Contents:
        """What the artifact at ``path`` holds (`Contents`), without running it."""
        raise ExportError(f"lmpress cannot read a {self.name} export's contents")


def runtime_missing(error: ModuleNotFoundError, package: str, refusal: str) -> Exception:
    """What to raise when importing an export's runtime module failed with ``error``: the one-line
    ``refusal`` (how to install it) when the missing module is the runtime's ``package``."""
    missing = error.name or ""
    return ModelLoadError(refusal) if missing == package or missing.startswith(package + ".") else error


class VocabStub(nn.Module):
    """Stands in for the input embeddings of a model run by another runtime, where evaluation asks
    for the vocabulary size."""

    def __init__(self, n_vocab: int) -> None:
        super().__init__()
        self.num_embeddings = n_vocab
        self.register_buffer("weight", torch.empty(n_vocab, 0), persistent=False)


def check_output_file(path: Path, overwrite: bool, suffix: str) -> None:
    """Fail before any work if ``path`` cannot be written as a new file ending in ``suffix``."""
    if path.suffix.lower() != suffix:
        raise OutputError(f"output {path} should end in {suffix}; name the file e.g. model{suffix}")
    if path.is_dir():
        raise OutputError(f"output {path} is a directory; give a file name ending in {suffix}")
    if path.exists() and not overwrite:
        raise OutputError(f"output {path} exists; choose another name or pass --overwrite")
    parent = path.resolve().parent
    if not parent.is_dir():
        raise OutputError(f"cannot write {path}: directory {parent} does not exist; create it first")
    try:  # a real probe: permissions alone do not tell (read-only mounts, /proc, running as root)
        os.close((probe := tempfile.mkstemp(prefix=".lmpress-probe-", dir=parent))[0])
        os.unlink(probe[1])
    except OSError:
        raise OutputError(f"cannot write {path}: {parent} is not writable; choose another -o") from None
