"""Save and load compressed model directories, atomically.

A saved directory holds ``config.json`` (the Hugging Face config), ``model.safetensors``, the
tokenizer files and ``lmpress.json``: format version, per-module format, the recipe, metrics against
the original, the data manifest and library versions. Everything is written to a hidden temporary
directory beside the target and renamed into place only when complete, so an interrupted save never
leaves a directory that looks finished.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmpress.errors import ModelLoadError, OutputError
from lmpress.models.adapters import ARCHS, Adapter
from lmpress.models.loading import META_FILE, LoadedModel, _from_pretrained, no_transformers_bars
from lmpress.nn import LAYER_FORMATS

FORMAT_VERSION = 1


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Fail before any work if ``out`` cannot be written: a file, a non-empty directory, the current
    directory or one of its parents, or a place where no directory can be created."""
    resolved = out.resolve()
    if resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents:
        raise OutputError(f"output {out} is the current directory or above it; choose a new directory")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a directory; choose another --output")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"output directory {out} exists and is not empty; choose another or pass --overwrite")
    parent = resolved.parent
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    try:  # a real probe: permissions alone do not tell (read-only mounts, /proc, quotas)
        Path(tempfile.mkdtemp(prefix=".lmpress-probe-", dir=existing)).rmdir()
    except OSError:
        raise OutputError(
            f"cannot create {out}: {existing} is not a writable directory; choose another --output"
        ) from None


@contextmanager
def atomic_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``out``, on any failure it is removed."""
    check_output_dir(out, overwrite)
    out = out.resolve()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise OutputError(f"cannot create {out}: {e.strerror}; choose another --output") from None
    try:
        yield tmp
        _fsync_tree(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old / out.name, out)  # put the previous output back
                raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_tree(root: Path) -> None:
    """Flush every file and the directory itself, so a rename never publishes unwritten data."""
    for f in root.rglob("*"):
        if f.is_file():
            with f.open("rb+") as fh:
                os.fsync(fh.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: object) -> None:
    """Write JSON to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write text to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def library_versions() -> dict[str, str]:
    import safetensors
    import transformers

    from lmpress import __version__

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
    adapter = Adapter(model) if getattr(model.config, "model_type", None) in ARCHS else None
    named = dict(adapter.linears()) if adapter else {}
    if adapter:
        named.update(adapter.embeddings())
        named[adapter.head()[0]] = adapter.head()[1]
    for name, m in model.named_modules():
        describe = getattr(m, "lmpress_format", None)
        if described and name in described:
            formats[name] = described[name]
        elif callable(describe):
            formats[name] = describe()
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
    from lmpress.prune.shapes import needs_structure_record

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
    with atomic_dir(out, overwrite) as tmp:
        with no_transformers_bars():
            model.save_pretrained(tmp, safe_serialization=True, state_dict=state)  # type: ignore[operator]
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        record["bytes_on_disk"] = weight_bytes(tmp)
        write_json_atomic(tmp / META_FILE, record)
    return out


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


def save_streamed_dir(
    model: nn.Module, tokenizer: Any, out: Path, meta: dict[str, Any] | None = None, overwrite: bool = False
) -> Path:
    """`save` for a streamed model (`lmpress.streaming`): its shards are written unit by unit from
    the checkpoint and the stages' spills, never the whole state dict at once."""
    from lmpress.streaming import save_streamed

    with atomic_dir(out, overwrite) as tmp:
        formats = save_streamed(model, tmp)
        save_companions(model, tokenizer, tmp)
        record = {
            "format_version": FORMAT_VERSION,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "modules": formats,
            **(meta or {}),
            "versions": library_versions(),
            "bytes_on_disk": weight_bytes(tmp),
        }
        write_json_atomic(tmp / META_FILE, record)
    return out


def load_compressed(
    path: Path, device: torch.device, dtype: torch.dtype | str = "auto", trust_remote_code: bool = False
) -> LoadedModel:
    """Restore a directory written by `save`, with its compressed layers."""
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path / META_FILE} is not valid JSON ({e}); re-run the compression") from None
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelLoadError(f"{path} has lmpress format {version!r}; this lmpress reads up to {FORMAT_VERSION}")
    modules: dict[str, dict[str, Any]] = meta.get("modules", {})
    unknown = {str(m.get("format")) for m in modules.values()} - {"dense", *LAYER_FORMATS}
    if unknown:
        raise ModelLoadError(f"{path} uses module formats {sorted(unknown)} that this lmpress cannot load; upgrade")
    structure = meta.get("structure")
    shared = meta.get("shared") or {}
    if structure is None and not shared and all(m.get("format") == "dense" for m in modules.values()):
        model = _from_pretrained(path, dtype, trust_remote_code)
    else:
        try:
            model = _restore(path, modules, dtype, trust_remote_code, structure, shared)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            msg = (str(e) or type(e).__name__).splitlines()[0]
            raise ModelLoadError(
                f"{path}: lmpress.json and the weights do not fit ({msg}); re-run compression"
            ) from None
    return LoadedModel(model, None, str(path), path, meta)


def _restore(
    path: Path,
    modules: dict[str, dict[str, Any]],
    dtype: torch.dtype | str,
    trust_remote_code: bool,
    structure: list[dict[str, int]] | None = None,
    shared: dict[str, str] | None = None,
) -> nn.Module:
    """Build the architecture from its config, swap in the saved layer types, load the tensors."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from lmpress.quant.base import replace_module

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    try:  # skip random initialization: every tensor is overwritten by the saved one
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights  # type: ignore[attr-defined,no-redef]
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()  # so that tied keys are recognized below
    if structure is not None:
        from lmpress.prune.shapes import apply_structure

        apply_structure(model, structure)
    for name, fmt in modules.items():
        if fmt.get("format") in LAYER_FORMATS:
            replace_module(model, name, LAYER_FORMATS[fmt["format"]].from_format(fmt, dtype))  # type: ignore[arg-type]
    for alias, source in (shared or {}).items():  # modules saved once, used by several blocks
        parent, _, child = alias.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, model.get_submodule(source))
    state: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(_checkpoint_keys_to_model(model, state), strict=False)
    tied = set(_tied_keys(model))
    if unexpected or set(missing) - tied:
        bad = sorted(unexpected or set(missing) - tied)[0]
        raise ModelLoadError(f"{path}: weights do not match lmpress.json (first mismatch: {bad}); re-run compression")
    model.tie_weights()
    return model.eval()


def _checkpoint_keys_to_model(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Undo the key renamings ``save_pretrained`` applies for checkpoint compatibility (GPT-NeoX
    saves ``lm_head`` as ``embed_out``), as ``from_pretrained`` would."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # transformers < 5 saves module names unchanged
        return state
    transforms = get_model_conversion_mapping(model)  # type: ignore[arg-type]
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    own = set(model.state_dict())
    if not renamings or set(state) <= own:
        return state
    return {(k if k in own else rename_source_key(k, renamings, [])[0]): v for k, v in state.items()}


def _tied_keys(model: nn.Module) -> list[str]:
    """State-dict keys that save_pretrained leaves out because they share a tensor with another."""
    seen: dict[int, str] = {}
    tied = []
    for k, v in model.state_dict(keep_vars=True).items():
        if id(v) in seen:
            tied.append(k)
        seen.setdefault(id(v), k)
    return tied


def weight_bytes(path: Path) -> int:
    """Bytes on disk of a directory's weight files (or of one weight file, such as a GGUF); an ONNX
    directory's graph and its external data."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for pattern in ("*.safetensors", "model.onnx*") for f in path.glob(pattern))
