"""Safe loading: built-in names, directories, and every kind of bad input."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmpress.errors import ModelLoadError
from lmpress.io.files import check_safetensors
from lmpress.io.load import load_model


def test_load_directory_with_tokenizer(tiny_model_dir: Callable[..., Path]) -> None:
    path = tiny_model_dir("llama")
    loaded = load_model(path, dtype="float32")
    assert loaded.tokenizer is not None and loaded.path == path
    assert next(loaded.model.parameters()).dtype == torch.float32
    assert not loaded.model.training
    bf16 = load_model(path, dtype="bfloat16")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_unknown_builtin_name() -> None:
    with pytest.raises(ModelLoadError, match="neither a model directory nor a built-in model; built-in names: builtin"):
        load_model("tinyllama")


def test_file_not_directory(text_file: Path) -> None:
    with pytest.raises(ModelLoadError, match="not a directory"):
        load_model(text_file)


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_model(tmp_path)


def test_unknown_architecture(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba9"}))
    with pytest.raises(ModelLoadError, match="unknown architecture 'mamba9'"):
        load_model(tmp_path)


def test_bad_config_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json is not valid JSON"):
        load_model(tmp_path)


def test_truncated_safetensors(tiny_model_dir: Callable[..., Path]) -> None:
    path = tiny_model_dir("llama")
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        load_model(path)
    f.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ModelLoadError, match="not a valid safetensors file"):
        check_safetensors(f)
    f.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="not a valid safetensors file"):
        check_safetensors(f)


def test_pickle_checkpoint_needs_the_flag(tiny_model_dir: Callable[..., Path]) -> None:
    path = tiny_model_dir("gpt2")
    state = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    torch.save(state, path / "pytorch_model.bin")
    before = sorted(p.name for p in path.iterdir())
    with pytest.raises(ModelLoadError, match="pickle weights.*--allow-pickle"):
        load_model(path)
    assert sorted(p.name for p in path.iterdir()) == before  # input untouched
    loaded = load_model(path, allow_pickle=True)
    torch.testing.assert_close(loaded.model.state_dict()["transformer.wte.weight"], state["transformer.wte.weight"])


def test_no_weights(tiny_model_dir: Callable[..., Path], tmp_path: Path) -> None:
    path = tiny_model_dir("llama")
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(path / "config.json", empty)
    with pytest.raises(ModelLoadError, match="has no weights"):
        load_model(empty)


def test_bad_device_and_dtype(tiny_model_dir: Callable[..., Path]) -> None:
    path = tiny_model_dir("llama")
    with pytest.raises(ModelLoadError, match="unknown dtype 'int3'"):
        load_model(path, dtype="int3")
    with pytest.raises(ModelLoadError, match="unknown device 'tpu'"):
        load_model(path, device="tpu")
