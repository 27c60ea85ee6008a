"""Saved directories: atomic, self-describing, and exact on reload."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lmpress.errors import ModelLoadError, OutputError
from lmpress.io import atomic_dir, save
from lmpress.models.loading import load_model


def _logits(model: torch.nn.Module, n: int = 64) -> torch.Tensor:
    ids = torch.arange(n)[None] % 200
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_save_and_reload_exact(tiny_model_dir: Callable[..., Path], tmp_path: Path) -> None:
    loaded = load_model(tiny_model_dir("gpt2"))
    out = save(loaded.model, loaded.tokenizer, tmp_path / "out", {"recipe": {"name": "x"}})
    meta = json.loads((out / "lmpress.json").read_text())
    assert meta["format_version"] == 1 and meta["recipe"] == {"name": "x"}
    assert meta["modules"]["transformer.h.0.attn.c_attn"] == {"format": "dense", "dtype": "float32"}
    assert meta["bytes_on_disk"] == (out / "model.safetensors").stat().st_size
    assert {"torch", "transformers", "lmpress"} <= set(meta["versions"])
    again = load_model(out)
    assert again.meta["recipe"] == {"name": "x"}
    assert torch.equal(_logits(loaded.model), _logits(again.model))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_non_empty_output_refused_unless_overwrite(tiny_model_dir: Callable[..., Path], tmp_path: Path) -> None:
    loaded = load_model(tiny_model_dir("llama"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="exists and is not empty; choose another or pass --overwrite"):
        save(loaded.model, loaded.tokenizer, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    save(loaded.model, loaded.tokenizer, out, overwrite=True)
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()


def test_interrupt_while_saving_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt), atomic_dir(out) as tmp:
        (tmp / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_interrupt_during_overwrite_keeps_the_old_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_dir(out, overwrite=True):
        raise KeyboardInterrupt
    assert (out / "old.txt").read_text() == "old"


def test_newer_format_is_refused(tiny_model_dir: Callable[..., Path], tmp_path: Path) -> None:
    loaded = load_model(tiny_model_dir("llama"))
    out = save(loaded.model, loaded.tokenizer, tmp_path / "out")
    meta = json.loads((out / "lmpress.json").read_text())
    (out / "lmpress.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ModelLoadError, match="lmpress format 99"):
        load_model(out)
