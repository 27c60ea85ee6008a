"""README.md as a script: its ```bash and ```python blocks, and the tour's inline commands, run in
order in one fresh directory, as a new user pasting them would. A README command that stops
working (or a README that stops matching the commands) fails here, naming the line.

How a pasted line is run:

- ``lmpress`` (``mlflow``, ``torchrun``, ...) are this venv's scripts: its ``bin/`` is first on PATH.
  ``source .venv/bin/activate``, ``make`` and ``pip install`` lines are in SKIPPED: the venv and its
  extras are what runs this test (``.ci/run`` installs every extra the README's lines use).
- The quick setting the README documents is on (QUICK): few evaluation and calibration windows and
  at most 2 search trials, so every command is quick and its numbers rough.
- What a user brings of their own (a model at ``path/to/model``, ``notes.jsonl``, client data
  directories, a task YAML, ...) is stood in for by PLACEHOLDERS and ``_user_files``.
- Lines that need a runtime this machine lacks, a server, or the network are in SKIPPED with the
  reason. Every other line runs, and must exit 0.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

README = Path(__file__).parent.parent / "README.md"
QUICK = {"LMPRESS_MAX_WINDOWS": "8", "LMPRESS_CALIB_WINDOWS": "16", "LMPRESS_MAX_TRIALS": "2"}

# Lines not run (a regex searched in the command) and why. Any README line not matched here runs.
SKIPPED = {
    r"^make ": "set-up: this test runs in the venv `make` builds",
    r"^source \.venv/bin/activate": "the venv's bin/ is first on PATH already",
    r"^pip install 'lmpress\[mlflow-ui\]'": "only for `mlflow ui`, a server (below)",
    r"^pip install ": "the extras are installed where this test runs (.ci/run: EXTRAS)",
    r"--tasks hellaswag|--tasks wikitext": "lm-evaluation-harness downloads these datasets from the Hugging Face hub",
    r"^llama-cli ": "llama.cpp's CLI is not installed (lmpress eval runs the GGUF file in llama-cpp-python)",
    r"^vllm ": "vLLM is a GPU server, not installed",
    r"^mlflow ui ": "a server that runs until stopped; test_mlflow_ui_extra checks the extra that provides it",
    r"^lmpress federated (serve|join) ": "a server and its clients on separate machines (tests/federated runs both)",
}
# What a user replaces with their own: the stand-ins this test uses (files: `_user_files`).
PLACEHOLDERS = {
    "path/to/hf-model": "out/bf16",  # a float directory plain transformers loads, made by an earlier line
    "path/to/llama-8b": "builtin",
    "path/to/model": "builtin",
}


@dataclass(frozen=True)
class Step:
    line: int  # where the command starts in README.md (1-based)
    kind: str  # "bash" or "python"
    text: str


def readme_steps(text: str) -> list[Step]:
    """The README's commands in order: each command of a ```bash block (a here-document or a
    line continued with a backslash is one command), each ```python block whole, and the inline
    ``lmpress``/``mlflow``/``pip`` commands of the 5-minute tour."""
    lines = text.splitlines()
    steps: list[Step] = []
    i, in_tour = 0, False
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            in_tour = line.strip() == "### A 5-minute tour"
        fence = re.fullmatch(r"```(\w+)\s*", line)
        if fence and fence.group(1) in ("bash", "python"):
            kind, start, body = fence.group(1), i + 1, []
            i += 1
            while not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            steps += _bash_commands(body, start + 1) if kind == "bash" else [Step(start + 1, "python", "\n".join(body))]
        elif fence:  # another language's block (yaml, ...): not run
            i += 1
            while not lines[i].startswith("```"):
                i += 1
        elif in_tour:
            steps += [Step(i + 1, "bash", c) for c in re.findall(r"`((?:lmpress|mlflow|pip) [^`]+)`", line)]
        i += 1
    return steps


def _bash_commands(body: list[str], first: int) -> list[Step]:
    out: list[Step] = []
    i = 0
    while i < len(body):
        start, command = i, body[i]
        i += 1
        if not command.strip() or command.lstrip().startswith("#"):
            continue
        heredoc = re.search(r"<<-?\s*'?(\w+)'?", command)
        while command.endswith("\\") or heredoc:
            command += "\n" + body[i]
            i += 1
            if heredoc and body[i - 1].strip() == heredoc.group(1):
                heredoc = None
        out.append(Step(first + start, "bash", command))
    return out


