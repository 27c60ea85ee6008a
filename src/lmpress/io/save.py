"""Saving: a self-describing directory (``config.json``, ``model.safetensors``, the tokenizer,
``lmpress.json``) written atomically; a streamed model's pieces are written unit by unit
(`lmpress.streaming.save_streamed_dir`) beside the same companions and record."""

from __future__ import annotations

import json
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmpress.arch import Adapter, has_spec
from lmpress.arch.widths import needs_structure_record
from lmpress.io.files import FORMAT_VERSION, META_FILE, atomic_dir, weight_bytes, write_json_atomic
from lmpress.io.load import no_transformers_bars
from lmpress.nn import CompressedLayer
from lmpress.progress import phase
from lmpress.version import __version__


def library_versions() -> dict[str, str]:
    import safetensors
    import transformers

    return {
        "lmpress": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }


def module_formats(model: nn.Module, described: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Per-module storage format: compressed layers describe themselves (or are in ``described``,
    recorded while a streamed model's unit was in memory), the rest are dense."""
    formats: dict[str, dict[str, Any]] = {}
    adapter = Adapter(model) if has_spec(model.config) else None
    named = dict(adapter.linears()) if adapter else {}
    if adapter:
        named.update(adapter.embeddings())
        named[adapter.head()[0]] = adapter.head()[1]
    for name, m in model.named_modules():
        if described and name in described:
            formats[name] = described[name]
        elif isinstance(m, CompressedLayer):
            formats[name] = m.lmpress_format()
        elif name in named:
            w = getattr(m, "weight", None)
            formats[name] = {"format": "dense", "dtype": str(w.dtype).removeprefix("torch.") if w is not None else None}
    return formats


def shared_modules(model: nn.Module) -> dict[str, str]:
    """Module names that are the same object as an earlier module holding tensors: alias -> first name.

    Weight sharing across blocks (`lmpress.share`) makes them; they are saved once and re-linked on load.
    """
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        owns = next(m.parameters(recurse=False), None) is not None or next(m.buffers(recurse=False), None) is not None
        if not owns:
            continue
        if id(m) in first:
            aliases[name] = first[id(m)]
        else:
            first[id(m)] = name
    return aliases


def save(
    model: nn.Module, tokenizer: Any, out: Path, meta: dict[str, Any] | None = None, overwrite: bool = False
) -> Path:
    """Write a self-describing model directory atomically; returns ``out``."""
    record = {
        "format_version": FORMAT_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "modules": module_formats(model),
        **(meta or {}),
        "versions": library_versions(),
    }
    structure = needs_structure_record(model)
    if structure is not None:  # per-block widths no Hugging Face config can express
        record["structure"] = structure
    aliases = shared_modules(model)
    state = None
    if aliases:  # each shared tensor once
        record["shared"] = aliases
        state = {k: v for k, v in model.state_dict().items() if not any(k.startswith(a + ".") for a in aliases)}
    with atomic_dir(out, overwrite) as tmp, phase(f"saving {out}"):
        with no_transformers_bars():
            model.save_pretrained(tmp, safe_serialization=True, state_dict=state)  # type: ignore[operator]
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        hide_from_plain_loaders(tmp, record["modules"])
        record["bytes_on_disk"] = weight_bytes(tmp)
        write_json_atomic(tmp / META_FILE, record)
    return out


PACKED_PREFIX = "lmpress-packed"  # the weight files of a directory only lmpress can run


def hide_from_plain_loaders(directory: Path, formats: dict[str, dict[str, Any]]) -> None:
    """Name the weight files of a directory with packed layers so that plain
    ``AutoModelForCausalLM.from_pretrained`` (and vLLM) refuse it ("no file named model.safetensors")
    instead of "loading" it with random weights in place of the packed ones: ``model.safetensors``
    becomes ``lmpress-packed.safetensors`` (shards and their index alike). lmpress reads every
    ``*.safetensors`` of the directory; ``lmpress export DIR --to compressed-tensors`` writes the
    checkpoint transformers and vLLM load. A directory of dense layers keeps its names."""
    if all(f.get("format") == "dense" for f in formats.values()):
        return
    renamed = {}
    for f in sorted(directory.glob("model*.safetensors")):
        new = PACKED_PREFIX + f.name.removeprefix("model")
        f.rename(directory / new)
        renamed[f.name] = new
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text(encoding="utf-8"))
        data["weight_map"] = {k: renamed.get(v, v) for k, v in data.get("weight_map", {}).items()}
        write_json_atomic(directory / f"{PACKED_PREFIX}.safetensors.index.json", data)
        index.unlink()


def update_meta(out: Path, **fields: Any) -> None:
    """Put what was measured after saving (the metrics on the saved bytes) into ``out``'s
    ``lmpress.json``, atomically."""
    f = out / META_FILE
    record = json.loads(f.read_text(encoding="utf-8"))
    record.update(fields)
    write_json_atomic(f, record)


def save_companions(model: nn.Module, tokenizer: Any, out: Path) -> None:
    """What goes beside any model's weights: its config, generation config and tokenizer."""
    model.config.save_pretrained(out)  # type: ignore[union-attr,operator]
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
