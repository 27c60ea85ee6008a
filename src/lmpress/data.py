"""Text sources, deterministic splits, tokenized windows and manifests.

A source is a text file, a directory (read with a glob pattern), a JSONL file with a text field, or
the built-in corpus ``stdlib``: the ``.py`` files of the running interpreter's standard library
(outside ``site-packages`` and test folders). Every document goes to the train, calibration or
evaluation split by a stable hash of its path, so the split never depends on file order, machine or
run. A `Manifest` records what exactly a number was measured on: documents, characters, tokens
and the sha256 of the content.

Only regular files are read (a FIFO or a device such as ``/dev/zero`` is refused as a source and
skipped inside a directory, never opened for a blocking read), and one source holds at most
``MAX_DATA_BYTES`` of text: checked from the files' sizes before reading, and again while reading.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import torch
from torch import Tensor

from lmpress.errors import DataError

log = logging.getLogger(__name__)

Split = Literal["train", "calib", "eval", "all"]
STDLIB = "stdlib"
# Fractions of documents (by path hash) that go to calibration and evaluation; the rest is train.
CALIB_FRACTION = 0.05
EVAL_FRACTION = 0.05
_TEST_DIRS = frozenset({"test", "tests", "idle_test"})
MAX_DATA_BYTES = 1 << 30  # the most text lmpress reads from one source (1 GiB)
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Document:
    """One text document; ``path`` is its stable identity (relative to the source root)."""

    path: str
    text: str


@dataclass(frozen=True)
class Manifest:
    """What a piece of data is: enough to say exactly what a number was measured on."""

    source: str
    split: str
    documents: int
    chars: int
    sha256: str
    tokens: int | None = None
    seq_len: int | None = None
    windows: int | None = None

    def to_dict(self) -> dict[str, object]:
        return {k: v for k, v in asdict(self).items() if v is not None}


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer that windowing needs."""

    eos_token_id: int | None

    def __call__(self, text: list[str], **kwargs: object) -> object: ...


def split_of(path: str) -> Literal["train", "calib", "eval"]:
    """The split of a document, from a stable hash of its path (same on every machine)."""
    h = int.from_bytes(hashlib.sha256(path.encode("utf-8")).digest()[:8], "big") / 2.0**64
    if h < EVAL_FRACTION:
        return "eval"
    if h < EVAL_FRACTION + CALIB_FRACTION:
        return "calib"
    return "train"


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


def _stdlib_documents() -> list[Document]:
    root = stdlib_root()
    reader = _Reader(STDLIB)
    paths = []
    for p in sorted(root.rglob("*.py")):
        parts = p.relative_to(root).parts
        if "site-packages" in parts or "dist-packages" in parts or _TEST_DIRS.intersection(parts):
            continue
        paths.append(p)
    docs = []
    for p in reader.regular_files(paths, root):
        name = p.relative_to(root).as_posix()
        text = reader.read_text(p, name)
        if text is not None:
            docs.append(Document(name, text))
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
    return _load(source, pattern, text_field)[0]


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


def _load(source: str | Path, pattern: str, text_field: str) -> tuple[list[Document], str]:
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
        docs = []
        for p in reader.regular_files(matched, path):
            name = p.relative_to(path).as_posix()
            text = reader.read_text(p, name)
            if text is not None:
                docs.append(Document(name, text))
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


def select_split(docs: Sequence[Document], split: Split) -> list[Document]:
    """The documents of one split.

    A source of a single document (one text file) is cut by position at a line boundary near its
    middle: the first half is both train and calibration text, the second half evaluation text, so
    nothing is evaluated on the text it was calibrated on.
    """
    if split == "all":
        return list(docs)
    if len(docs) == 1:
        text = docs[0].text
        cut = text.find("\n", len(text) // 2) + 1 or len(text) // 2
        half = text[cut:] if split == "eval" else text[:cut]
        return [Document(f"{docs[0].path}#{'second' if split == 'eval' else 'first'}-half", half)]
    return [d for d in docs if split_of(d.path) == split]


def content_hash(docs: Iterable[Document]) -> str:
    """sha256 over every document's path and text, in order."""
    h = hashlib.sha256()
    for d in docs:
        h.update(d.path.encode("utf-8"))
        h.update(b"\0")
        h.update(d.text.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def manifest(docs: Sequence[Document], source: str | Path, split: str) -> Manifest:
    return Manifest(
        source=str(source),
        split=split,
        documents=len(docs),
        chars=sum(len(d.text) for d in docs),
        sha256=content_hash(docs),
    )


def tokenize_documents(docs: Sequence[Document], tokenizer: Tokenizer, batch: int = 256) -> Tensor:
    """One long stream of token ids: each document followed by the end-of-text token.  (tokens,)"""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for i in range(0, len(docs), batch):
        enc = tokenizer([d.text for d in docs[i : i + batch]], add_special_tokens=False, verbose=False)
        for row in enc["input_ids"]:  # type: ignore[index]
            ids.extend(row)
            if eos is not None:
                ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def spread(n: int, k: int) -> Tensor:
    """Indices of ``k`` of ``n`` items spread evenly from the first to the last (all ``n`` if k >= n)."""
    return torch.linspace(0, n - 1, k).round().long() if k < n else torch.arange(n)


def windows(stream: Tensor, seq_len: int, max_windows: int | None = None) -> Tensor:
    """Cut a token stream into non-overlapping windows of ``seq_len``; the tail is dropped.  (N, seq_len)

    With ``max_windows`` fewer than there are, the windows kept are spread evenly over the whole
    stream (not its first documents), so a subsample still represents every part of the split.
    """
    n = stream.numel() // seq_len
    if n == 0:
        raise DataError(
            f"the data has {stream.numel()} tokens, fewer than one window of {seq_len}; "
            "give more text or a smaller --seq-len"
        )
    w = stream[: n * seq_len].view(n, seq_len)
    if max_windows is not None and max_windows < n:
        w = w[spread(n, max_windows)]
    return w


@dataclass(frozen=True)
class TokenData:
    """Tokenized windows of one split, with the manifest that says what they are."""

    windows: Tensor  # (N, seq_len) int64
    manifest: Manifest


def load_windows(
    tokenizer: Tokenizer,
    source: str | Path = STDLIB,
    split: Split = "eval",
    seq_len: int = 256,
    max_windows: int | None = None,
    *,
    pattern: str = "**/*",
    text_field: str = "text",
) -> TokenData:
    """Read a source, take one split, tokenize it and cut it into windows."""
    all_docs, skipped = _load(source, pattern, text_field)
    docs = select_split(all_docs, split)
    if not docs or not any(d.text.strip() for d in docs):
        note = f" ({skipped})" if skipped else ""
        raise DataError(
            f"data source {str(source)!r} has no text in its {split!r} split{note}; give a source with text in it"
        )
    from lmpress.progress import phase

    with phase(f"tokenizing the {split} split of {source}"):
        stream = tokenize_documents(docs, tokenizer)
    w = windows(stream, seq_len, max_windows)
    m = manifest(docs, source, split)
    m = Manifest(**{**asdict(m), "tokens": int(stream.numel()), "seq_len": seq_len, "windows": int(w.shape[0])})
    return TokenData(w, m)
