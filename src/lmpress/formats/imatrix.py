"""llama.cpp's importance-matrix files, read and written: the GGUF-based format and the legacy ``.dat``.

An importance matrix holds, for each weight matrix llama.cpp names (``blk.0.attn_q.weight``), the sum
over calibration tokens of each input column's squared activation and the number of tokens; the
quantizer weights each column's rounding error by the mean, Σx²/N.

GGUF form (llama.cpp's ``tools/imatrix``): ``general.type = imatrix``, ``imatrix.datasets`` (strings),
``imatrix.chunk_count`` and ``imatrix.chunk_size`` (uint32); per matrix the float32 tensors
``NAME.in_sum2`` (experts, in) and ``NAME.counts`` (experts, 1), names sorted. Legacy form, all
little-endian: int32 entry count; per entry int32 name length, the name, int32 ``ncall`` (chunks),
int32 value count, float32 values = Σx²/N · ncall; then int32 chunk count and, optionally, int32
length and the dataset name.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from lmpress.errors import LmpressError
from lmpress.formats.gguf_file import F32, U32, TensorSpec, write_gguf


class ImatrixError(LmpressError):
    """An importance-matrix file that cannot be read, or does not fit the model."""


@dataclass
class ImatrixEntry:
    """One weight matrix's statistics (``experts`` is 1 for a dense layer)."""

    in_sum2: np.ndarray  # (experts, in) float32: Σ x_j² over the tokens each expert saw
    counts: np.ndarray  # (experts,) float32: those tokens

    def mean_sq(self) -> np.ndarray:
        """Σx²/N per input column: (experts, in); an expert that saw no token gets ones."""
        n = self.counts[:, None]
        return np.where(n > 0, self.in_sum2 / np.where(n > 0, n, 1), 1.0).astype(np.float32)


@dataclass
class Imatrix:
    """A whole importance matrix: entries by llama.cpp tensor name, and where it came from."""

    entries: dict[str, ImatrixEntry]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 512


def write_imatrix(path: Path, im: Imatrix) -> int:
    """Write ``im`` to ``path``: the legacy format for a ``.dat`` name, else GGUF; returns bytes."""
    return _write_dat(path, im) if path.suffix == ".dat" else _write_gguf(path, im)


def _write_gguf(path: Path, im: Imatrix) -> int:
    meta: dict[str, Any] = {
        "general.type": "imatrix",
        "imatrix.datasets": list(im.datasets) or ["lmpress"],
        "imatrix.chunk_count": U32(im.chunk_count),
        "imatrix.chunk_size": U32(im.chunk_size),
    }
    specs = []
    for name in sorted(im.entries):
        e = im.entries[name]
        sums = np.ascontiguousarray(e.in_sum2, dtype="<f4")
        counts = np.ascontiguousarray(e.counts, dtype="<f4").reshape(-1, 1)
        specs.append(TensorSpec(f"{name}.in_sum2", sums.shape, F32, sums.nbytes, _given(sums)))
        specs.append(TensorSpec(f"{name}.counts", counts.shape, F32, counts.nbytes, _given(counts)))
    return write_gguf(path, meta, specs)


def _given(a: np.ndarray) -> Callable[[], np.ndarray]:
    return lambda: a


