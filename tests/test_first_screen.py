"""What a newcomer sees first: the demo in an 80-column terminal prints no warnings, no blank
lines, and a table that fits; library calls show no transformers bars; every command's help fits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lmpress.cli import app, demo_table

MAIN = "from lmpress.cli import main; main()"


def _lmpress(*args: str, cwd: Path, columns: int = 80) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": str(columns), "OMP_NUM_THREADS": "1", "LMPRESS_TRACK": "0"}
    env.pop("PYTHONWARNINGS", None)
    return subprocess.run(
        [sys.executable, "-c", MAIN, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_the_demo_prints_no_warning_no_blank_line_and_fits_80_columns(tmp_path: Path) -> None:
    r = _lmpress("demo", "--presets", "w8,sparse50", "--max-windows", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    text = r.stdout + r.stderr
    assert "Warning" not in text and "warning" not in text, text
    lines = text.rstrip("\n").split("\n")
    assert all(line.strip() for line in lines), text  # no empty lines
    assert max(len(line.rstrip()) for line in lines) <= 80, text
    assert "INFO" not in text and "not streaming" not in text
    assert "w8 (1/2)" in r.stderr and "sparse50 (2/2)" in r.stderr
    table = [line for line in r.stdout.split("\n") if line.startswith(("original", "w8", "sparse50"))]
    assert len(table) == 3
    bits = {line.split()[0]: float(line.split()[2]) for line in table}
    assert bits["sparse50"] < bits["original"]  # pruned weights count: the model did not grow


def test_demo_table_fits_80_columns_with_the_widest_numbers() -> None:
    from rich.console import Console

    row = {
        "name": "gguf-q4_k_m",
        "bytes_on_disk": 123.45e6,
        "bits_per_weight": 16.01,
        "perplexity": 1234.567,
        "kl": 1.2345,
        "top1_agreement": 1.0,
        "prefill_tokens_per_s": 123456.0,
        "decode_tokens_per_s": 12345.0,
        "seconds": 1234.5,
    }
    console = Console(width=80, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(demo_table([row, row]))
    lines = console.export_text().rstrip("\n").split("\n")
    assert max(len(line.rstrip()) for line in lines) <= 80
    assert all(line.strip() for line in lines)


def test_sparse_bits_per_weight_count_the_pruned_weights() -> None:
    import lmpress
    from lmpress.evaluation import count_parameters, size
    from tests.export.helpers import compress

    dense = lmpress.load("builtin", device="cpu").model
    sparse = compress([{"method": "magnitude", "sparsity": 0.5, "storage": "sparse"}]).model
    n, kept, whole = count_parameters(dense), count_parameters(sparse), count_parameters(sparse, dense=True)
    assert whole == n and kept < 0.8 * n
    m = size(sparse)
    assert m["bits_per_weight"] == pytest.approx(8 * m["bytes"] / whole)
    assert m["bits_per_kept_weight"] == pytest.approx(8 * m["bytes"] / kept)
    assert "bits_per_kept_weight" not in size(dense)


def test_library_calls_show_no_transformers_bars(tmp_path: Path) -> None:
    code = (
        "import lmpress\n"
        "m = lmpress.load('builtin')\n"
        "lmpress.save(m.model, m.tokenizer, __import__('pathlib').Path('out'))\n"
        "lmpress.load('out')\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "Loading weights" not in r.stderr and "Writing" not in r.stderr, r.stderr
    assert r.stderr.strip() == "", r.stderr


def test_train_reference_json(tmp_path: Path) -> None:
    out = tmp_path / "ref"
    args = ["train-reference", "-o", str(out), "--tokens", "16384", "--card-windows", "2", "--threads", "1"]
    r = CliRunner().invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["output"] == str(out) and info["steps"] == 2 and info["train_tokens"] == 16384
    assert 3.5 < info["card"]["eval"]["nll"] < 9


COMMANDS = ["eval", "compress", "export", "train-reference", "methods", "presets", "demo", "report", "search"]


@pytest.mark.parametrize("command", [None, *COMMANDS, "inspect", "federated", "imatrix"])
def test_help_fits_80_columns(command: str | None, tmp_path: Path) -> None:
    r = CliRunner().invoke(app, [*([command] if command else []), "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert r.exit_code == 0, r.output
    assert max(len(line.rstrip()) for line in r.output.split("\n")) <= 80, r.output
