"""A streaming writer of GGUF files (version 3), the container llama.cpp reads.

Layout: the magic ``GGUF``, the version, the tensor and metadata counts; metadata as typed key/value
pairs; one info record per tensor (name, dimensions innermost first, ggml type, offset into the
data section); padding to the alignment; then the tensors' bytes, each at an aligned offset. All
integers are little-endian.

Tensors are declared with their sizes first and their bytes produced one at a time, so writing a
file holds one tensor in memory, not the model. The file goes to a temporary name beside the
target and is renamed into place only when complete.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

ALIGNMENT = 32
# metadata value types
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
# ggml types of dense tensors (block types are in lmpress.formats.ggml)
F32, F16, BF16 = 0, 1, 30


@dataclass(frozen=True)
class U32:
    """A metadata integer written as uint32 (plain ints are written as the type their key needs)."""

    value: int


@dataclass(frozen=True)
class TensorSpec:
    """One tensor: its name, shape as PyTorch spells it (outermost first), ggml type and byte size;
    ``data`` returns its bytes (called once, when the writer reaches it)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    nbytes: int
    data: Callable[[], np.ndarray]


def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _value(v: Any) -> tuple[int, bytes]:
    """(type, encoded value) of a metadata value."""
    if isinstance(v, bool):
        return BOOL, struct.pack("<?", v)
    if isinstance(v, U32):
        return UINT32, struct.pack("<I", v.value)
    if isinstance(v, int):
        return (INT32, struct.pack("<i", v)) if -(2**31) <= v < 2**31 else (INT64, struct.pack("<q", v))
    if isinstance(v, float):
        return FLOAT32, struct.pack("<f", v)
    if isinstance(v, str):
        return STRING, _string(v)
    if isinstance(v, list | tuple):
        return ARRAY, _array(list(v))
    raise TypeError(f"cannot write {type(v).__name__} as GGUF metadata")


def _array(items: list[Any]) -> bytes:
    if not items:
        return struct.pack("<IQ", INT32, 0)
    if all(isinstance(x, str) for x in items):
        return struct.pack("<IQ", STRING, len(items)) + b"".join(_string(x) for x in items)
    if all(isinstance(x, float) for x in items):
        return struct.pack("<IQ", FLOAT32, len(items)) + np.asarray(items, dtype="<f4").tobytes()
    if all(isinstance(x, int) and not isinstance(x, bool) for x in items):
        return struct.pack("<IQ", INT32, len(items)) + np.asarray(items, dtype="<i4").tobytes()
    raise TypeError("GGUF arrays hold one type: all strings, all floats or all integers")


def _pad(n: int) -> int:
    return -n % ALIGNMENT


def write_gguf(path: Path, metadata: dict[str, Any], tensors: Iterable[TensorSpec]) -> int:
    """Write a GGUF file atomically; returns its size in bytes."""
    specs = list(tensors)
    meta = {"general.alignment": U32(ALIGNMENT), **metadata}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(b"GGUF" + struct.pack("<IQQ", 3, len(specs), len(meta)))
            for key, v in meta.items():
                vt, enc = _value(v)
                f.write(_string(key) + struct.pack("<I", vt) + enc)
            offset = 0
            for s in specs:
                dims = tuple(reversed(s.shape))  # ggml: innermost dimension first
                f.write(_string(s.name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims))
                f.write(struct.pack("<IQ", s.ggml_type, offset))
                offset += s.nbytes + _pad(s.nbytes)
            f.write(b"\0" * _pad(f.tell()))
            for s in specs:
                _write_tensor(f, s)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path.stat().st_size


def _write_tensor(f: BinaryIO, s: TensorSpec) -> None:
    data = np.ascontiguousarray(s.data())
    if data.nbytes != s.nbytes:
        raise ValueError(f"tensor {s.name}: {data.nbytes} bytes, declared {s.nbytes}")
    f.write(memoryview(data.reshape(-1).view(np.uint8)))  # type: ignore[arg-type]  # no copy
    f.write(b"\0" * _pad(s.nbytes))
