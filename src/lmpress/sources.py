"""Reading a text source safely: the built-in ``stdlib`` corpus, a directory (read with a glob
pattern), a JSONL file with a text field, or any other text file, as `Document` s in a stable order.

Only regular files are read (a FIFO or a device such as ``/dev/zero`` is refused as a source and
skipped inside a directory, never opened for a blocking read), and one source holds at most
``MAX_DATA_BYTES`` of text: checked from the files' sizes before reading, and again while reading.
`lmpress.data` splits, tokenizes and windows what is read here.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import sysconfig
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from lmpress.errors import DataError

log = logging.getLogger(__name__)

STDLIB = "stdlib"
_TEST_DIRS = frozenset({"test", "tests", "idle_test"})
MAX_DATA_BYTES = 1 << 30  # the most text lmpress reads from one source (1 GiB)
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Document:
    """One text document; ``path`` is its stable identity (relative to the source root)."""

    path: str
    text: str


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _size(n: int) -> str:
    """Bytes as people read them: ``1 GiB``, ``1.5 MiB``, ``512 bytes``."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:,.1f}".removesuffix(".0") + f" {unit}"
    return f"{n} bytes"


@dataclass
class _Reader:
    """Reads the files of one source within ``MAX_DATA_BYTES`` in all, noting the files it skips."""

    source: str
    left: int = field(default_factory=lambda: MAX_DATA_BYTES)
    not_text: list[str] = field(default_factory=list)
    not_regular: list[str] = field(default_factory=list)

    def too_big(self, n: int, more: bool = False) -> DataError:
        held = f"more than {_size(MAX_DATA_BYTES)}" if more else _size(n)
        return DataError(
            f"data source {self.source!r} holds {held} of text, over the {_size(MAX_DATA_BYTES)} lmpress reads; "
            "give a smaller sample"
        )

    def regular_files(self, paths: Iterable[Path], root: Path | None = None) -> list[Path]:
        """The regular files among ``paths`` (others noted by their name under ``root``, directories
        ignored), refused if together over the cap."""
        files, total = [], 0
        for p in paths:
            try:
                st = p.stat()
            except OSError:  # a dangling link, a file removed meanwhile
                continue
            if stat.S_ISREG(st.st_mode):
                files.append(p)
                total += st.st_size
            elif not stat.S_ISDIR(st.st_mode):
                self.not_regular.append(p.relative_to(root).as_posix() if root is not None else str(p))
        if total > self.left:
            raise self.too_big(total)
        return files

    def read_bytes(self, path: Path, name: str | None = None) -> bytes | None:
        """The bytes of a regular file (None for anything else), at most what is left of the cap.

        Opened without blocking and checked with fstat, so a FIFO put in a file's place is never
        waited on; a file that grows or reports a wrong size still stops at the cap."""
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise DataError(f"cannot read {path}: {e.strerror}; check the path and its permissions") from None
        try:
            with open(fd, "rb", closefd=True) as f:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    self.not_regular.append(name or str(path))
                    return None
                want = min(st.st_size, self.left) + 1
                chunks = [f.read(want)]
                total = len(chunks[0])
                while total == want and total <= self.left:  # longer than its size said: read on, to the cap
                    chunk = f.read(min(_CHUNK, self.left + 1 - total))
                    chunks.append(chunk)
                    total += len(chunk)
                    want = total if chunk else -1
        except OSError as e:
            raise DataError(f"cannot read {path}: {e.strerror}; check the path and its permissions") from None
        if total > self.left:
            raise self.too_big(total, more=True)
        self.left -= total
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def read_text(self, path: Path, name: str) -> str | None:
        """A file's UTF-8 text; None (noted as ``name``) when it is not UTF-8 or not a regular file."""
        data = self.read_bytes(path, name)
        if data is None:
            return None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            self.not_text.append(name)
            return None

    def skipped(self) -> str:
        """``skipped 3 files that are not UTF-8 text (first: a.bin)``, or "" when none was skipped."""
        parts = []
        for names, what in ((self.not_text, "not UTF-8 text"), (self.not_regular, "not a regular file")):
            if names:
                n = len(names)
                parts.append(f"{n} {'file that is' if n == 1 else 'files that are'} {what} (first: {names[0]})")
        return "skipped " + " and ".join(parts) if parts else ""


def _documents(reader: _Reader, paths: list[Path], root: Path) -> list[Document]:
    """The regular, UTF-8 files among ``paths``, named relative to ``root`` (the rest skipped)."""
    docs = []
    for p in reader.regular_files(paths, root):
        name = p.relative_to(root).as_posix()
        text = reader.read_text(p, name)
        if text is not None:
            docs.append(Document(name, text))
    return docs


