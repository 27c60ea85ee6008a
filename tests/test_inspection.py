"""`lmpress inspect`: what a directory or exported file holds, read from its files without loading
the weights, and checked against the loaded model's own counts."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

import lmpress
from lmpress.cli import app
from lmpress.evaluation import count_parameters
from lmpress.inspection import inspect_model
from lmpress.io import weight_bytes

runner = CliRunner()


@pytest.fixture(scope="module")
def w4_sparse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("inspect") / "w4s"
    stages = [
        {"method": "sparsegpt", "sparsity": 0.5, "pattern": "2:4", "bits": 4, "group_size": 128},
        {"method": "rtn", "bits": 8, "targets": ["lm_head"], "ignore": []},
    ]
    lmpress.compress("builtin", {"name": "mine", "stages": stages}, lmpress.DataOptions(calib_windows=8), output=out)
    return out


def test_an_lmpress_directory(w4_sparse: Path) -> None:
    found = inspect_model(w4_sparse)
    model = lmpress.load(w4_sparse, device="cpu").model
    assert found.kind == "lmpress"
    assert found.parameters == count_parameters(model, dense=True)
    assert found.kept_parameters == count_parameters(model)
    assert found.bytes_on_disk == weight_bytes(w4_sparse)
    assert 0.99 * found.bytes_on_disk < sum(g.bytes for g in found.formats) <= found.bytes_on_disk
    groups = {g.format: g for g in found.formats}
    sparse = groups["sparse 2:4 + int4 g128"]
    assert sparse.modules == 4 * 7 and sparse.kept == sparse.weights // 2
    assert 1.5 < sparse.bits_per_weight < 3.5  # 4-bit codes of half the weights, plus the 2:4 indices
    head = groups["int8 per-channel sym"] if "int8 per-channel sym" in groups else groups["int8 g128 asym"]
    assert head.modules == 1 and head.weights == 4096 * 256
    assert groups["dense bfloat16"].modules == 1 + 4 * 2 + 1  # embeddings and norms
    assert found.architecture["layers"] == 4 and found.architecture["vocab"] == 4096
    assert found.meta["recipe"]["name"] == "mine" and [s["method"] for s in found.meta["stages"]] == [
        "sparsegpt",
        "rtn",
    ]
    # the record carries the size of the files it was saved as
    recorded = found.meta["metrics"]["compressed"]
    assert recorded["bytes_on_disk"] == found.bytes_on_disk
    assert recorded["bits_per_weight"] == pytest.approx(found.bits_per_weight)


def test_cli_table_and_json(w4_sparse: Path) -> None:
    r = runner.invoke(app, ["inspect", str(w4_sparse)], env={"COLUMNS": "80"}, terminal_width=80)
    assert r.exit_code == 0, r.output
    for text in ("lmpress directory", "sparse 2:4 + int4 g128", "recipe: mine", "stage 1 sparsegpt", "calibrated on"):
        assert text in r.output, text
    assert max(len(line.rstrip()) for line in r.output.split("\n")) <= 80
    r = runner.invoke(app, ["inspect", str(w4_sparse), "--json"])
    data = json.loads(r.stdout)
    assert data["parameters"] == sum(f["weights"] for f in data["formats"])
    assert data["bits_per_weight"] == pytest.approx(8 * data["bytes_on_disk"] / data["parameters"])
    assert "stages" in data and "modules" not in data


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_hugging_face_directory(arch: str, tiny_model_dir: Callable[..., Path]) -> None:
    path = tiny_model_dir(arch)
    found = inspect_model(path)
    model = lmpress.load(path, device="cpu").model
    assert found.kind == "huggingface" and found.architecture["model_type"] == arch
    assert found.parameters == count_parameters(model)
    assert [g.format for g in found.formats] == [f"dense {next(model.parameters()).dtype}".replace("torch.", "")]


def test_bad_input_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "fake.gguf").write_bytes(b"nope")
    for target, message in ((tmp_path / "none", "does not exist"), (tmp_path / "fake.gguf", "GGUF")):
        r = runner.invoke(app, ["inspect", str(target)])
        assert r.exit_code == 2 and message in r.output and r.output.count("\n") == 1, r.output


@pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="needs gguf")
def test_a_gguf_file(tmp_path: Path) -> None:
    from lmpress.export import export

    path = tmp_path / "q.gguf"
    model = lmpress.load("builtin", device="cpu")
    export(model, "gguf", path)
    found = inspect_model(path)
    assert found.kind == "gguf" and found.architecture["model_type"] == "llama"
    assert found.architecture["layers"] == 4 and found.architecture["vocab"] == 4096
    assert found.parameters == count_parameters(model.model)
    assert found.bytes_on_disk == path.stat().st_size
    r = runner.invoke(app, ["inspect", str(path)])
    assert r.exit_code == 0 and "GGUF file" in r.output and "GGUF BF16" in r.output, r.output


@pytest.mark.skipif(importlib.util.find_spec("onnx") is None, reason="needs lmpress[onnx]")
def test_an_onnx_directory(tmp_path: Path) -> None:
    from lmpress.export import export
    from tests.export.helpers import compress

    loaded = compress([{"method": "rtn", "bits": 4, "group_size": 32}])
    out = tmp_path / "w4-onnx"
    export(loaded, "onnx", out)
    found = inspect_model(out)
    groups = {g.format: g for g in found.formats}
    assert found.kind == "onnx"
    nbits = groups["MatMulNBits int4 b32"]
    assert nbits.modules == 4 * 7 and nbits.weights == sum(
        m.in_features * m.out_features for m in loaded.model.modules() if type(m).__name__ == "QuantLinear"
    )
    assert 4.0 < nbits.bits_per_weight < 5.5
    # the graph also holds float tables that are not parameters (the rotary frequencies)
    assert found.parameters == pytest.approx(count_parameters(loaded.model), rel=1e-4)