def skip_reason(step: Step) -> str | None:
    return next((why for pattern, why in SKIPPED.items() if re.search(pattern, step.text.strip())), None)


def _user_files(root: Path) -> None:
    """What the README's lines expect the user to have: a JSONL corpus, client data directories, a
    task YAML, a recipe of their own and a domain corpus (pieces of the Python standard library)."""
    from lmpress.sources import load_documents

    docs = load_documents("stdlib")
    with open(root / "notes.jsonl", "w", encoding="utf-8") as f:  # `--data notes.jsonl --text-field body`
        for doc in docs[:600]:
            f.write(json.dumps({"body": doc.text}) + "\n")
    for client, package in (("hospital-a", "email/"), ("hospital-b", "xml/"), ("hospital-c", "json/")):
        (root / client).mkdir()
        for doc in docs:
            if doc.path.startswith(package):
                (root / client / doc.path.replace("/", "_")).write_text(doc.text, encoding="utf-8")
    domain = root / "my-domain"  # `--data my-domain/`
    domain.mkdir()
    for doc in docs[600:1200]:
        (domain / doc.path.replace("/", "_")).write_text(doc.text, encoding="utf-8")
    tasks = root / "my_tasks"  # `--tasks my_task --task-path my_tasks/`: a local multiple-choice task
    tasks.mkdir()
    with open(tasks / "my_task.jsonl", "w", encoding="utf-8") as f:
        for k in range(8):
            f.write(json.dumps({"question": f"x = {k} + 1\nprint(x)  #", "choices": [f" {k + 1}", f" {k}"]}) + "\n")
    (tasks / "my_task.yaml").write_text(
        f"task: my_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tasks / 'my_task.jsonl'}\n"
        'test_split: test\noutput_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: 0\ntarget_delimiter: ""\nmetric_list:\n  - metric: acc\n'
    )
    from lmpress.recipe import presets

    (root / "my.yaml").write_text(presets()["w8"].read_text())  # "copy one and edit it"


def _environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LMPRESS_", "MLFLOW_"))}
    env.update(QUICK)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "1")
    if "LMPRESS_CACHE" in os.environ:  # the original's cached metrics: where the suite keeps them
        env["LMPRESS_CACHE"] = os.environ["LMPRESS_CACHE"]
    return env


def _substitute(command: str) -> str:
    for placeholder, stand_in in PLACEHOLDERS.items():
        command = command.replace(placeholder, stand_in)
    return command


def run_steps(steps: list[Step], root: Path, keep_going: bool = False) -> list[tuple[Step, str, float]]:
    """Run ``steps`` in ``root``; returns (step, "ok" / "skipped: why" / "failed: ...", seconds) for
    each. Stops at the first failure unless ``keep_going``."""
    env, done = _environment(), []
    for step in steps:
        why = skip_reason(step)
        if why:
            done.append((step, f"skipped: {why}", 0.0))
            continue
        t0 = time.perf_counter()
        command = _substitute(step.text)
        argv = ["bash", "-c", command] if step.kind == "bash" else [sys.executable, "-c", command]
        try:
            proc = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=1800)
            status = f"failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}{proc.stdout[-1500:]}"
            if proc.returncode == 0:
                missing = [p for p in promised_outputs(command) if not (root / p).exists()]
                status = f"failed: exit 0, but {', '.join(missing)} the line names does not exist" if missing else "ok"
        except subprocess.TimeoutExpired:
            status = "failed: still running after 1800 s"
        done.append((step, status, time.perf_counter() - t0))
        if status != "ok" and not keep_going:
            break
    return done


def promised_outputs(command: str) -> list[str]:
    """What an ``lmpress`` line says it writes: its ``-o`` path and the paths its comment shows
    after ``->`` (``# -> out/q4.gguf``)."""
    if not command.startswith(("lmpress ", "torchrun ")):
        return []
    code, _, comment = command.partition("  #")
    return re.findall(r"(?:^| )-o (\S+)", code) + re.findall(r"-> (out/[\w./-]+)", comment)


