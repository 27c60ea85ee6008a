"""A bounded check of a GGUF file's header, before the gguf package or llama.cpp reads it.

Both trust the header: a tensor count of 2**60 makes them allocate without end, a string length
past the end of the file ends in an ``IndexError``, an unknown value type in a crash. `check_gguf`
walks the header as the format defines it (see `lmpress.formats.gguf_file`): the magic, version 2
or 3, the tensor and metadata counts (each bounded by what the file's size can hold), every key and
value (value types 0..12, string and array lengths within the file), every tensor info (at most 4
dimensions, a data offset inside the data section, the tensor's bytes within the file) and refuses
the first thing that is wrong with one `ModelLoadError` line. The header is read through a
read-only memory map: only the pages it touches are read, never the whole file.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

from lmpress.errors import ModelLoadError

__all__ = ["check_gguf"]

MAGIC = b"GGUF"
VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 4  # arrays of arrays nest; no writer nests deeper
DEFAULT_ALIGNMENT = 32
# metadata value type -> bytes of a fixed-size value (STRING = 8 and ARRAY = 9 have their own layout)
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY, UINT32 = 8, 9, 4
# the fewest bytes one metadata pair / one tensor info can take: key length, type, a one-byte value;
# name length, dimension count, type, offset
_MIN_KV = 8 + 4 + 1
_MIN_TENSOR = 8 + 4 + 4 + 8
MAX_GGML_TYPE = 64  # GGML_TYPE_COUNT is 40 in 2025: a type past this is damage, not a newer llama.cpp
# ggml tensor type -> (elements per block, bytes per block), for the types llama.cpp writes
GGML_SIZES = {
    0: (1, 4),  # F32
    1: (1, 2),  # F16
    2: (32, 18),  # Q4_0
    3: (32, 20),  # Q4_1
    6: (32, 22),  # Q5_0
    7: (32, 24),  # Q5_1
    8: (32, 34),  # Q8_0
    9: (32, 36),  # Q8_1
    10: (256, 84),  # Q2_K
    11: (256, 110),  # Q3_K
    12: (256, 144),  # Q4_K
    13: (256, 176),  # Q5_K
    14: (256, 210),  # Q6_K
    15: (256, 292),  # Q8_K
    16: (256, 66),  # IQ2_XXS
    17: (256, 74),  # IQ2_XS
    18: (256, 98),  # IQ3_XXS
    19: (256, 50),  # IQ1_S
    20: (32, 18),  # IQ4_NL
    21: (256, 110),  # IQ3_S
    22: (256, 82),  # IQ2_S
    23: (256, 136),  # IQ4_XS
    24: (1, 1),  # I8
    25: (1, 2),  # I16
    26: (1, 4),  # I32
    27: (1, 8),  # I64
    28: (1, 8),  # F64
    29: (256, 56),  # IQ1_M
    30: (1, 2),  # BF16
    34: (256, 54),  # TQ1_0
    35: (256, 66),  # TQ2_0
    39: (32, 17),  # MXFP4
}


class _BadHeaderError(Exception):
    """What is wrong with the header (becomes the parenthesis of the one-line error)."""


class _NotGGUFError(_BadHeaderError):
    """Not a damaged GGUF file: no GGUF file at all."""


class _Cursor:
    """Little-endian reads from a buffer that never go past its end."""

    def __init__(self, buf: mmap.mmap, size: int) -> None:
        self.buf = buf
        self.size = size
        self.pos = 0

    @property
    def left(self) -> int:
        return self.size - self.pos

    def take(self, fmt: str, what: str) -> int:
        n = struct.calcsize(fmt)
        if n > self.left:
            raise _BadHeaderError(f"{what} at byte {self.pos} runs past the end of the file")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return int(value)

    def skip(self, n: int, what: str) -> None:
        if n > self.left:
            raise _BadHeaderError(f"{what} at byte {self.pos} ({n:,} bytes) runs past the end of the file")
        self.pos += n

    def string(self, what: str) -> bytes:
        n = self.take("<Q", f"the length of {what}")
        start = self.pos
        self.skip(n, what)
        return bytes(self.buf[start : min(self.pos, start + 200)])  # the first bytes: keys and names are short

    def value(self, vtype: int, what: str, depth: int = 0) -> int | bytes | None:
        """Read one value of ``vtype``; returns it for a UINT32 or a string (what the checks use)."""
        if vtype == STRING:
            return self.string(what)
        if vtype == UINT32:
            return self.take("<I", what)
        if vtype in _FIXED:
            self.skip(_FIXED[vtype], what)
            return None
        if vtype != ARRAY:
            raise _BadHeaderError(f"{what} has value type {vtype}, not one of 0..12")
        if depth >= MAX_ARRAY_DEPTH:
            raise _BadHeaderError(f"{what} nests arrays deeper than {MAX_ARRAY_DEPTH}")
        etype = self.take("<I", f"the element type of {what}")
        count = self.take("<Q", f"the length of {what}")
        smallest = {STRING: 8, ARRAY: 12}.get(etype, _FIXED.get(etype, 1))
        if count > self.left // smallest:
            raise _BadHeaderError(f"{what} claims {count:,} elements, more than the {self.left:,} bytes left can hold")
        if etype in _FIXED:
            self.skip(count * _FIXED[etype], what)
        else:
            for _ in range(count):
                self.value(etype, f"an element of {what}", depth + 1)
        return None


def _quote(name: bytes) -> str:
    text = repr(name.decode("utf-8", errors="replace"))
    return text if len(text) <= 60 else text[:57] + "..."


def _header(c: _Cursor) -> None:
    """Walk the whole header; raises `_BadHeaderError` at the first thing out of bounds."""
    if c.size < 4 or bytes(c.buf[:4]) != MAGIC:
        raise _NotGGUFError("no GGUF magic")
    c.pos = 4
    version = c.take("<I", "the version")
    if version not in VERSIONS:
        raise _BadHeaderError(f"version {version}; lmpress reads versions 2 and 3")
    n_tensors = c.take("<Q", "the tensor count")
    n_kv = c.take("<Q", "the metadata count")
    if n_kv > c.left // _MIN_KV:
        raise _BadHeaderError(f"{n_kv:,} metadata pairs claimed, more than the file's {c.size:,} bytes can hold")
    if n_tensors > c.left // _MIN_TENSOR:
        raise _BadHeaderError(f"{n_tensors:,} tensors claimed, more than the file's {c.size:,} bytes can hold")
    alignment = DEFAULT_ALIGNMENT
    for i in range(n_kv):
        key = c.string(f"metadata key {i}")
        try:
            key.decode("utf-8")  # the first 200 bytes; keys are short names like general.architecture
        except UnicodeDecodeError as e:
            if e.end < len(key) or len(key) < 200:  # not a character cut at the 200th byte
                raise _BadHeaderError(f"metadata key {i} is not UTF-8 text") from None
        vtype = c.take("<I", f"the value type of metadata {_quote(key)}")
        value = c.value(vtype, f"metadata {_quote(key)}")
        if key == b"general.alignment":
            if vtype != UINT32 or not isinstance(value, int) or value <= 0 or value & (value - 1):
                raise _BadHeaderError("general.alignment is not a power of two stored as uint32")
            alignment = value
    if n_tensors > c.left // _MIN_TENSOR:
        raise _BadHeaderError(
            f"{n_tensors:,} tensors claimed, more than the {c.left:,} bytes after the metadata can hold"
        )
    tensors: list[tuple[bytes, int, int, int]] = []  # name, elements, type, offset
    for i in range(n_tensors):
        name = c.string(f"the name of tensor {i}")
        n_dims = c.take("<I", f"the dimension count of tensor {_quote(name)}")
        if n_dims > MAX_DIMS:
            raise _BadHeaderError(f"tensor {_quote(name)} has {n_dims:,} dimensions, more than {MAX_DIMS}")
        elements = 1
        for _ in range(n_dims):
            elements *= c.take("<Q", f"a dimension of tensor {_quote(name)}")
        ttype = c.take("<I", f"the type of tensor {_quote(name)}")
        if ttype not in GGML_SIZES and ttype >= MAX_GGML_TYPE:  # types below it may be newer than this table
            raise _BadHeaderError(f"tensor {_quote(name)} has ggml type {ttype:,}, not one llama.cpp knows")
        offset = c.take("<Q", f"the data offset of tensor {_quote(name)}")
        tensors.append((name, elements, ttype, offset))
    data_start = c.pos + (-c.pos % alignment)
    for name, elements, ttype, offset in tensors:
        if offset % alignment:
            raise _BadHeaderError(f"tensor {_quote(name)}'s data offset {offset:,} is not a multiple of {alignment}")
        if data_start + offset > c.size:
            raise _BadHeaderError(f"tensor {_quote(name)}'s data offset {offset:,} is past the end of the file")
        if ttype in GGML_SIZES:
            block, nbytes = GGML_SIZES[ttype]
            if elements % block:
                raise _BadHeaderError(f"tensor {_quote(name)} has {elements:,} elements, not whole blocks of {block}")
            end = data_start + offset + elements // block * nbytes
            if end > c.size:
                raise _BadHeaderError(
                    f"tensor {_quote(name)}'s data ends at byte {end:,}, past the end of the file ({c.size:,})"
                )


def check_gguf(path: Path) -> None:
    """Raise `ModelLoadError` unless ``path`` is a regular file with a well-formed GGUF header whose
    every count, length and offset stays within the file."""
    try:
        if not path.exists():
            raise ModelLoadError(f"{path} does not exist; give a GGUF file written by lmpress export")
        if not path.is_file():
            kind = "a directory" if path.is_dir() else "not a regular file"
            raise ModelLoadError(f"{path} is {kind}; give a GGUF file written by lmpress export")
        with path.open("rb") as f:
            size = path.stat().st_size
            if size == 0:
                raise _NotGGUFError("the file is empty")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                _header(_Cursor(buf, min(size, len(buf))))
    except _BadHeaderError as e:
        valid = "" if isinstance(e, _NotGGUFError) else "valid "
        raise ModelLoadError(f"{path} is not a {valid}GGUF file ({e}); re-export or re-download it") from None
    except (OSError, ValueError) as e:  # unreadable, or a file that cannot be mapped
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise ModelLoadError(f"cannot read {path} ({reason}); give a GGUF file written by lmpress export") from None
