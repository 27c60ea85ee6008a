"""Pickle checkpoints read as opcodes, never unpickled: do they hold only tensors?

A pickle is a program; every name it can call is named by a ``GLOBAL``/``STACK_GLOBAL``/``INST``
opcode. `check_pickle` walks the opcodes of a PyTorch checkpoint (``pickletools.genops``, which
parses without running anything), in either of PyTorch's layouts: the zip archive of
``torch.save`` (the pickle is ``ARCHIVE/data.pkl``, read from the archive as a stream) or the
legacy sequence of raw pickles. It allows only the names a plain state dict of tensors needs
(``collections.OrderedDict``, the tensor and parameter rebuild functions, storage classes, dtypes,
``torch.Size``, ``torch.device``, ``builtins.set`` ...), a subset of what PyTorch's
``weights_only=True`` loader allows, and refuses any other: ``FILE holds code, not only tensors;
refusing (it names os.system)``. The check runs before the loader sees the file, so the refusal
is one line instead of the loader's traceback (which suggests ``weights_only=False``).
"""

from __future__ import annotations

import pickletools
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, cast

from lmpress.errors import ModelLoadError

__all__ = ["ALLOWED_GLOBALS", "check_pickle", "pickle_globals"]

ALLOWED_GLOBALS = frozenset(
    {
        "collections.OrderedDict",
        "builtins.set",
        "builtins.frozenset",
        "builtins.bytearray",
        "_codecs.encode",  # how protocol 2 writes bytes
        "torch.Size",
        "torch.device",
        "torch._utils._rebuild_tensor",
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_tensor_v3",
        "torch._utils._rebuild_parameter",
        "torch._utils._rebuild_parameter_with_state",
        "torch.storage.UntypedStorage",
        "torch.storage.TypedStorage",
        "torch.serialization._get_layout",
    }
)
# torch.FloatStorage, torch.cuda.HalfStorage, ...; torch.float32, torch.bfloat16, torch.float8_e4m3fn, ...
_ALLOWED_PATTERNS = (
    re.compile(r"torch\.(cuda\.)?[A-Z][A-Za-z0-9]*Storage"),
    re.compile(r"torch\.(u?int[0-9]+|float[0-9]+(_[a-z0-9]+)?|bfloat16|half|double|bool|complex[0-9]+|c?float|long)"),
)
MAX_PKL_BYTES = 1 << 30
MAX_LEGACY_PICKLES = 5  # torch's legacy layout: magic, protocol, sys info, the object, storage keys; then raw bytes
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
_MEMO_PUT = {"PUT", "BINPUT", "LONG_BINPUT"}
_MEMO_GET = {"GET", "BINGET", "LONG_BINGET"}


class _UnsafeError(Exception):
    """A name the pickle would call that is not in the allowlist."""


class _UnreadableError(Exception):
    """Bytes that are not a pickle."""


def allowed(name: str) -> bool:
    return name in ALLOWED_GLOBALS or any(p.fullmatch(name) for p in _ALLOWED_PATTERNS)


def pickle_globals(stream: IO[bytes]) -> Iterator[str]:
    """Every ``module.name`` one pickle in ``stream`` would look up, in order, without unpickling.

    A ``STACK_GLOBAL`` whose two names are not plain strings pushed just before it (or fetched from
    the memo) yields ``<computed name>``; extension-registry codes (``EXT1``...) yield ``<extension N>``.
    """
    memo: dict[int, Any] = {}
    recent: list[Any] = []  # the values of the last pushes: a string, or None for anything else
    memo_next = 0
    try:
        for op, opened, _pos in pickletools.genops(stream):
            name, arg = op.name, cast(Any, opened)
            if name in ("GLOBAL", "INST"):
                module, _, attr = str(arg).partition(" ")
                yield f"{module}.{attr}"
                recent.append(None)
            elif name == "STACK_GLOBAL":
                if len(recent) >= 2 and isinstance(recent[-2], str) and isinstance(recent[-1], str):
                    yield f"{recent[-2]}.{recent[-1]}"
                else:
                    yield "<computed name>"
                recent.append(None)
            elif name.startswith("EXT"):
                yield f"<extension {arg}>"
            elif name in _STRING_OPS:
                recent.append(arg.decode("latin-1") if isinstance(arg, bytes) else str(arg))
            elif name in _MEMO_PUT:
                memo[int(arg)] = recent[-1] if recent else None
            elif name == "MEMOIZE":
                memo[memo_next] = recent[-1] if recent else None
                memo_next += 1
            elif name in _MEMO_GET:
                recent.append(memo.get(int(arg)))
            else:
                recent.append(None)
            if name in _MEMO_PUT:
                memo_next = max(memo_next, int(arg) + 1)
            del recent[:-2]  # only the last two pushes matter
    except (ValueError, TypeError, KeyError, IndexError, EOFError, UnicodeDecodeError, OverflowError) as e:
        raise _UnreadableError((str(e) or type(e).__name__).splitlines()[0][:80]) from None


def _check_stream(stream: IO[bytes]) -> None:
    for name in pickle_globals(stream):
        if not allowed(name):
            raise _UnsafeError(name[:80])


def check_pickle(file: Path) -> None:
    """Raise `ModelLoadError` unless the PyTorch checkpoint ``file`` holds only tensors (in the sense
    of the module docstring); nothing in it is run."""
    try:
        if zipfile.is_zipfile(file):
            with zipfile.ZipFile(file) as archive:
                pickles = [i for i in archive.infolist() if i.filename.endswith(".pkl")]
                if not pickles:
                    raise _UnreadableError("a zip archive with no data.pkl")
                for member in pickles:
                    if member.file_size > MAX_PKL_BYTES:  # a state dict's pickle is small: no tensor data in it
                        raise _UnreadableError(f"{member.filename[:60]} claims {member.file_size:,} bytes")
                    with archive.open(member) as stream:
                        _check_stream(stream)
        else:
            size = file.stat().st_size
            with file.open("rb") as stream:
                for _ in range(MAX_LEGACY_PICKLES):
                    _check_stream(stream)
                    if stream.tell() >= size:
                        break
    except _UnsafeError as e:
        raise ModelLoadError(f"{file} holds code, not only tensors; refusing (it names {e})") from None
    except _UnreadableError as e:
        raise ModelLoadError(
            f"{file} is not a PyTorch checkpoint lmpress can check ({e}); convert it to safetensors"
        ) from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError) as e:
        raise ModelLoadError(f"{file} is a damaged zip archive ({type(e).__name__}); re-save it") from None
    except OSError as e:
        raise ModelLoadError(f"cannot read {file} ({e.strerror or type(e).__name__})") from None
