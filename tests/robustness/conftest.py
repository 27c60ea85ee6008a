"""The hostile-input suite's harness: run the command line as a user does (``lmpress.cli.run``, the
function behind the ``lmpress`` script), and check the promise of the README's bad-input paragraph:
exit code 2, one line on stderr naming the problem, no traceback, nothing new on disk, the input
untouched.

Fixtures build every bad file themselves, from one tiny model saved once per session.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Outcome:
    """What one command did: its exit code, stdout, stderr and wall time."""

    code: int
    stdout: str
    stderr: str
    seconds: float


def lmpress(capsys: pytest.CaptureFixture[str], *args: str | Path) -> Outcome:
    """Run ``lmpress ARGS`` in this process through the script's own entry point."""
    from lmpress.cli import run

    # the command's own log handler, on stderr as in a terminal (pytest's capture handlers would
    # otherwise keep its progress and warning lines out of ``stderr``)
    root = logging.getLogger()
    kept, level = root.handlers[:], root.level
    root.handlers.clear()
    capsys.readouterr()  # drop what came before
    t0 = time.perf_counter()
    try:
        code = run([str(a) for a in args])
    finally:
        root.handlers[:] = kept
        root.setLevel(level)
    seconds = time.perf_counter() - t0
    out = capsys.readouterr()
    return Outcome(code, out.out, out.err, seconds)


def tree(root: Path) -> dict[str, str]:
    """Every file and directory under ``root`` (hidden ones too) with a hash of each file's bytes."""
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        for d in dirnames:
            found[str(rel / d) + "/"] = "dir"
        for f in filenames:
            p = Path(dirpath) / f
            found[str(rel / f)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "special"
    return found


def assert_refused(
    outcome: Outcome,
    *contains: str,
    before: dict[str, str] | None = None,
    root: Path | None = None,
    max_seconds: float | None = None,
    after_work: bool = False,
) -> None:
    """The bad-input promise: exit 2, exactly one line on stderr starting with ``error:`` (holding
    each of ``contains``), no traceback, and, given ``before``/``root``, the tree unchanged.
    ``after_work``: a failure found mid-run (a NaN in a layer a streamed run reaches), where the
    progress lines of the work done so far may come before the error line."""
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    if after_work:
        assert not any(line.startswith(("error", "warning")) for line in lines[:-1]), outcome.stderr
        lines = lines[-1:]
    assert outcome.code == 2, f"exit {outcome.code}; stderr: {outcome.stderr!r}; stdout: {outcome.stdout[-2000:]!r}"
    assert len(lines) == 1, f"not one line: {outcome.stderr!r}"
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in outcome.stderr + outcome.stdout
    for text in contains:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    if before is not None:
        assert root is not None
        assert tree(root) == before, "the refusal changed the files"
    if max_seconds is not None:
        assert outcome.seconds < max_seconds, f"took {outcome.seconds:.1f} s"


@pytest.fixture(scope="session")
def tiny_master(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:  # type: ignore[no-untyped-def]
    """One tiny random Llama (fp32, with the test tokenizer), saved once per session."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tokenizer)))
    out = tmp_path_factory.mktemp("robust") / "tiny"
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def tiny(tmp_path: Path, tiny_master: Path) -> Path:
    """A fresh copy of the tiny model in this test's own directory (free to corrupt)."""
    return Path(shutil.copytree(tiny_master, tmp_path / "model"))


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The test's directory as the working directory (relative outputs land in it)."""
    monkeypatch.chdir(tmp_path)
    yield tmp_path


FAST = ("--seq-len", "32", "--max-windows", "2", "--calib-windows", "2", "--no-speed", "--samples", "0")
EVAL_FAST = ("--seq-len", "32", "--max-windows", "2", "--no-speed")

Maker = Callable[..., Path]
