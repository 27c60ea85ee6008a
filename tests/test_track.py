"""Run directories and MLflow: a run logged by lmpress is found by MLflow's own client with its
metrics, parameters and artifacts; tracking off writes nothing; failures lose nothing."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from lmpress.cli import app

runner = CliRunner()


def run(*args: str | Path) -> object:
    return runner.invoke(app, [str(a) for a in args])


def _compress(src: Path, text_file: Path, *extra: str | Path) -> object:
    return run(
        "compress", src, "-r", "w8", "--data", text_file, "--seq-len", "32", "--max-windows", "4",
        "--calib-windows", "4", "--no-speed", "--samples", "2", *extra,
    )  # fmt: skip


def test_a_compress_run_is_found_by_mlflow_with_its_metrics(
    tiny_model_dir: Callable[..., Path], text_file: Path, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    r = _compress(tiny_model_dir("llama"), text_file, "--track", "--runs-dir", runs, "--json")
    assert r.exit_code == 0, r.output  # type: ignore[attr-defined]
    out = json.loads(r.stdout)  # type: ignore[attr-defined]
    run_dir = Path(out["run_dir"])
    assert run_dir.parent == runs and (run_dir / "recipe.yaml").is_file()
    record = json.loads((run_dir / "run.json").read_text())
    assert record["command"] == "compress" and record["recipe"]["name"] == "w8"
    assert len(record["samples"]["prompts"]) == 2 and len(record["samples"]["compressed"]) == 2
    assert record["versions"]["lmpress"]
    client = MlflowClient(f"sqlite:///{runs.resolve() / 'mlflow.db'}")  # MLflow's own client, not lmpress
    exp = client.get_experiment_by_name("lmpress")
    assert exp is not None
    (found,) = client.search_runs([exp.experiment_id])
    assert found.info.run_id == record["mlflow"]["run_id"]
    ppl = record["metrics"]["compressed"]["perplexity"]
    assert found.data.metrics["compressed.perplexity"] == pytest.approx(ppl)
    assert found.data.metrics["original.perplexity"] == pytest.approx(record["metrics"]["original"]["perplexity"])
    assert found.data.params["stage1.method"] == "rtn" and found.data.params["stage1.bits"] == "8"
    artifacts = {a.path for a in client.list_artifacts(found.info.run_id)}
    assert {"run.json", "recipe.yaml"} <= artifacts


def test_eval_runs_are_recorded_too_and_tracking_off_writes_nothing(
    tiny_model_dir: Callable[..., Path], text_file: Path, tmp_path: Path
) -> None:
    src = tiny_model_dir("gpt2")
    runs = tmp_path / "runs"
    r = run("eval", src, "--data", text_file, "--seq-len", "32", "--max-windows", "2", "--no-speed",
            "--track", "--runs-dir", runs)  # fmt: skip
    assert r.exit_code == 0, r.output  # type: ignore[attr-defined]
    (run_dir,) = [p for p in runs.iterdir() if p.is_dir() and "-eval-" in p.name]
    assert json.loads((run_dir / "run.json").read_text())["metrics"]["evaluated"]["perplexity"] > 1
    quiet = tmp_path / "quiet"
    r = _compress(src, text_file, "--no-track", "--runs-dir", quiet)
    assert r.exit_code == 0 and not quiet.exists()  # type: ignore[attr-defined]


def test_a_failed_compression_leaves_no_run_and_a_broken_store_loses_nothing(
    tiny_model_dir: Callable[..., Path], text_file: Path, tmp_path: Path
) -> None:
    src = tiny_model_dir("llama")
    runs = tmp_path / "runs"
    bad_data = tmp_path / "missing.txt"
    r = _compress(src, bad_data, "--track", "--runs-dir", runs)
    assert r.exit_code == 2 and "does not exist" in r.output  # type: ignore[attr-defined]
    assert not runs.exists() or not any(p.is_dir() for p in runs.iterdir())
    out = tmp_path / "model"
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a store inside a file cannot be created
    r = _compress(src, text_file, "--track", "--runs-dir", runs, "--tracking-uri", f"sqlite:///{blocker}/db", "-o", out)
    assert r.exit_code == 0, r.output  # type: ignore[attr-defined]
    assert (out / "lmpress.json").is_file()
    (run_dir,) = [p for p in runs.iterdir() if p.is_dir()]
    assert "mlflow" not in json.loads((run_dir / "run.json").read_text())
