"""Files written whole or not at all, and checks on files before anything reads them.

Every directory lmpress writes is built in a hidden temporary directory beside the target and
renamed into place only when complete (`atomic_dir`); single files go through a temporary file and
a rename. A safetensors file is checked (header, length) before its tensors are read.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import socket
import struct
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from lmpress.errors import ModelLoadError, OutputError

META_FILE = "lmpress.json"  # what lmpress records beside the weights of a directory it wrote
FORMAT_VERSION = 1  # of that record; a newer one is refused with a hint to upgrade


def check_not_input(out: Path, source: Path | None) -> None:
    """Refuse an output that is the input model, holds it, or lies inside it (symlinks resolved):
    writing there would replace or change the model being read, and ``--overwrite`` would delete it."""
    if source is None:
        return
    o, s = out.resolve(), source.resolve()
    if o == s:
        raise OutputError(f"output {out} is the input model {source}; write the result to a new directory")
    if s in o.parents:
        raise OutputError(f"output {out} lies inside the input model {source}; write the result outside it")
    if o in s.parents:
        raise OutputError(f"output {out} holds the input model {source}; writing it would delete the model")


def check_output_dir(out: Path, overwrite: bool, source: Path | None = None) -> None:
    """Fail before any work if ``out`` cannot be written: the input model (``source``) or a place
    inside or around it, a file, a non-empty directory, the current directory or one of its parents,
    or a place where no directory can be created."""
    check_not_input(out, source)
    resolved = out.resolve()
    if resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents:
        raise OutputError(f"output {out} is the current directory or above it; choose a new directory")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a directory; choose another --output")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(
            f"output directory {out} exists and is not empty; choose another or pass --overwrite "
            "(overwrite=True in Python)"
        )
    parent = resolved.parent
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    if not existing.is_dir():
        raise OutputError(f"cannot create {out}: {existing} is a file, not a directory; choose another --output")
    try:  # a real probe: permissions alone do not tell (read-only mounts, /proc, quotas)
        Path(tempfile.mkdtemp(prefix=".lmpress-probe-", dir=existing)).rmdir()
    except OSError:
        raise OutputError(
            f"cannot create {out}: {existing} is not a writable directory; choose another --output"
        ) from None


# Hidden work places beside an output: `.NAME.tmp-*` (a directory being written), `.NAME.old-*` (the
# replaced one), `.NAME.stream-*` (a streamed run's spills). Each holds a lock file with its process.
_WORK_KINDS = ("tmp", "old", "stream")
LOCK_FILE = ".lmpress-lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _stale(place: Path) -> bool:
    """A work place no live process holds: its lock names a dead process on this host, or it has
    no lock and is older than a minute (a lock is written the moment a place is made)."""
    lock = place / LOCK_FILE if place.is_dir() else None
    try:
        if lock is not None and lock.is_file():
            pid_text, _, host = lock.read_text(encoding="utf-8").partition(" ")
            if host.strip() != socket.gethostname():
                return False  # another machine's run on a shared disk: not ours to judge
            return not _alive(int(pid_text))
        m = re.search(r"-(\d+)$", place.name)  # a file named after its process (a GGUF being written)
        if place.is_file() and m:
            return not _alive(int(m.group(1)))
        return time.time() - place.lstat().st_mtime > 60
    except (OSError, ValueError):
        return False


def clean_stale(out: Path) -> list[Path]:
    """Remove the hidden work places an interrupted run of the same output left beside it (a killed
    process cannot clean up after itself); returns what was removed."""
    out = out.resolve()
    if not out.parent.is_dir():
        return []
    removed = []
    for kind in _WORK_KINDS:
        for place in out.parent.glob(f".{glob.escape(out.name)}.{kind}-*"):
            if _stale(place):
                if place.is_dir() and not place.is_symlink():
                    shutil.rmtree(place, ignore_errors=True)
                else:
                    place.unlink(missing_ok=True)
                removed.append(place)
    return removed


def work_place(out: Path, kind: str) -> Path:
    """A new hidden directory ``.NAME.KIND-*`` beside ``out``, locked by this process."""
    out = out.resolve()
    place = Path(tempfile.mkdtemp(prefix=f".{out.name}.{kind}-", dir=out.parent))
    (place / LOCK_FILE).write_text(f"{os.getpid()} {socket.gethostname()}", encoding="utf-8")
    return place


@contextmanager
def created_parents(out: Path) -> Iterator[None]:
    """On failure, remove the parent directories of ``out`` that did not exist when this began
    (and are empty): a failed run leaves the disk as it found it."""
    resolved = out.resolve()
    missing = [p for p in (resolved, *resolved.parents) if not p.exists()]
    try:
        yield
    except BaseException:
        for p in missing:  # deepest first
            with suppress(OSError):
                p.rmdir()
        raise


@contextmanager
def atomic_dir(out: Path, overwrite: bool = False, source: Path | None = None) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``out``, on any failure it is removed."""
    check_output_dir(out, overwrite, source)
    out = out.resolve()
    with created_parents(out):
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            clean_stale(out)
            tmp = work_place(out, "tmp")
        except OSError as e:
            raise OutputError(f"cannot create {out}: {e.strerror}; choose another --output") from None
        try:
            yield tmp
            (tmp / LOCK_FILE).unlink(missing_ok=True)
            _fsync_tree(tmp)
            if out.exists():
                # the old one moves aside within its own directory (a directory moved to another
                # parent needs write permission on itself; a rename in place does not)
                old = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                os.replace(out, old)
                try:
                    os.replace(tmp, out)
                except BaseException:
                    os.replace(old, out)  # put the previous output back
                    raise
                finally:
                    if old.exists():
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
