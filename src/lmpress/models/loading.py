"""Safe loading of causal LMs: built-in names and local Hugging Face directories.

Weights load from safetensors only; a pickle checkpoint (``*.bin``, ``*.pt``, ``*.pth``) is
refused unless ``allow_pickle`` is set, and even then it is read with ``weights_only=True``.
``trust_remote_code`` is off unless asked for. Every check runs before any weights are read, so bad
input fails fast with one line naming the problem and the fix.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmpress.errors import ModelLoadError
from lmpress.models.adapters import ARCHS, unknown_architecture

BUILTIN_DIR = Path(__file__).parent / "builtin"
BUILTINS = {"builtin": "reference", "reference": "reference"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
META_FILE = "lmpress.json"


@dataclass
class LoadedModel:
    """A model with its tokenizer and where it came from."""

    model: nn.Module
    tokenizer: Any
    source: str
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)  # lmpress.json of a compressed directory


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ModelLoadError(f"unknown device {device!r}; use auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} asked for but CUDA is not available; use --device cpu or auto")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ModelLoadError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ModelLoadError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def resolve_dtype(dtype: str) -> torch.dtype | str:
    if dtype == "auto":
        return "auto"
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use auto, " + ", ".join(DTYPES))
    return DTYPES[dtype]


def resolve_path(source: str | Path) -> Path:
    """A model directory from a built-in name or a path; checks it looks like a model."""
    name = str(source)
    if name in BUILTINS:
        path = BUILTIN_DIR / BUILTINS[name]
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"the built-in model is missing from this installation ({path}); reinstall lmpress")
        return path
    path = Path(source).expanduser()
    if not path.exists():
        if "/" not in name and "\\" not in name:
            raise ModelLoadError(
                f"{name!r} is neither a model directory nor a built-in model; built-in names: " + ", ".join(BUILTINS)
            )
        raise ModelLoadError(f"model path {name!r} does not exist; give a Hugging Face model directory or 'builtin'")
    if not path.is_dir():
        raise ModelLoadError(f"model path {name!r} is not a directory; give the directory holding config.json")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{name!r} has no config.json; give a Hugging Face model directory")
    return path


def read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(
            f"{path / 'config.json'} is not valid JSON ({e}); restore the model's config.json"
        ) from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path / 'config.json'} is not a JSON object; restore the model's config.json")
    return config


def check_safetensors(file: Path) -> None:
    """Raise if ``file`` is not a complete safetensors file (bad header, truncated data)."""
    size = file.stat().st_size
    try:
        with file.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise ModelLoadError(f"{file} is not a valid safetensors file; re-save or re-download it") from None
    if 8 + n + end != size:
        raise ModelLoadError(
            f"{file} is truncated or corrupt ({size} bytes, header says {8 + n + end}); re-save or re-download it"
        )


def check_weights(path: Path, allow_pickle: bool) -> None:
    """Find the weight files; refuse pickles unless allowed; check every safetensors file."""
    safetensors = sorted(path.glob("*.safetensors"))
    if safetensors:
        for f in safetensors:
            check_safetensors(f)
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles and not allow_pickle:
        raise ModelLoadError(
            f"{path} holds only pickle weights ({pickles[0]}), which can run code when loaded; "
            "convert them to safetensors or pass --allow-pickle (loads with weights_only=True)"
        )
    if not pickles:
        raise ModelLoadError(f"{path} has no weights (*.safetensors); give a complete model directory")


def load_tokenizer(path: Path, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load the tokenizer in {path}: {e}".splitlines()[0]) from None


def load_model(
    source: str | Path = "builtin",
    *,
    device: str = "auto",
    dtype: str = "auto",
    tokenizer: str | Path | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a causal LM from a built-in name or a local directory, safely.

    ``dtype`` "auto" keeps the checkpoint's dtype. A directory written by lmpress (with
    ``lmpress.json``) is restored with its compressed layers by `lmpress.io.load`. A ``.gguf`` file
    runs in llama.cpp (`lmpress.export.llama_runtime`), with llama.cpp's own tokenizer; a directory
    with ``model.onnx`` in ONNX Runtime (`lmpress.export.onnx_runtime`).
    """
    if str(source).lower().endswith(".gguf"):
        from lmpress.export.llama_runtime import load_gguf

        gpath = Path(source).expanduser()
        model, tok = load_gguf(gpath)
        return LoadedModel(model.eval(), tok, str(source), gpath)
    from lmpress.export.onnx_runtime import is_onnx_dir

    if is_onnx_dir(source):  # a graph written by lmpress export --to onnx, run by ONNX Runtime
        from lmpress.export.onnx_runtime import load_onnx

        opath = Path(source).expanduser()
        tok_path = resolve_path(tokenizer) if tokenizer is not None else opath
        return LoadedModel(load_onnx(opath).eval(), load_tokenizer(tok_path), str(source), opath)
    path = resolve_path(source)
    config = read_config(path)
    model_type = config.get("model_type")
    if model_type not in ARCHS and not trust_remote_code:
        raise unknown_architecture(model_type)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    check_weights(path, allow_pickle)
    if (path / META_FILE).is_file():
        from lmpress.io import load_compressed

        loaded = load_compressed(path, device=torch_device, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    else:
        loaded = LoadedModel(_from_pretrained(path, torch_dtype, trust_remote_code), None, str(source), path)
    loaded.model.to(torch_device).eval()
    loaded.source = str(source)
    tok_path = resolve_path(tokenizer) if tokenizer is not None else path
    loaded.tokenizer = load_tokenizer(tok_path, trust_remote_code)
    return loaded


@contextmanager
def no_transformers_bars() -> Iterator[None]:
    """transformers' own "Loading weights" / "Writing model shards" bars stay off while lmpress
    loads or saves (its bars and log lines are the ones that count the work)."""
    from transformers.utils import logging as transformers_logging

    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


def _from_pretrained(path: Path, dtype: torch.dtype | str, trust_remote_code: bool) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        with no_transformers_bars():
            return AutoModelForCausalLM.from_pretrained(  # type: ignore[no-any-return]
                path, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=None, low_cpu_mem_usage=True
            )
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
        raise ModelLoadError(
            f"cannot load the model in {path}: {(str(e) or type(e).__name__).splitlines()[0]}"
        ) from None
