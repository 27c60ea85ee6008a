"""The command line: every metric on every family, and one clear line with exit code 2 on bad input."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lmpress.cli import app
from tests.conftest import TINY_ARCHS

runner = CliRunner()
METRIC_LABELS = (
    "perplexity",
    "next-token accuracy",
    "parameters",
    "bytes on disk",
    "bits per weight",
    "prefill tokens/s (batch 1)",
    "prefill tokens/s (batch 8)",
    "decode tokens/s (batch 1)",
    "peak memory",
)


def run(*args: str | Path) -> object:
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_eval_every_family(arch: str, tiny_model_dir: Callable[..., Path], text_file: Path) -> None:
    path = tiny_model_dir(arch)
    r = run("eval", path, "--reference", path, "--data", text_file, "--seq-len", "64", "--max-windows", "4")
    assert r.exit_code == 0, r.output  # type: ignore[attr-defined]
    for label in (*METRIC_LABELS, "KL vs reference", "top-1 agreement"):
        assert label in r.stdout, label  # type: ignore[attr-defined]
    assert "100.00%" in r.stdout  # type: ignore[attr-defined]  # agreement with itself


def test_eval_json(tiny_model_dir: Callable[..., Path], text_file: Path) -> None:
    r = run(
        "eval",
        tiny_model_dir("llama"),
        "--data",
        text_file,
        "--seq-len",
        "32",
        "--max-windows",
        "2",
        "--no-speed",
        "--json",
    )
    assert r.exit_code == 0, r.output  # type: ignore[attr-defined]
    out = json.loads(r.stdout)  # type: ignore[attr-defined]
    assert out["metrics"]["eval_tokens"] == 2 * 31
    assert out["data"]["windows"] == 2 and len(out["data"]["sha256"]) == 64


def test_compress_then_eval(tiny_model_dir: Callable[..., Path], text_file: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - method: cast\n    dtype: float16\n")
    out = tmp_path / "out"
    r = run(
        "compress",
        tiny_model_dir("gpt2"),
        "-r",
        recipe,
        "-o",
        out,
        "--data",
        text_file,
        "--seq-len",
        "64",
        "--max-windows",
        "2",
        "--no-speed",
    )
    assert r.exit_code == 0, r.output  # type: ignore[attr-defined]
    assert "saved to" in r.stdout and (out / "lmpress.json").is_file()  # type: ignore[attr-defined]
    r = run("eval", out, "--data", text_file, "--seq-len", "64", "--max-windows", "2", "--no-speed")
    assert r.exit_code == 0, r.output  # type: ignore[attr-defined]


def test_methods_and_presets() -> None:
    assert "cast" in run("methods").stdout  # type: ignore[attr-defined]
    assert "bf16" in run("presets").stdout  # type: ignore[attr-defined]


def _bad_inputs(tmp_path: Path, model: Path, text_file: Path, other: Path) -> dict[str, tuple[list[str | Path], str]]:
    (tmp_path / "noconf").mkdir()
    (tmp_path / "arch").mkdir()
    (tmp_path / "arch" / "config.json").write_text('{"model_type": "mamba9"}')
    (tmp_path / "bad.yaml").write_text("stages: [\n")
    (tmp_path / "key.yaml").write_text("stages:\n  - method: cast\n    bits: 4\n")
    (tmp_path / "regex.yaml").write_text("stages:\n  - method: rtn\n    ignore: ['re:((']\n")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("x = 1\ny = 2\nz = 3\n")
    full = tmp_path / "full"
    full.mkdir()
    (full / "precious").write_text("keep")
    out = ["-o", tmp_path / "new"]
    return {
        "missing model": (["eval", tmp_path / "nope/model"], "does not exist"),
        "no config": (["eval", tmp_path / "noconf"], "has no config.json"),
        "unknown arch": (["eval", tmp_path / "arch"], "unknown architecture 'mamba9'"),
        "unknown builtin": (["eval", "gpt5"], "neither a model directory nor a built-in model"),
        "not yaml": (["compress", model, "-r", tmp_path / "bad.yaml", *out], "not valid YAML"),
        "unknown key": (["compress", model, "-r", tmp_path / "key.yaml", *out], "stage 1 (cast): unknown key 'bits'"),
        "unknown recipe": (["compress", model, "-r", "w17", *out], "is not a preset"),
        "bad regex": (["compress", model, "-r", tmp_path / "regex.yaml", *out], "invalid regex 're:(('"),
        "absolute pattern": (["eval", model, "--data", tmp_path, "--pattern", "/etc/*"], "not a relative glob"),
        "binary jsonl": (["eval", model, "--data", tmp_path / "bin.jsonl"], "is not UTF-8 text"),
        "vocab mismatch": (["eval", model, "--reference", other, "--data", text_file], "has a vocabulary of"),
        "no cuda": (["eval", model, "--device", "cuda:3"], "CUDA is not available"),
        "output is cwd": (["compress", model, "-r", "bf16", "-o", "."], "current directory"),
        "unwritable output": (["compress", model, "-r", "bf16", "-o", "/proc/lmpress-out"], "not a writable directory"),
        "empty data": (["eval", model, "--data", tmp_path / "empty.txt"], "has no text"),
        "short data": (["eval", model, "--data", tmp_path / "short.txt"], "fewer than one window"),
        "missing data": (["eval", model, "--data", tmp_path / "none.txt"], "does not exist"),
        "output not empty": (["compress", model, "-r", "bf16", "-o", full], "exists and is not empty"),
    }


def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    tiny_model_dir: Callable[..., Path], text_file: Path, tmp_path: Path
) -> None:
    model = tiny_model_dir("llama")
    other = _other_vocab(tmp_path)
    before = sorted(p.name for p in model.iterdir())
    for case, (args, message) in _bad_inputs(tmp_path, model, text_file, other).items():
        r = run(*args)
        assert r.exit_code == 2, (case, r.output)  # type: ignore[attr-defined]
        err = r.stderr.strip()  # type: ignore[attr-defined]
        assert message in err, (case, err)
        assert len(err.splitlines()) == 1 and "Traceback" not in err, (case, err)
    assert not (tmp_path / "new").exists()
    assert (tmp_path / "full" / "precious").read_text() == "keep"
    assert sorted(p.name for p in model.iterdir()) == before


def _other_vocab(tmp_path: Path) -> Path:
    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_config

    path = tmp_path / "other-vocab"
    AutoModelForCausalLM.from_config(tiny_config("llama", 300)).save_pretrained(path)
    return path


def test_split_must_be_a_known_name(tiny_model_dir: Callable[..., Path]) -> None:
    r = run("eval", tiny_model_dir("llama"), "--split", "test")
    assert r.exit_code == 2 and "'test' is not one of" in r.output  # type: ignore[attr-defined]


def test_pickle_refused_by_cli(tiny_model_dir: Callable[..., Path], tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    path = tiny_model_dir("llama")
    torch.save(load_file(path / "model.safetensors"), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    r = run("eval", path)
    assert r.exit_code == 2 and "--allow-pickle" in r.stderr  # type: ignore[attr-defined]


def test_train_reference_end_to_end(tmp_path: Path) -> None:
    """A few steps of the real training command: checkpoint, tokenizer, card, and a clean reload."""
    out = tmp_path / "ref"
    r = run("train-reference", "-o", out, "--tokens", "16384", "--card-windows", "4", "--threads", "1")
    assert r.exit_code == 0, r.output  # type: ignore[attr-defined]
    info = json.loads((out / "training.json").read_text())
    assert info["steps"] == 2 and info["train_tokens"] == 16384
    assert info["parameters"] > 4_000_000 and 3.5 < info["card"]["eval"]["nll"] < 9
    assert "perplexity" in (out / "README.md").read_text()
    assert set(info["card"]["rtn_g128"]) == {"4", "3", "2"}
    again = run("train-reference", "-o", out, "--tokens", "16384")
    assert again.exit_code == 2 and "--overwrite" in again.stderr  # type: ignore[attr-defined]
