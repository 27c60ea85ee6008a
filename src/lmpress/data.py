"""Text sources, deterministic splits, tokenized windows and manifests.

A source is a text file, a directory (read with a glob pattern), a JSONL file with a text field, or
the built-in corpus ``stdlib``: the ``.py`` files of the running interpreter's standard library
(outside ``site-packages`` and test folders). Every document goes to the train, calibration or
evaluation split by a stable hash of its path, so the split never depends on file order, machine or
run. A `Manifest` records what exactly a number was measured on: documents, characters, tokens
and the sha256 of the content.

Reading a source (regular files only, within a size cap) is `lmpress.sources`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch
from torch import Tensor

from lmpress.errors import DataError
from lmpress.progress import phase
from lmpress.sources import STDLIB, Document, read_source

log = logging.getLogger(__name__)

Split = Literal["train", "calib", "eval", "all"]
# Fractions of documents (by path hash) that go to calibration and evaluation; the rest is train.
CALIB_FRACTION = 0.05
EVAL_FRACTION = 0.05


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
    all_docs, skipped = read_source(source, pattern, text_field)
    docs = select_split(all_docs, split)
    if not docs or not any(d.text.strip() for d in docs):
        note = f" ({skipped})" if skipped else ""
        raise DataError(
            f"data source {str(source)!r} has no text in its {split!r} split{note}; give a source with text in it"
        )

    with phase(f"tokenizing the {split} split of {source}"):
        stream = tokenize_documents(docs, tokenizer)
    w = windows(stream, seq_len, max_windows)
    m = manifest(docs, source, split)
    m = Manifest(**{**asdict(m), "tokens": int(stream.numel()), "seq_len": seq_len, "windows": int(w.shape[0])})
    return TokenData(w, m)