def _stdlib_documents() -> list[Document]:
    root = stdlib_root()
    reader = _Reader(STDLIB)
    paths = []
    for p in sorted(root.rglob("*.py")):
        parts = p.relative_to(root).parts
        if "site-packages" in parts or "dist-packages" in parts or _TEST_DIRS.intersection(parts):
            continue
        paths.append(p)
    docs = _documents(reader, paths, root)
    if reader.skipped():  # the interpreter's own files: not the user's business
        log.debug("stdlib: %s", reader.skipped())
    return docs


def _jsonl_documents(path: Path, text_field: str, reader: _Reader) -> list[Document]:
    data = reader.read_bytes(path)
    if data is None:
        raise DataError(f"data source {str(path)!r} is not a regular file; give a .jsonl file")
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text; give a UTF-8 JSONL file") from None
    docs = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object") from None
        except RecursionError:
            raise DataError(f"{path}:{lineno}: JSON nested too deeply; give one flat object per line") from None
        if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
            raise DataError(
                f"{path}:{lineno}: no string field {text_field!r}; pass --text-field NAME to pick the field"
            )
        docs.append(Document(f"{path.name}:{lineno}", row[text_field]))
    return docs


def load_documents(source: str | Path = STDLIB, *, pattern: str = "**/*", text_field: str = "text") -> list[Document]:
    """All documents of a source, in a deterministic order.

    ``source`` is ``"stdlib"``, a ``.jsonl`` file (one JSON object per line, text in ``text_field``),
    any other text file, or a directory whose files matching ``pattern`` are read as UTF-8 text.
    Other files in a directory (not UTF-8, not regular files: a FIFO is never opened) are skipped:
    one debug line says which, and a refusal for want of text names them. A source is at most
    ``MAX_DATA_BYTES``.
    """
    return read_source(source, pattern, text_field)[0]


_WHERE = "give a text file, a directory, a .jsonl file or 'stdlib'"


def check_source(source: str | Path) -> os.stat_result | None:
    """The cheap part of reading a source, for the checks before any work: it exists and is a
    directory or a regular file (never a FIFO or a device), within the size lmpress reads. Returns
    its ``stat`` (None for ``stdlib``)."""
    if str(source) == STDLIB:
        return None
    try:
        st = Path(source).stat()
    except (OSError, ValueError):  # ValueError: a NUL byte in the name
        raise DataError(f"data source {str(source)!r} does not exist; {_WHERE}") from None
    if stat.S_ISDIR(st.st_mode):
        return st
    if not stat.S_ISREG(st.st_mode):
        raise DataError(
            f"data source {str(source)!r} is not a regular file or a directory (a FIFO or device); {_WHERE}"
        )
    _Reader(str(source)).regular_files([Path(source)])  # the size cap
    return st


def read_source(source: str | Path, pattern: str = "**/*", text_field: str = "text") -> tuple[list[Document], str]:
    """`load_documents`, with what it skipped (``skipped 2 files that are ...`` or "").

    The skipped files are a debug line, not an info line: a command reads its source up to three
    times (evaluation, calibration, prompts), and a line printed before a later refusal would break
    the promise that bad input prints one line; the refusal names them instead."""
    st = check_source(source)
    if st is None:
        return _stdlib_documents(), ""
    path = Path(source)
    reader = _Reader(str(source))
    if stat.S_ISDIR(st.st_mode):
        try:
            matched = sorted(path.glob(pattern))
        except (ValueError, NotImplementedError):
            raise DataError(f"--pattern {pattern!r} is not a relative glob; use e.g. '**/*.txt'") from None
        docs = _documents(reader, matched, path)
        skipped = reader.skipped()
        if skipped and not docs:
            raise DataError(f"data directory {str(source)!r} has no text to read: {skipped}; give UTF-8 text files")
        if skipped:
            log.debug("%s: %s", source, skipped)
        return docs, skipped
    reader.regular_files([path])  # the size, before reading (a regular file: check_source refused the rest)
    if path.suffix == ".jsonl":
        return _jsonl_documents(path, text_field, reader), ""
    text = reader.read_text(path, path.name)
    if text is None:
        if reader.not_regular:
            raise DataError(f"data source {str(source)!r} is not a regular file; {_WHERE}")
        raise DataError(f"data file {path} is not UTF-8 text")
    return [Document(path.name, text)], ""
