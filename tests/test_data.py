"""Text sources, deterministic splits, windows and manifests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmpress.data import content_hash, load_windows, select_split, split_of, windows
from lmpress.errors import DataError
from lmpress.sources import Document, load_documents


def test_stdlib_corpus_excludes_tests_and_site_packages() -> None:
    docs = load_documents("stdlib")
    paths = [d.path for d in docs]
    assert len(docs) > 500
    assert paths == sorted(paths)
    assert "json/decoder.py" in paths
    assert not any("site-packages" in p or "/test/" in f"/{p}" or "/tests/" in f"/{p}" for p in paths)


def test_split_is_stable_and_roughly_proportional() -> None:
    assert split_of("json/decoder.py") == split_of("json/decoder.py")
    splits = [split_of(f"doc{i}.py") for i in range(4000)]
    assert 0.03 < splits.count("eval") / 4000 < 0.07
    assert 0.03 < splits.count("calib") / 4000 < 0.07
    docs = load_documents("stdlib")
    parts = [select_split(docs, s) for s in ("train", "calib", "eval")]  # type: ignore[arg-type]
    assert sum(map(len, parts)) == len(docs)
    assert not {d.path for d in parts[0]} & {d.path for d in parts[2]}


def test_directory_jsonl_and_file_sources(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.txt").write_text("bee")
    (tmp_path / "d" / "a.txt").write_text("ay")
    (tmp_path / "d" / "skip.md").write_text("no")
    assert [d.path for d in load_documents(tmp_path / "d", pattern="*.txt")] == ["a.txt", "b.txt"]
    jl = tmp_path / "x.jsonl"
    jl.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two", "id": 3}) + "\n")
    assert [d.text for d in load_documents(jl)] == ["one", "two"]
    f = tmp_path / "one.txt"
    f.write_text("hello")
    assert load_documents(f) == [Document("one.txt", "hello")]


@pytest.mark.parametrize(
    ("content", "match"),
    [("not json\n", "not valid JSON"), ('{"body": "x"}\n', "no string field 'text'")],
)
def test_bad_jsonl_is_a_clear_error(tmp_path: Path, content: str, match: str) -> None:
    jl = tmp_path / "bad.jsonl"
    jl.write_text(content)
    with pytest.raises(DataError, match=match):
        load_documents(jl)


def test_missing_source_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_documents(tmp_path / "nope.txt")


def test_windows_cut_and_drop_tail() -> None:
    w = windows(torch.arange(10), 4)
    assert w.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    spread = windows(torch.arange(100), 4, max_windows=3)  # 25 windows: keep the first, middle, last
    assert spread[:, 0].tolist() == [0, 48, 96]
    with pytest.raises(DataError, match="fewer than one window of 16"):
        windows(torch.arange(10), 16)


def test_content_hash_changes_with_content() -> None:
    a = [Document("x", "1"), Document("y", "2")]
    assert content_hash(a) == content_hash(list(a))
    assert content_hash(a) != content_hash([Document("x", "1"), Document("y", "3")])
    assert content_hash(a) != content_hash(a[::-1])


def test_load_windows_manifest(tokenizer, text_file: Path) -> None:  # type: ignore[no-untyped-def]
    data = load_windows(tokenizer, text_file, "eval", seq_len=32)
    m = data.manifest
    assert data.windows.shape == (m.windows, 32)
    assert m.documents == 1 and m.tokens is not None and m.tokens >= 32 * m.windows
    assert len(m.sha256) == 64
    assert data.windows.max() < len(tokenizer)


def test_empty_or_short_data_is_a_clear_error(tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    with pytest.raises(DataError, match="no text"):
        load_windows(tokenizer, empty, "eval", seq_len=32)
    short = tmp_path / "short.txt"
    short.write_text("x = 1\ny = 2\nz = 3\n")
    with pytest.raises(DataError, match="fewer than one window"):
        load_windows(tokenizer, short, "eval", seq_len=256)


def test_single_file_calibration_and_evaluation_do_not_overlap(tmp_path: Path) -> None:
    f = tmp_path / "one.txt"
    f.write_text("".join(f"line {i}\n" for i in range(100)))
    docs = load_documents(f)
    calib, ev = select_split(docs, "calib"), select_split(docs, "eval")
    assert calib[0].text + ev[0].text == docs[0].text
    assert calib[0].text.endswith("\n") and abs(len(calib[0].text) - len(ev[0].text)) < 10
    assert select_split(docs, "train") == calib and select_split(docs, "all") == docs
