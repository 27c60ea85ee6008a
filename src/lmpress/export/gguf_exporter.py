"""The GGUF format as an `Exporter`: one file for llama.cpp (`lmpress.export.gguf` writes it,
`lmpress.export.llama_runtime` runs it back for evaluation, `read_gguf` reads its header for
``lmpress inspect``)."""

from __future__ import annotations

import logging
import re
import struct
from pathlib import Path
from typing import Any

from torch import nn

from lmpress.data import load_windows
from lmpress.errors import ExportError, ModelLoadError
from lmpress.export.base import Contents, Exporter, ExportOptions, runtime_missing
from lmpress.export.gguf import GGUFReport, export_gguf
from lmpress.export.gguf_check import check_gguf
from lmpress.formats.ggml import ggml_type
from lmpress.io import LoadedModel

__all__ = ["EXPORTER", "GGUFExporter", "read_gguf"]

_NO_LLAMA_CPP = "running a GGUF file needs llama.cpp: pip install 'lmpress[gguf]' (builds llama-cpp-python)"
_NUMBERS = ("layers", "hidden", "heads", "kv_heads", "intermediate", "context")
# llama.cpp gives these tokens of a model whose general.name says Phi-3 their Phi-3 attributes
# (llama-vocab.cpp), and stops loading where the vocabulary lacks one
_PHI3_NAMED = re.compile("phi-?3", re.IGNORECASE)
_PHI3_TOKENS = ("</s>", "<unk>", "<s>", "<|endoftext|>")

log = logging.getLogger(__name__)


def file_name(name: str, tokenizer: Any) -> str:
    """The ``general.name`` to write: ``name``, without "phi3" where llama.cpp would look for Phi-3's
    tokens in a vocabulary that lacks them (a Phi-3 model over another tokenizer)."""
    vocab = tokenizer.get_vocab() if callable(getattr(tokenizer, "get_vocab", None)) else {}
    missing = [t for t in _PHI3_TOKENS if t not in vocab]
    if not _PHI3_NAMED.search(name) or not missing:
        return name
    safe = _PHI3_NAMED.sub("phi", name)
    log.info("GGUF name %r written as %r: llama.cpp looks for %s in a model named Phi-3", name, safe, missing)
    return safe


class GGUFExporter(Exporter):
    name = "gguf"
    help = "llama.cpp, Ollama, LM Studio"
    artifact = "GGUF file"
    suffix = ".gguf"
    runtime = "llama.cpp"

    def check(self, options: ExportOptions) -> None:
        if options.requantize is not None:
            try:
                ggml_type(options.requantize)
            except ValueError as e:
                raise ExportError(f"--requantize: {e}") from None

    def write(self, model: nn.Module, tokenizer: Any, path: Path, options: ExportOptions) -> GGUFReport:
        windows = None
        if options.requantize is not None and options.kl_windows:  # what the requantization costs, on held-out text
            windows = load_windows(tokenizer, "stdlib", "eval", 256, options.kl_windows).windows
        return export_gguf(
            model,
            tokenizer,
            path,
            name=file_name(options.name, tokenizer),
            requantize=options.requantize,
            densify=options.densify,
            kl_windows=windows,
        )

    def recognizes(self, source: str | Path) -> bool:
        return str(source).lower().endswith(self.suffix)

    def load_back(self, path: Path, tokenizer: str | Path | None = None) -> LoadedModel:
        """llama.cpp runs the file, with its own tokenizer (``tokenizer`` is not used)."""
        check_gguf(path)  # a bounded header check: llama.cpp trusts the counts and lengths it reads
        try:
            from lmpress.export.llama_runtime import LlamaCppModel, LlamaCppTokenizer
        except ModuleNotFoundError as e:
            raise runtime_missing(e, "llama_cpp", _NO_LLAMA_CPP) from None
        model = LlamaCppModel(path)
        return LoadedModel(model.eval(), LlamaCppTokenizer(model), str(path), path)

    def contents(self, path: Path) -> Contents:
        return read_gguf(path)


def read_gguf(path: Path) -> Contents:
    """A GGUF file's architecture (from its metadata) and tensors by llama.cpp type."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ModelLoadError("reading a GGUF file needs the gguf package: pip install 'lmpress[gguf]'") from None
    check_gguf(path)  # bounded: GGUFReader trusts the header's counts and lengths
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError, TypeError, OverflowError, struct.error, MemoryError) as e:
        reason = (str(e) or type(e).__name__).splitlines()[0][:200]
        raise ModelLoadError(f"{path} is not a valid GGUF file ({reason}); re-export or re-download it") from None

    def field_value(key: str) -> Any:
        f = reader.fields.get(key)
        if f is None:
            return None
        if f.types and f.types[0].name == "STRING":
            return bytes(f.parts[f.data[0]]).decode("utf-8", errors="replace")
        if f.types and f.types[0].name == "ARRAY":
            return len(f.data)
        return f.parts[f.data[0]].tolist()[0]

    arch_name = field_value("general.architecture")
    arch = {
        "model_type": arch_name,
        "name": field_value("general.name"),
        "layers": field_value(f"{arch_name}.block_count"),
        "hidden": field_value(f"{arch_name}.embedding_length"),
        "heads": field_value(f"{arch_name}.attention.head_count"),
        "kv_heads": field_value(f"{arch_name}.attention.head_count_kv"),
        "intermediate": field_value(f"{arch_name}.feed_forward_length"),
        "vocab": field_value("tokenizer.ggml.tokens"),
        "context": field_value(f"{arch_name}.context_length"),
    }
    for key in _NUMBERS:
        if arch[key] is not None and not isinstance(arch[key], int | float):
            raise ModelLoadError(
                f"{path} is not a valid GGUF file (its {key} is {type(arch[key]).__name__}, not a number); "
                "re-export or re-download it"
            )
    tensors = [
        (f"GGUF {t.tensor_type.name}", int(t.n_elements), int(t.n_elements), int(t.n_bytes)) for t in reader.tensors
    ]
    architecture = {k: v for k, v in arch.items() if v is not None}
    return Contents(tensors, path.stat().st_size, architecture)


EXPORTER = GGUFExporter()
