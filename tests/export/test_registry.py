"""Exporters behind one interface: every registered format has it, the CLI's help lists exactly the
registered formats, and a format is one module plus one registration line: a fake ``npz`` format
registered here is written by ``lmpress export`` and ``compress --export``, loaded back for
``lmpress eval`` and read by ``lmpress inspect``, with no other change."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import typer
from torch import nn
from typer.testing import CliRunner

import lmpress
from lmpress.cli import app
from lmpress.errors import ExportError, LmpressError
from lmpress.export import EXPORTERS, export
from lmpress.export.base import Contents, Exporter, ExportOptions
from lmpress.export.registry import exporter, exporter_for
from lmpress.io import LoadedModel, load_model

runner = CliRunner()


class NpzReport:
    def __init__(self, path: Path, tensors: dict[str, np.ndarray]) -> None:
        self.path, self.tensors = path, tensors

    def to_dict(self) -> dict[str, Any]:
        types: dict[str, int] = {}
        for a in self.tensors.values():
            types[str(a.dtype)] = types.get(str(a.dtype), 0) + 1
        return {"format": "npz", "path": str(self.path), "bytes": self.path.stat().st_size, "types": types}


class NpzExporter(Exporter):
    """The state dict as one numpy archive; it loads back into the built-in model's architecture."""

    name = "npz"
    help = "numpy"
    artifact = "numpy archive"
    suffix = ".npz"
    runtime = "numpy"

    def write(self, model: nn.Module, tokenizer: Any, path: Path, options: ExportOptions) -> NpzReport:
        tensors = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
        with path.open("wb") as f:
            np.savez(f, **tensors)
        return NpzReport(path, tensors)

    def recognizes(self, source: str | Path) -> bool:
        return str(source).endswith(self.suffix)

    def load_back(self, path: Path, tokenizer: str | Path | None = None) -> LoadedModel:
        base = load_model("builtin", device="cpu")
        with np.load(path) as arrays:
            state = {k: torch.from_numpy(arrays[k]) for k in arrays.files}
        base.model.load_state_dict(state)
        return LoadedModel(base.model, base.tokenizer, str(path), path)

    def contents(self, path: Path) -> Contents:
        with np.load(path) as arrays:
            rows = [(f"npz {arrays[k].dtype}", arrays[k].size, arrays[k].size, arrays[k].nbytes) for k in arrays.files]
        return Contents(rows, path.stat().st_size, {"model_type": "npz"})


@pytest.fixture
def npz(monkeypatch: pytest.MonkeyPatch) -> Exporter:
    fake = NpzExporter()
    monkeypatch.setitem(EXPORTERS, fake.name, fake)  # the one registration line
    return fake


@pytest.mark.parametrize("name", list(EXPORTERS))
def test_every_exporter_has_the_interface(name: str) -> None:
    e = EXPORTERS[name]
    assert isinstance(e, Exporter) and e.name == name and exporter(name) is e
    assert e.help and e.artifact and isinstance(e.file_suffixes, tuple)
    assert e.suffix == "" or (e.suffix.startswith(".") and e.writes_file)
    assert e.package is None or (len(e.package) == 2 and all(isinstance(p, str) for p in e.package))
    if e.runtime is not None:  # an artifact lmpress runs elsewhere: it is recognized, loaded back and read
        for hook in ("recognizes", "load_back", "contents"):
            assert getattr(type(e), hook) is not getattr(Exporter, hook), (name, hook)
    e.check(ExportOptions())  # the default options are always accepted


def test_registry_finds_exports_by_what_they_are(tmp_path: Path) -> None:
    assert exporter_for(tmp_path / "m.gguf") is EXPORTERS["gguf"]
    (tmp_path / "graph").mkdir()
    (tmp_path / "graph" / "model.onnx").write_bytes(b"")
    assert exporter_for(tmp_path / "graph") is EXPORTERS["onnx"]
    assert exporter_for("builtin") is None and exporter_for(tmp_path) is None
    with pytest.raises(ExportError, match="unknown export format 'x'; choose one of gguf, compressed-tensors, onnx"):
        exporter("x")