def _check(done: list[tuple[Step, str, float]]) -> None:
    timings = "\n".join(f"{s:7.1f} s  README:{step.line}  {step.text.splitlines()[0][:90]}" for step, _, s in done)
    print(f"\n{timings}\n{sum(s for *_, s in done):7.1f} s in all")
    for step, status, _ in done:
        if status.startswith("failed"):
            pytest.fail(f"README.md line {step.line}: {step.text}\n{status}")


@pytest.mark.slow
def test_readme_runs_as_written(tmp_path: Path) -> None:
    """Every README command in order, in a fresh directory."""
    _user_files(tmp_path)
    steps = readme_steps(README.read_text(encoding="utf-8"))
    _check(run_steps(steps, tmp_path))


def test_readme_first_use_lines_run(tmp_path: Path) -> None:
    """The default suite's share: the first lines of the Use block (evaluate, compress, compare)."""
    steps = [s for s in readme_steps(README.read_text(encoding="utf-8")) if not skip_reason(s)]
    first = [s for s in steps if s.text.startswith("lmpress ")][:3]
    assert [s.text.split()[1] for s in first] == ["eval", "compress", "eval"]
    _check(run_steps(first, tmp_path))
    assert (tmp_path / "out" / "bf16" / "lmpress.json").is_file()


def test_readme_steps_are_parsed_and_skips_are_named() -> None:
    """Every skipped line is skipped for a reason in SKIPPED, and every pattern there still matches
    a README line (a stale entry would hide a new command)."""
    steps = readme_steps(README.read_text(encoding="utf-8"))
    assert any(s.kind == "python" for s in steps)
    assert any("<<'YAML'" in s.text and s.text.rstrip().endswith("YAML") for s in steps)  # a here-document whole
    for pattern in SKIPPED:
        assert any(re.search(pattern, s.text.strip()) for s in steps), f"SKIPPED entry {pattern!r} matches no line"
    assert "lmpress report lmpress-runs/* -o report.html" in [s.text for s in steps]  # the tour's inline commands


def test_mlflow_ui_extra() -> None:
    """`mlflow ui` needs the full mlflow (a Flask server); lmpress depends on mlflow-skinny only, so the
    README installs the `mlflow-ui` extra first, which names it."""
    import tomllib

    pyproject = tomllib.loads((README.parent / "pyproject.toml").read_text(encoding="utf-8"))
    extra = pyproject["project"]["optional-dependencies"]["mlflow-ui"]
    assert any(re.fullmatch(r"mlflow\s*(>=.*)?", req) for req in extra), extra
    assert "pip install 'lmpress[mlflow-ui]'" in README.read_text(encoding="utf-8")
    import importlib.util

    if importlib.util.find_spec("flask") is not None:  # the extra is installed here: the server imports
        import mlflow.server

        assert mlflow.server.app is not None


def test_quick_setting_sets_default_windows_and_caps_trials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The README's quick setting: the default windows come from the environment when an options
    object is made (a flag still wins), search trials are capped, and a bad value is one line."""
    from typer.testing import CliRunner

    from lmpress.cli import app
    from lmpress.cli.search import _capped_trials
    from lmpress.data_options import DataOptions
    from lmpress.errors import DataError

    for var in QUICK:
        monkeypatch.delenv(var, raising=False)
    assert (DataOptions().eval_windows, DataOptions().calib_windows, _capped_trials(30)) == (64, 128, 30)
    for var, value in QUICK.items():
        monkeypatch.setenv(var, value)
    assert (DataOptions().eval_windows, DataOptions().calib_windows) == (8, 16)
    assert DataOptions(eval_windows=64, calib_windows=256).calib_windows == 256  # `--calib-windows 256` wins
    assert (_capped_trials(30), _capped_trials(1)) == (2, 1)
    assert (DataOptions.eval_windows, DataOptions.calib_windows) == (64, 128)  # what --help shows
    monkeypatch.setenv("LMPRESS_MAX_WINDOWS", "eight")
    with pytest.raises(DataError, match="LMPRESS_MAX_WINDOWS must be a whole number of windows >= 1, got 'eight'"):
        DataOptions()
    r = CliRunner().invoke(app, ["demo", "--presets", "w8", "--out-dir", str(tmp_path / "d"), "--no-track"])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "LMPRESS_MAX_WINDOWS" in r.output, r.output
    assert not (tmp_path / "d").exists()