def _write_dat(path: Path, im: Imatrix) -> int:
    out = [struct.pack("<i", len(im.entries))]
    for name in sorted(im.entries):
        e = im.entries[name]
        ncall = max(1, -(-int(e.counts.max()) // im.chunk_size))  # ceiling, as llama.cpp stores it
        values = (e.mean_sq() * ncall).astype("<f4").reshape(-1)
        raw = name.encode()
        out.append(struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, values.size) + values.tobytes())
    dataset = (im.datasets[-1] if im.datasets else "").encode()
    out.append(struct.pack("<ii", im.chunk_count, len(dataset)) + dataset)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(b"".join(out))
    tmp.replace(path)
    return path.stat().st_size


def read_imatrix(path: Path, chunk_size: int = 512) -> Imatrix:
    """Read either format (told apart by the GGUF magic). A legacy file states no chunk size;
    ``chunk_size`` turns its chunk counts into token counts (llama.cpp's default context, 512)."""
    try:
        with open(path, "rb") as f:
            gguf = f.read(4) == b"GGUF"
            f.seek(0)
            return _read_gguf(f, path) if gguf else _read_dat(f, path, chunk_size)
    except OSError as e:
        raise ImatrixError(f"cannot read importance matrix {path}: {e.strerror}") from None
    except (struct.error, UnicodeDecodeError, ValueError) as e:
        raise ImatrixError(f"{path} is not a llama.cpp importance matrix (GGUF or .dat): {e}") from None


def _read_dat(f: BinaryIO, path: Path, chunk_size: int) -> Imatrix:
    def i32() -> int:
        return int(struct.unpack("<i", _exact(f, 4))[0])

    n = i32()
    if not 0 < n < 1 << 20:
        raise ValueError(f"{n} entries")
    entries = {}
    for _ in range(n):
        name = _exact(f, i32()).decode()
        ncall, nval = i32(), i32()
        values = np.frombuffer(_exact(f, 4 * nval), dtype="<f4").astype(np.float32)
        calls = max(ncall, 1)
        # Σx² = mean · N with N = ncall · chunk_size tokens, so mean = value / ncall is kept exactly
        entries[name] = ImatrixEntry((values * chunk_size).reshape(1, -1), np.array([calls * chunk_size], np.float32))
    im = Imatrix(entries, chunk_size=chunk_size)
    tail = f.read(4)
    if len(tail) == 4:
        im.chunk_count = int(struct.unpack("<i", tail)[0])
        size = f.read(4)
        if len(size) == 4:
            im.datasets = [_exact(f, int(struct.unpack("<i", size)[0])).decode()]
    return im


def _exact(f: BinaryIO, n: int) -> bytes:
    if n < 0:
        raise ValueError("negative length")
    b = f.read(n)
    if len(b) != n:
        raise ValueError("the file ends early")
    return b


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def _gguf_value(f: BinaryIO, vt: int) -> Any:
    if vt in _SCALARS:
        fmt = _SCALARS[vt]
        return struct.unpack(fmt, _exact(f, struct.calcsize(fmt)))[0]
    if vt == 8:
        return _exact(f, struct.unpack("<Q", _exact(f, 8))[0]).decode()
    if vt == 9:
        item, n = struct.unpack("<IQ", _exact(f, 12))
        return [_gguf_value(f, item) for _ in range(n)]
    raise ValueError(f"metadata type {vt}")


def _read_gguf(f: BinaryIO, path: Path) -> Imatrix:
    _, n_tensors, n_kv = struct.unpack("<IQQ", _exact(f, 24)[4:])
    meta = {}
    for _ in range(n_kv):
        key = _gguf_value(f, 8)
        meta[key] = _gguf_value(f, struct.unpack("<I", _exact(f, 4))[0])
    if meta.get("general.type") != "imatrix":
        raise ImatrixError(f"{path} is a GGUF file but not an importance matrix (general.type is not imatrix)")
    infos = []
    for _ in range(n_tensors):
        name = _gguf_value(f, 8)
        (n_dims,) = struct.unpack("<I", _exact(f, 4))
        dims = struct.unpack(f"<{n_dims}Q", _exact(f, 8 * n_dims))
        ggml_type, offset = struct.unpack("<IQ", _exact(f, 12))
        if ggml_type != F32:
            raise ImatrixError(f"{path}: tensor {name} is of ggml type {ggml_type}, not float32")
        infos.append((name, tuple(reversed(dims)), offset))
    align = int(meta.get("general.alignment", 32))
    start = f.tell() + (-f.tell() % align)
    tensors = {}
    for name, shape, offset in infos:
        f.seek(start + offset)
        n = int(np.prod(shape))
        tensors[name] = np.frombuffer(_exact(f, 4 * n), dtype="<f4").astype(np.float32).reshape(shape)
    return _entries(tensors, meta, path)


def _entries(tensors: dict[str, np.ndarray], meta: dict[str, Any], path: Path) -> Imatrix:
    entries = {}
    for key, sums in tensors.items():
        if not key.endswith(".in_sum2"):
            continue
        name = key.removesuffix(".in_sum2")
        counts = tensors.get(f"{name}.counts")
        if counts is None or counts.size != sums.reshape(-1, sums.shape[-1]).shape[0]:
            raise ImatrixError(f"{path}: {name} has no counts for its {sums.shape} sums")
        entries[name] = ImatrixEntry(sums.reshape(-1, sums.shape[-1]), counts.reshape(-1))
    datasets = meta.get("imatrix.datasets", [])
    return Imatrix(
        entries,
        [str(d) for d in datasets] if isinstance(datasets, list) else [],
        int(meta.get("imatrix.chunk_count", 0)),
        int(meta.get("imatrix.chunk_size", 512)),
    )
