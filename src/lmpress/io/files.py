"""Files written whole or not at all, and checks on files before anything reads them.

Every directory lmpress writes is built in a hidden temporary directory beside the target and
renamed into place only when complete (`atomic_dir`); single files go through a temporary file and
a rename. A safetensors file is checked (header, length) before its tensors are read.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lmpress.errors import ModelLoadError, OutputError

META_FILE = "lmpress.json"  # what lmpress records beside the weights of a directory it wrote
FORMAT_VERSION = 1  # of that record; a newer one is refused with a hint to upgrade


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


def weight_bytes(path: Path) -> int:
    """Bytes on disk of a directory's weight files (or of one weight file, such as a GGUF); an ONNX
    directory's graph and its external data."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for pattern in ("*.safetensors", "model.onnx*") for f in path.glob(pattern))


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
