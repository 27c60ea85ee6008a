"""Hostile inputs, groups 4 and 6 of issue 29: recipes and data that would hang, exhaust memory or
block (YAML alias bombs, oversized files, streams, FIFOs), and tracking that must never stop a job.

Each refusal is one ``error:`` line with exit code 2, fast, with nothing written; each tracking
failure is one ``warning:`` line and the command's own result."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmpress import sources as data_module
from lmpress.errors import DataError, RecipeError
from lmpress.recipe import MAX_RECIPE_BYTES, PRESET_DIR, Recipe, load_recipe
from lmpress.sources import load_documents
from lmpress.track import TrackOptions, record_run
from tests.robustness.conftest import EVAL_FAST, FAST, Outcome, assert_refused, lmpress, tree

# ---- group 4: recipes ---------------------------------------------------------------------------

# billion laughs: 9 levels of 9-item lists, 9**9 (387 million) strings once the aliases are expanded
_ANCHORS = ", ".join(
    ["&l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    + [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
)
BOMBS = {
    "stage value": f"stages:\n  - method: rtn\n    targets: [{_ANCHORS}]\n",
    "description": f"description: [{_ANCHORS}]\nstages: [{{method: cast}}]\n",
    "name": f"name: [{_ANCHORS}]\nstages: [{{method: cast}}]\n",
    "top level": f"[{_ANCHORS}]\n",
    "stage list": f"stages: [{_ANCHORS}]\n",
}


def _compress_recipe(capsys: pytest.CaptureFixture[str], recipe: str | Path) -> object:
    return lmpress(capsys, "compress", "builtin", "-r", recipe, "-o", "out", "--track", *FAST)


@pytest.mark.parametrize("where", list(BOMBS))
def test_alias_bomb_is_refused_fast(capsys: pytest.CaptureFixture[str], work: Path, where: str) -> None:
    (work / "bomb.yaml").write_text(BOMBS[where])
    before = tree(work)
    outcome = lmpress(capsys, "compress", "builtin", "-r", "bomb.yaml", "-o", "out", "--track", *FAST)
    assert_refused(outcome, "expands to more than", "write the values out", before=before, root=work, max_seconds=5)
    assert len(outcome.stderr) < 300


@pytest.mark.parametrize(
    "content", [f"bits: [{_ANCHORS}]\n", "# x\n" * 300_000, "bits: !!python/object:os.system {}\n"]
)
def test_search_space_file_is_read_within_the_recipe_limits(
    capsys: pytest.CaptureFixture[str], work: Path, content: str
) -> None:
    (work / "space.yaml").write_text(content)
    before = tree(work)
    outcome = lmpress(capsys, "search", "--space", "space.yaml", "--trials", "1", "--max-bytes", "5MB")
    assert_refused(outcome, "search space space.yaml", before=before, root=work, max_seconds=5)


def test_alias_bomb_through_the_api_is_refused_fast(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMBS["stage value"])
    t0 = time.perf_counter()
    with pytest.raises(RecipeError, match="expands to more than"):
        load_recipe(path)
    with pytest.raises(RecipeError, match="expands to more than"):
        load_recipe(yaml.safe_load(BOMBS["description"]))  # a mapping parsed by the caller
    assert time.perf_counter() - t0 < 2


def test_oversized_recipe(capsys: pytest.CaptureFixture[str], work: Path) -> None:
    padding = "# " + "x" * 78 + "\n"
    (work / "big.yaml").write_text("stages: [{method: cast}]\n" + padding * (MAX_RECIPE_BYTES // 80 + 2000))
    before = tree(work)
    assert_refused(
        _compress_recipe(capsys, "big.yaml"),
        "big.yaml is 1.2 MB",
        "recipes are at most 1 MB",
        before=before,
        root=work,
        max_seconds=5,
    )


def _dir(work: Path) -> str:
    (work / "dir.yaml").mkdir()
    return "dir.yaml"


def _fifo(work: Path) -> str:
    os.mkfifo(work / "fifo.yaml")
    return "fifo.yaml"


def _write(name: str, content: bytes) -> Callable[[Path], str]:
    def make(work: Path) -> str:
        (work / name).write_bytes(content)
        return name

    return make


HOSTILE_FILES = {
    "directory": (_dir, "is a directory"),
    "/dev/zero": (lambda work: "/dev/zero", "is not a regular file"),
    "fifo": (_fifo, "is not a regular file"),
    "not utf-8": (_write("latin.yaml", b"name: caf\xe9\nstages: [{method: cast}]\n"), "is not UTF-8 text"),
    "empty": (_write("empty.yaml", b""), "is empty"),
    "comments only": (_write("comments.yaml", b"# nothing here\n"), "is empty"),
    "python tag": (
        _write("tag.yaml", b"stages:\n  - !!python/object/apply:os.system [echo owned]\n"),
        "no !!python tags",
    ),
    "bad syntax": (_write("syntax.yaml", b"stages: [\n"), "is not valid YAML"),
    "deep nesting": (_write("deep.yaml", b"[" * 50_000 + b"]" * 50_000), "nests"),
    "self reference": (_write("self.yaml", b"stages: &s [method: cast, *s]\n"), "nests deeper than"),
    "name is a list": (_write("name.yaml", b"name: [a, b]\nstages: [{method: cast}]\n"), "'name' must be a string"),
    "description is a mapping": (
        _write("desc.yaml", b"description: {a: b}\nstages: [{method: cast}]\n"),
        "'description' must be a string",
    ),
    "unhashable method": (_write("method.yaml", b"stages: [{method: [rtn]}]\n"), "unknown method ['rtn']"),
    "mixed top-level keys": (_write("keys.yaml", b"{1: a, b: c, stages: []}\n"), "unknown key"),
}


@pytest.mark.parametrize("case", list(HOSTILE_FILES))
def test_hostile_recipe_file(capsys: pytest.CaptureFixture[str], work: Path, case: str) -> None:
    make, says = HOSTILE_FILES[case]
    recipe = make(work)
    before = tree(work)
    assert_refused(_compress_recipe(capsys, recipe), says, before=before, root=work, max_seconds=5)


def test_huge_stage_value_is_shown_short(capsys: pytest.CaptureFixture[str], work: Path) -> None:
    """90,000 wrong values (under the cap): the message names the first few, briefly."""
    (work / "wide.yaml").write_text("stages:\n  - method: rtn\n    targets: [" + ", ".join(["[x]"] * 30_000) + "]\n")
    before = tree(work)
    outcome = _compress_recipe(capsys, "wide.yaml")
    assert_refused(outcome, "recipe stage 1 (rtn): targets.0", "more", before=before, root=work, max_seconds=10)
    assert len(outcome.stderr) < 600  # type: ignore[attr-defined]


# ---- group 4: data ------------------------------------------------------------------------------


def test_data_from_dev_zero(capsys: pytest.CaptureFixture[str], tiny: Path, work: Path) -> None:
    """Refused before reading; the run directory made for it (and its runs directory) is removed."""
    before = tree(work)
    outcome = lmpress(capsys, "compress", tiny, "-r", "w8", "--data", "/dev/zero", "--track", *FAST)
    assert_refused(
        outcome, "'/dev/zero' is not a regular file or a directory", before=before, root=work, max_seconds=30
    )
    assert not (work / "lmpress-runs").exists()


def test_data_that_is_a_fifo(capsys: pytest.CaptureFixture[str], tiny: Path, work: Path) -> None:
    os.mkfifo(work / "pipe.txt")
    before = tree(work)
    outcome = lmpress(capsys, "eval", tiny, "--data", "pipe.txt", *EVAL_FAST)
    assert_refused(outcome, "'pipe.txt' is not a regular file", before=before, root=work, max_seconds=30)


def test_data_dir_of_only_a_fifo(capsys: pytest.CaptureFixture[str], tiny: Path, work: Path) -> None:
    (work / "corpus").mkdir()
    os.mkfifo(work / "corpus" / "pipe.txt")
    before = tree(work)
    outcome = lmpress(capsys, "eval", tiny, "--data", "corpus", *EVAL_FAST)
    assert_refused(outcome, "not a regular file (first: pipe.txt)", before=before, root=work, max_seconds=30)


def test_data_dir_with_a_fifo_and_binaries_reads_the_text(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The FIFO is never opened; what was skipped is one debug line after the reading."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    os.mkfifo(corpus / "pipe.txt")
    (corpus / "a.txt").write_text("text")
    (corpus / "b.bin").write_bytes(b"\xff\xfe\x00")
    (corpus / "c.bin").write_bytes(b"\xc3")
    with caplog.at_level(logging.DEBUG, logger="lmpress.sources"):
        docs = load_documents(corpus)
    assert [d.path for d in docs] == ["a.txt"]
    (message,) = [r.getMessage() for r in caplog.records]
    assert message == (
        f"{corpus}: skipped 2 files that are not UTF-8 text (first: b.bin) "
        "and 1 file that is not a regular file (first: pipe.txt)"
    )


def test_data_dir_without_text_in_the_split_names_what_it_skipped(
    capsys: pytest.CaptureFixture[str], tiny: Path, work: Path
) -> None:
    """A progress line before the refusal would be a second line: the refusal names the skipped files."""
    (work / "corpus").mkdir()
    for name in ("a.txt", "b.txt"):  # calibration and train documents: no evaluation text
        (work / "corpus" / name).write_text("def f():\n    return 1\n" * 20)
    (work / "corpus" / "c.bin").write_bytes(b"\xff" * 10)
    before = tree(work)
    outcome = lmpress(capsys, "eval", tiny, "--data", "corpus", *EVAL_FAST)
    assert_refused(
        outcome,
        "no text in its 'eval' split (skipped 1 file that is not UTF-8 text (first: c.bin))",
        before=before,
        root=work,
    )


@pytest.mark.parametrize("shape", ["file", "directory", "jsonl"])
def test_data_over_the_cap(
    capsys: pytest.CaptureFixture[str], tiny: Path, work: Path, monkeypatch: pytest.MonkeyPatch, shape: str
) -> None:
    monkeypatch.setattr(data_module, "MAX_DATA_BYTES", 4096)
    if shape == "file":
        source = work / "big.txt"
        source.write_text("word " * 2000)
    elif shape == "jsonl":
        source = work / "big.jsonl"
        source.write_text('{"text": "word"}\n' * 500)
    else:
        source = work / "corpus"
        source.mkdir()
        for i in range(3):
            (source / f"{i}.txt").write_text("word " * 500)
    before = tree(work)
    outcome = lmpress(capsys, "eval", tiny, "--data", source.name, *EVAL_FAST)
    assert_refused(outcome, "of text, over the 4 KiB lmpress reads; give a smaller sample", before=before, root=work)


def test_data_that_lies_about_its_size_stops_at_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """/proc files say they hold 0 bytes: the cap holds while reading too."""
    monkeypatch.setattr(data_module, "MAX_DATA_BYTES", 64)
    assert Path("/proc/self/status").stat().st_size == 0
    with pytest.raises(DataError, match="holds more than 64 bytes of text, over the 64 bytes"):
        load_documents("/proc/self/status")
    monkeypatch.setattr(data_module, "MAX_DATA_BYTES", 1 << 20)
    assert "Pid:" in load_documents("/proc/self/status")[0].text  # under the cap: all of it, not 0 bytes


# ---- group 6: tracking never stops a job --------------------------------------------------------


def _warnings(outcome: Outcome, caplog: pytest.LogCaptureFixture) -> list[str]:
    """The lines a command printed on stderr and logged at warning level or above (in this process,
    pytest's log capture holds the log lines the command line would print on stderr)."""
    assert "Traceback" not in outcome.stderr + outcome.stdout
    logged = [f"{r.levelname.lower()}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.WARNING]
    return [line for line in outcome.stderr.splitlines() if line.strip()] + logged


def test_unwritable_runs_dir_compress_goes_on(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture, tiny: Path, work: Path
) -> None:
    (work / "somefile").write_text("x")
    outcome = lmpress(
        capsys, "compress", tiny, "-r", "w8", "-o", "out", "--track", "--runs-dir", "somefile/runs", "-q", *FAST
    )
    assert outcome.code == 0, outcome.stderr
    (line,) = _warnings(outcome, caplog)
    assert line.startswith("warning: cannot create a run directory in somefile/runs (Not a directory)"), line
    assert (work / "out" / "lmpress.json").is_file() and any((work / "out").glob("*.safetensors"))
    assert (work / "somefile").read_text() == "x"


@pytest.mark.parametrize("runs_dir", ["/proc/lmpress-runs", "somefile/runs"])
def test_unwritable_runs_dir_eval_goes_on(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture, tiny: Path, work: Path, runs_dir: str
) -> None:
    (work / "somefile").write_text("x")
    plain = lmpress(capsys, "eval", tiny, "--json", *EVAL_FAST)
    caplog.clear()
    outcome = lmpress(capsys, "eval", tiny, "--json", "--track", "--runs-dir", runs_dir, "-q", *EVAL_FAST)
    assert outcome.code == plain.code == 0, outcome.stderr
    (line,) = _warnings(outcome, caplog)
    assert line.startswith(f"warning: cannot create a run directory in {runs_dir}"), line
    assert outcome.stdout == plain.stdout  # the same result, printed the same way


def test_unwritable_record_is_a_warning_and_leaves_no_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The run directory could be made, but run.json cannot be written (a full disk): one warning,
    and neither the empty run directory nor the runs directory made for it is left behind."""

    def full(path: Path, data: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("lmpress.track.write_json_atomic", full)
    runs = tmp_path / "a" / "runs"
    opts = TrackOptions(enabled=True, runs_dir=runs, mlflow=False)
    with caplog.at_level(logging.WARNING, logger="lmpress.track"):
        assert record_run(opts, "eval", "m", {"metrics": {}}, recipe_yaml="name: x\n") is None
    (message,) = [r.getMessage() for r in caplog.records]
    assert "No space left on device" in message and "not tracked" in message
    assert not (tmp_path / "a").exists()


# ---- properties: any recipe text loads or is refused in one line, fast --------------------------

PROPERTY = settings(
    max_examples=200, deadline=1000, suppress_health_check=[HealthCheck.function_scoped_fixture], database=None
)
_YAMLISH = st.lists(
    st.sampled_from([*"ab:-[]{}&*!|>'\"#,?%@`~\\ \t\n0129.eE+_\xe9", "stages", "method", "rtn", "!!python/"]),
    max_size=120,
).map("".join)
_KEYS = st.sampled_from(["name", "description", "stages", "method", "bits", "group_size", "targets", "x"])
_SCALARS = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20) | _KEYS
_METHODS = st.sampled_from(["rtn", "cast", "gptq", "sparsegpt", "nope"])
_STRUCTURES = st.recursive(
    _SCALARS | _METHODS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS | st.integers(0, 3), inner, max_size=4),
    max_leaves=30,
)
_STAGE = st.fixed_dictionaries({"method": _METHODS}, optional={k: _STRUCTURES for k in ("bits", "targets", "x")})
_RECIPES = st.fixed_dictionaries(
    {"stages": st.lists(_STAGE, max_size=3) | _STRUCTURES},
    optional={"name": _STRUCTURES, "description": _STRUCTURES},
)
_PRESETS = sorted(p.read_text() for p in PRESET_DIR.glob("*.yaml"))


@pytest.fixture(autouse=True, scope="module")
def _warm() -> None:
    load_recipe("w8")  # the method registry's imports, outside the deadline


def _loads_or_refuses(path: Path, text: str | bytes) -> None:
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    t0 = time.perf_counter()
    try:
        assert isinstance(load_recipe(path), Recipe)
    except RecipeError as e:
        message = str(e)
        assert message and "\n" not in message and len(message) < 2000, message
    assert time.perf_counter() - t0 < 1


@PROPERTY
@given(text=_YAMLISH)
def test_property_yamlish_text(tmp_path: Path, text: str) -> None:
    _loads_or_refuses(tmp_path / "r.yaml", text)


@PROPERTY
@given(raw=_RECIPES | _STRUCTURES, flow=st.booleans())
def test_property_dumped_structures(tmp_path: Path, raw: object, flow: bool) -> None:
    _loads_or_refuses(tmp_path / "r.yaml", yaml.safe_dump(raw, default_flow_style=flow, allow_unicode=True))


@PROPERTY
@given(
    preset=st.sampled_from(_PRESETS),
    edits=st.lists(
        st.tuples(st.sampled_from(["delete", "insert", "repeat"]), st.floats(0, 1), st.integers(1, 20), _YAMLISH),
        min_size=1,
        max_size=4,
    ),
)
def test_property_mutated_presets(tmp_path: Path, preset: str, edits: list[tuple[str, float, int, str]]) -> None:
    text = preset
    for op, where, n, insert in edits:
        i = int(where * len(text))
        if op == "delete":
            text = text[:i] + text[i + n :]
        elif op == "insert":
            text = text[:i] + insert + text[i:]
        else:
            text = text[:i] + text[i : i + n] * 50 + text[i:]
    _loads_or_refuses(tmp_path / "r.yaml", text)
