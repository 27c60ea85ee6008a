"""Text sources, deterministic splits, tokenized windows and manifests.

A source is a text file, a directory (read with a glob pattern), a JSONL file with a text field, or
the built-in corpus ``stdlib``: the ``.py`` files of the running interpreter's standard library
(outside ``site-packages`` and test folders). Every document goes to the train, calibration or
evaluation split by a stable hash of its path, so the split never depends on file order, machine or
run. A `Manifest` records what exactly a number was measured on: documents, characters, tokens
and the sha256 of the content.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
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


def _stdlib_documents() -> list[Document]:
    root = stdlib_root()
    docs = []
    for p in sorted(root.rglob("*.py")):
        parts = p.relative_to(root).parts
        if "site-packages" in parts or "dist-packages" in parts or _TEST_DIRS.intersection(parts):
            continue
        text = _read_text(p)
        if text is not None:
            docs.append(Document(p.relative_to(root).as_posix(), text))
    return docs


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        log.info("skipping %s: not UTF-8 text", path)
        return None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}; check the path and its permissions") from None


def _jsonl_documents(path: Path, text_field: str) -> list[Document]:
    docs = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text; give a UTF-8 JSONL file") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}; check the path and its permissions") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object") from None
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
    """
    if str(source) == STDLIB:
        return _stdlib_documents()
    path = Path(source)
    if not path.exists():
        raise DataError(
            f"data source {str(source)!r} does not exist; give a text file, a directory, a .jsonl file or 'stdlib'"
        )
    if path.is_dir():
        docs = []
        try:
            matched = sorted(path.glob(pattern))
        except (ValueError, NotImplementedError):
            raise DataError(f"--pattern {pattern!r} is not a relative glob; use e.g. '**/*.txt'") from None
        for p in matched:
            if p.is_file():
                text = _read_text(p)
                if text is not None:
                    docs.append(Document(p.relative_to(path).as_posix(), text))
        return docs
    if path.suffix == ".jsonl":
        return _jsonl_documents(path, text_field)
    text = _read_text(path)
    if text is None:
        raise DataError(f"data file {path} is not UTF-8 text")
    return [Document(path.name, text)]


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
    docs = select_split(load_documents(source, pattern=pattern, text_field=text_field), split)
    if not docs or not any(d.text.strip() for d in docs):
        raise DataError(
            f"data source {str(source)!r} has no text in its {split!r} split; give a source with text in it"
        )
    stream = tokenize_documents(docs, tokenizer)
    w = windows(stream, seq_len, max_windows)
    m = manifest(docs, source, split)
    m = Manifest(**{**asdict(m), "tokens": int(stream.numel()), "seq_len": seq_len, "windows": int(w.shape[0])})
    return TokenData(w, m)