def _option_help(command: str, option: str) -> str:
    group = typer.main.get_command(app)
    cmd = group.commands[command]  # type: ignore[attr-defined]
    return next(p.help for p in cmd.params if option in p.opts)  # type: ignore[attr-defined]


def test_cli_help_lists_exactly_the_registered_formats() -> None:
    names = list(EXPORTERS)
    to = _option_help("export", "--to")
    assert re.findall(r"(?:^format: |\), )([\w-]+) \(", to) == names, to
    beside = _option_help("compress", "--export")
    assert re.findall(r"(?:: |\), )([\w-]+) \(OUT", beside) == names, beside
    output = _option_help("export", "--output")
    files = [e.name for e in EXPORTERS.values() if not e.writes_file]
    assert output.endswith(f"directory ({', '.join(files)}) to write"), output


def test_a_registered_format_is_exported_loaded_back_and_inspected(npz: Exporter, tmp_path: Path) -> None:
    out = tmp_path / "m.npz"
    r = runner.invoke(app, ["export", "builtin", "--to", "npz", "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    original = lmpress.load("builtin", device="cpu").model.state_dict()
    assert report["format"] == "npz" and report["bytes"] == out.stat().st_size
    assert report["types"] == {"float32": len(original)}
    with np.load(out) as arrays:
        assert sorted(arrays.files) == sorted(original)
        assert all(np.array_equal(arrays[k], v.float().numpy()) for k, v in original.items())

    args = ["--seq-len", "32", "--max-windows", "2", "--no-speed", "--json"]
    r = runner.invoke(app, ["eval", str(out), "--reference", "builtin", *args])
    assert r.exit_code == 0, r.output
    metrics = json.loads(r.stdout)
    assert metrics["metrics"]["nll"] == pytest.approx(metrics["reference_metrics"]["nll"], abs=1e-6)
    assert metrics["metrics"]["top1_agreement"] == 1.0

    r = runner.invoke(app, ["inspect", str(out), "--json"])
    assert r.exit_code == 0, r.output
    found = json.loads(r.stdout)
    assert found["kind"] == "npz" and found["architecture"] == {"model_type": "npz"}
    assert found["parameters"] == sum(v.numel() for v in original.values())
    assert [g["format"] for g in found["formats"]] == ["npz float32"]

    for args, msg in (  # what the registry refuses for it, as for any format
        (["export", "builtin", "--to", "npz", "-o", str(out)], "exists"),
        (["export", "builtin", "--to", "npz", "-o", str(tmp_path / "m.bin")], "should end in .npz"),
        (["export", str(out), "--to", "npz", "-o", str(tmp_path / "n.npz")], "already an export (it runs in numpy)"),
        (["export", "builtin", "--to", "npz", "-o", str(tmp_path / "n.npz"), "--requantize", "q4_k"], "GGUF types"),
    ):
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, (args, r.output)
    with pytest.raises(LmpressError, match="runs in numpy, not in PyTorch"):
        lmpress.compress(out, "bf16")


def test_compress_export_writes_a_registered_format_beside_the_directory(npz: Exporter, tmp_path: Path) -> None:
    out = tmp_path / "bf16"
    r = runner.invoke(app, ["compress", "-r", "bf16", "-o", str(out), "--export", "npz", "--no-eval", "--json"])
    assert r.exit_code == 0, r.output
    exported = json.loads(r.stdout)["export"]
    assert exported["path"] == str(tmp_path / "bf16.npz") and (out / "lmpress.json").is_file()
    saved = lmpress.load(out, device="cpu").model.state_dict()
    assert exported["types"] == {"float32": len(saved)}


def test_the_api_exports_a_loaded_model_in_a_registered_format(npz: Exporter, tmp_path: Path) -> None:
    loaded = lmpress.load("builtin", device="cpu")
    report = export(loaded, "npz", tmp_path / "m.npz")
    back = lmpress.load(tmp_path / "m.npz")
    assert back.source == str(tmp_path / "m.npz") and report.to_dict()["bytes"] == (tmp_path / "m.npz").stat().st_size
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(back.model.state_dict()[k], v.float()), k
