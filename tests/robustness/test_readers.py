"""Every reader is total: a hostile ``lmpress.json``, GGUF file, ONNX graph, pickle checkpoint,
tokenizer or config is one ``error:`` line with exit code 2, no traceback and nothing written.

Each case builds its bad file from a good one (the session's tiny Llama, one lmpress directory
compressed from it per module, a small GGUF file written by `lmpress.formats.gguf_file`); the
Hypothesis properties at the end fuzz the two parsers (`read_meta`, `check_gguf`) directly.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmpress.errors import ModelLoadError
from lmpress.export.gguf_check import check_gguf
from lmpress.formats.gguf_file import F32, U32, TensorSpec, write_gguf
from lmpress.inspection import inspect_model
from lmpress.io.meta import read_meta
from tests.robustness.conftest import EVAL_FAST, assert_refused, lmpress, tree

# ---------------------------------------------------------------- lmpress.json


@pytest.fixture(scope="module")
def compressed_master(tmp_path_factory: pytest.TempPathFactory, tiny_master: Path) -> Path:
    """One lmpress directory (GPTQ W4) compressed from the tiny model, once per module."""
    from lmpress.cli import run

    out = tmp_path_factory.mktemp("readers") / "w4"
    args = ["compress", str(tiny_master), "-r", "w4", "-o", str(out), "--no-eval", "--quiet"]
    code = run([*args, "--calib-windows", "4", "--seq-len", "64", "--samples", "0"])
    assert code == 0 and (out / "lmpress.json").is_file()
    return out


@pytest.fixture
def lmdir(tmp_path: Path, compressed_master: Path) -> Path:
    """A fresh copy of the compressed directory (free to corrupt)."""
    return Path(shutil.copytree(compressed_master, tmp_path / "w4"))


def _meta(path: Path) -> dict[str, Any]:
    return json.loads((path / "lmpress.json").read_text())  # type: ignore[no-any-return]


def _a_quant_module(meta: dict[str, Any]) -> str:
    return next(n for n, f in meta["modules"].items() if f["format"] == "quant")


def _set(meta: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    return {**meta, key: value}


def _drop(meta: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if k != key}


def _module(meta: dict[str, Any], change: dict[str, Any] | None = None, drop: str | None = None) -> Any:
    name = _a_quant_module(meta)
    fmt = {k: v for k, v in meta["modules"][name].items() if k != drop}
    return {**meta, "modules": {**meta["modules"], name: {**fmt, **(change or {})}}}


# (case id, how to turn the good record into the bad one, text the error line must hold)
META_CASES: list[tuple[str, Any, str]] = [
    ("a list", lambda m: [m], "must hold a JSON object, got a list"),
    ("a string", lambda m: "lmpress", "must hold a JSON object, got a string"),
    ("null", lambda m: None, "got null"),
    ("modules a string", lambda m: _set(m, "modules", "model.layers"), "'modules' must be an object"),
    ("modules a list", lambda m: _set(m, "modules", [1, 2]), "'modules' must be an object"),
    ("no format_version", lambda m: _drop(m, "format_version"), "'format_version' must be an integer"),
    ("format_version a string", lambda m: _set(m, "format_version", "1"), "'format_version'"),
    ("format_version a float", lambda m: _set(m, "format_version", 1.5), "'format_version'"),
    ("format_version true", lambda m: _set(m, "format_version", True), "'format_version'"),
    ("format_version 0", lambda m: _set(m, "format_version", 0), "'format_version'"),
    ("format_version from the future", lambda m: _set(m, "format_version", 99), "reads up to 1"),
    ("a module entry not an object", lambda m: _module(m) | {"modules": {"x": 5}}, "module 'x'"),
    ("format not a string", lambda m: _module(m, {"format": 4}), "'format' must be a string"),
    ("format missing", lambda m: _module(m, drop="format"), "'format' must be a string"),
    ("bits a string", lambda m: _module(m, {"bits": "four"}), "'bits' must be an integer"),
    ("in_features a float", lambda m: _module(m, {"in_features": 1e300}), "'in_features' must be an integer"),
    ("bias a number", lambda m: _module(m, {"bias": 1}), "'bias' must be true or false"),
    ("scale_dtype a list", lambda m: _module(m, {"scale_dtype": ["float16"]}), "'scale_dtype' must be a string"),
    ("lora without a base", lambda m: _module(m, {"format": "lora"}), "'base'"),
    ("structure a string", lambda m: _set(m, "structure", "wide"), "'structure' must be a list"),
    ("structure of strings", lambda m: _set(m, "structure", ["x", "y"]), "'structure' block 0"),
    ("structure with negative widths", lambda m: _set(m, "structure", [{"mlp": -1}]), "'structure' block 0"),
    ("shared a list", lambda m: _set(m, "shared", [1]), "'shared' must be an object"),
    ("shared to a number", lambda m: _set(m, "shared", {"a.b": 3}), "'shared' 'a.b' must be a module name"),
    ("metrics a string", lambda m: _set(m, "metrics", "good"), "'metrics' must be an object"),
    ("a metric table a list", lambda m: _set(m, "metrics", {"compressed": [1]}), "'metrics' 'compressed'"),
    ("a metric a string", lambda m: _set(m, "metrics", {"compressed": {"perplexity": "low"}}), "metric"),
    ("recipe a list", lambda m: _set(m, "recipe", ["w4"]), "'recipe' must be an object"),
    ("recipe name a number", lambda m: _set(m, "recipe", {"name": 4}), "'recipe' 'name' must be a string"),
    ("stages an object", lambda m: _set(m, "stages", {"1": "gptq"}), "'stages' must be a list"),
    ("a stage a string", lambda m: _set(m, "stages", ["gptq"]), "'stages' item 0"),
    ("calibration a string", lambda m: _set(m, "calibration", "stdlib"), "'calibration' must be an object"),
    ("versions a list", lambda m: _set(m, "versions", ["1.0"]), "'versions' must be an object"),
    ("created a number", lambda m: _set(m, "created", 2024), "'created' must be a string"),
    ("bytes_on_disk negative", lambda m: _set(m, "bytes_on_disk", -5), "'bytes_on_disk'"),
]


def _args(command: str, lmdir: Path) -> tuple[str | Path, ...]:
    if command == "eval":
        return ("eval", lmdir, *EVAL_FAST)
    if command == "report":  # a saved model directory stands for its run
        return ("report", lmdir, "-o", lmdir.parent / "report.html")
    return (command, lmdir)


@pytest.mark.parametrize("command", ["inspect", "eval", "report"])
@pytest.mark.parametrize(("bad", "expect"), [(c[1], c[2]) for c in META_CASES], ids=[c[0] for c in META_CASES])
def test_bad_meta_record(capsys: pytest.CaptureFixture[str], lmdir: Path, command: str, bad: Any, expect: str) -> None:
    (lmdir / "lmpress.json").write_text(json.dumps(bad(_meta(lmdir))))
    before = tree(lmdir.parent)
    args = _args(command, lmdir)
    assert_refused(lmpress(capsys, *args), str(lmdir), expect, before=before, root=lmdir.parent)


META_BYTES = [
    ("not JSON", b"{'modules': }"),
    ("empty", b""),
    ("not UTF-8", b"\xff\xfe{\x00}"),
    ("nested too deep", b"[" * 100_000 + b"]" * 100_000),
    ("an integer of 10,000 digits", b'{"format_version": ' + b"9" * 10_000 + b"}"),
]


@pytest.mark.parametrize("command", ["inspect", "eval", "report"])
@pytest.mark.parametrize("content", [c[1] for c in META_BYTES], ids=[c[0] for c in META_BYTES])
def test_unreadable_meta_record(capsys: pytest.CaptureFixture[str], lmdir: Path, command: str, content: bytes) -> None:
    (lmdir / "lmpress.json").write_bytes(content)
    before = tree(lmdir.parent)
    args = _args(command, lmdir)
    assert_refused(lmpress(capsys, *args), "lmpress.json", before=before, root=lmdir.parent)


def test_a_huge_bad_value_is_not_echoed(capsys: pytest.CaptureFixture[str], lmdir: Path) -> None:
    (lmdir / "lmpress.json").write_text(json.dumps(_set(_meta(lmdir), "modules", "x" * 1_000_000)))
    before = tree(lmdir.parent)
    out = lmpress(capsys, "inspect", lmdir)
    assert_refused(out, "'modules' must be an object", "got a string", before=before, root=lmdir.parent)
    assert len(out.stderr) < 500


def test_a_module_record_missing_a_field(capsys: pytest.CaptureFixture[str], lmdir: Path) -> None:
    """Well-typed but incomplete (a quant layer without its bit width): refused by both readers."""
    (lmdir / "lmpress.json").write_text(json.dumps(_module(_meta(lmdir), drop="bits")))
    before = tree(lmdir.parent)
    assert_refused(lmpress(capsys, "inspect", lmdir), "lmpress.json", before=before, root=lmdir.parent)
    assert_refused(lmpress(capsys, "eval", lmdir, *EVAL_FAST), "re-run compression", before=before, root=lmdir.parent)


def test_the_good_record_still_reads(capsys: pytest.CaptureFixture[str], lmdir: Path) -> None:
    meta = read_meta(lmdir)
    assert meta["format_version"] == 1 and any(f["format"] == "quant" for f in meta["modules"].values())
    assert lmpress(capsys, "inspect", lmdir).code == 0


# ---------------------------------------------------------------- GGUF


def _small_gguf(path: Path) -> Path:
    """A valid GGUF v3 file: strings, an int array, a string array and two F32 tensors."""
    meta: dict[str, Any] = {
        "general.architecture": "llama",
        "general.name": "tiny",
        "llama.block_count": U32(1),
        "llama.rope.freq_base": 10000.0,
        "tokenizer.ggml.tokens": ["<s>", "a", "b"],
        "tokenizer.ggml.token_type": [1, 1, 1],
    }
    a = np.arange(8, dtype="<f4")
    b = np.ones((2, 4), dtype="<f4")
    specs = [TensorSpec("a", (8,), F32, a.nbytes, lambda: a), TensorSpec("b", (2, 4), F32, b.nbytes, lambda: b)]
    write_gguf(path, meta, specs)
    return path


def _patch(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    return data[:offset] + struct.pack(fmt, value) + data[offset + struct.calcsize(fmt) :]


def _first_kv_type_offset(data: bytes) -> int:
    (n,) = struct.unpack_from("<Q", data, 24)
    return 24 + 8 + n  # after the first key: its value type


def _tensor_info_offset(data: bytes) -> int:
    """Where the first tensor info starts (walks the metadata of `_small_gguf`'s layout)."""
    from lmpress.export import gguf_check

    c = gguf_check._Cursor(data, len(data))  # type: ignore[arg-type]
    c.pos = 24
    (n_kv,) = struct.unpack_from("<Q", data, 16)
    for _ in range(n_kv):
        c.string("key")
        c.value(c.take("<I", "type"), "value")
    return c.pos


GGUF_CASES: list[tuple[str, Any, str]] = [
    ("100 random bytes", lambda d: np.random.default_rng(0).bytes(100), "no GGUF magic"),
    ("empty", lambda d: b"", "empty"),
    ("magic then zeros", lambda d: b"GGUF" + bytes(96), "version 0"),
    ("version 1", lambda d: _patch(d, 4, "<I", 1), "version 1"),
    ("version 99", lambda d: _patch(d, 4, "<I", 99), "version 99"),
    ("only the magic and version", lambda d: d[:8], "runs past the end"),
    ("a huge tensor count", lambda d: _patch(d, 8, "<Q", 2**62), "tensors claimed"),
    ("a huge metadata count", lambda d: _patch(d, 16, "<Q", 2**62), "metadata pairs claimed"),
    ("a key length past the end", lambda d: _patch(d, 24, "<Q", 2**40), "runs past the end"),
    ("an unknown value type", lambda d: _patch(d, _first_kv_type_offset(d), "<I", 13), "value type 13"),
    ("a value type of 2**31", lambda d: _patch(d, _first_kv_type_offset(d), "<I", 2**31), "value type"),
    ("truncated in the metadata", lambda d: d[: _tensor_info_offset(d) - 5], "token_type"),
    ("truncated in the tensor data", lambda d: d[: len(d) - 40], "past the end of the file"),
    ("five dimensions", lambda d: _patch(d, _tensor_info_offset(d) + 8 + 1, "<I", 5), "5 dimensions"),
    ("a huge dimension", lambda d: _patch(d, _tensor_info_offset(d) + 8 + 1 + 4, "<Q", 2**60), "past the end"),
    ("an offset past the end", lambda d: _patch(d, _tensor_info_offset(d) + 8 + 1 + 4 + 8 + 4, "<Q", 2**40), "past"),
    ("an unaligned offset", lambda d: _patch(d, _tensor_info_offset(d) + 8 + 1 + 4 + 8 + 4, "<Q", 3), "multiple of"),
]


@pytest.fixture(scope="module")
def good_gguf(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = _small_gguf(tmp_path_factory.mktemp("gguf") / "good.gguf")
    check_gguf(path)  # the good one passes
    return path.read_bytes()


@pytest.mark.parametrize("command", ["inspect", "eval"])
@pytest.mark.parametrize(("bad", "expect"), [(c[1], c[2]) for c in GGUF_CASES], ids=[c[0] for c in GGUF_CASES])
def test_bad_gguf(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, good_gguf: bytes, command: str, bad: Any, expect: str
) -> None:
    if command == "eval":
        pytest.importorskip("llama_cpp")
    f = tmp_path / "x.gguf"
    f.write_bytes(bad(good_gguf))
    before = tree(tmp_path)
    args = (command, f, *(EVAL_FAST if command == "eval" else ()))
    out = lmpress(capsys, *args)
    what = "is not a GGUF file" if expect in ("no GGUF magic", "empty") else "is not a valid GGUF file"
    assert_refused(out, str(f), what, expect, before=before, root=tmp_path, max_seconds=10)


@pytest.mark.parametrize("command", ["inspect", "eval"])
@pytest.mark.parametrize("kind", ["missing", "a directory", "a fifo"])
def test_gguf_path_not_a_file(capsys: pytest.CaptureFixture[str], tmp_path: Path, command: str, kind: str) -> None:
    f = tmp_path / "x.gguf"
    if kind == "a directory":
        f.mkdir()
    elif kind == "a fifo":
        os.mkfifo(f)
    before = tree(tmp_path)
    out = lmpress(capsys, command, f, *(EVAL_FAST if command == "eval" else ()))
    expect = {"missing": "does not exist", "a directory": "is a directory", "a fifo": "not a regular file"}[kind]
    assert_refused(out, str(f), expect, before=before, root=tmp_path, max_seconds=10)


def test_the_good_gguf_inspects(capsys: pytest.CaptureFixture[str], tmp_path: Path, good_gguf: bytes) -> None:
    f = tmp_path / "good.gguf"
    f.write_bytes(good_gguf)
    out = lmpress(capsys, "inspect", f, "--json")
    assert out.code == 0, out.stderr
    assert json.loads(out.stdout)["parameters"] == 16


# ---------------------------------------------------------------- ONNX


def _truncated_onnx() -> bytes:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [w],
    )
    data: bytes = onnx.helper.make_model(graph).SerializeToString()
    return data[: len(data) // 2]


ONNX_CASES = [
    ("random bytes", lambda: np.random.default_rng(1).bytes(4096)),
    ("empty", lambda: b""),
    ("a truncated graph", _truncated_onnx),
]


@pytest.mark.parametrize("command", ["inspect", "eval"])
@pytest.mark.parametrize("content", [c[1] for c in ONNX_CASES], ids=[c[0] for c in ONNX_CASES])
def test_bad_onnx(capsys: pytest.CaptureFixture[str], tiny: Path, command: str, content: Any) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    for f in tiny.glob("*.safetensors"):
        f.unlink()  # an ONNX directory: config, tokenizer and the graph
    (tiny / "model.onnx").write_bytes(content())
    before = tree(tiny.parent)
    out = lmpress(capsys, command, tiny, *(EVAL_FAST if command == "eval" else ()))
    assert_refused(
        out, "model.onnx is not a valid ONNX graph", "lmpress export --to onnx", before=before, root=tiny.parent
    )


# ---------------------------------------------------------------- pickles


class _Runs:
    """Pickles as a call of ``os.system`` (what a hostile checkpoint does on load)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


class _Execs:
    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, ("import os",))


def _pickle_dir(tiny: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    state = load_file(tiny / "model.safetensors")
    (tiny / "model.safetensors").unlink()
    return state


@pytest.mark.parametrize("layout", ["zip", "legacy", "raw pickle"])
@pytest.mark.parametrize("payload", ["os.system", "builtins.exec"])
@pytest.mark.parametrize("command", ["eval", "compress"])
def test_pickle_with_code(
    capsys: pytest.CaptureFixture[str], tiny: Path, layout: str, payload: str, command: str
) -> None:
    import pickle

    import torch

    state = _pickle_dir(tiny)
    marker = tiny.parent / "MARKER"
    state["evil"] = _Runs(marker) if payload == "os.system" else _Execs()
    f = tiny / "pytorch_model.bin"
    if layout == "raw pickle":  # no tensors (pickle alone would name torch.storage._load_from_bytes first)
        f.write_bytes(pickle.dumps({"evil": state["evil"]}, protocol=4))  # STACK_GLOBAL
    else:
        torch.save(state, f, _use_new_zipfile_serialization=layout == "zip")
    before = tree(tiny.parent)
    if command == "eval":
        out = lmpress(capsys, "eval", tiny, "--allow-pickle", *EVAL_FAST)
    else:
        out = lmpress(capsys, "compress", tiny, "-r", "w8", "--allow-pickle", "--no-eval", "-o", tiny.parent / "out")
    called = payload.rpartition(".")[2]  # protocol 2 spells them posix.system, __builtin__.exec
    assert_refused(out, f"{f} holds code, not only tensors; refusing", called, before=before, root=tiny.parent)
    assert not marker.exists()
    assert "weights_only" not in out.stderr


def test_a_tensor_only_pickle_still_loads(capsys: pytest.CaptureFixture[str], tiny: Path) -> None:
    import torch

    torch.save(_pickle_dir(tiny), tiny / "pytorch_model.bin")
    out = lmpress(capsys, "eval", tiny, "--allow-pickle", *EVAL_FAST)
    assert out.code == 0, out.stderr


@pytest.mark.parametrize("content", [b"", b"garbage that is not a pickle", b"PK\x03\x04broken zip"])
def test_pickle_not_a_checkpoint(capsys: pytest.CaptureFixture[str], tiny: Path, content: bytes) -> None:
    _pickle_dir(tiny)
    (tiny / "pytorch_model.bin").write_bytes(content)
    before = tree(tiny.parent)
    out = lmpress(capsys, "eval", tiny, "--allow-pickle", *EVAL_FAST)
    assert_refused(out, "pytorch_model.bin", before=before, root=tiny.parent)


# ---------------------------------------------------------------- tokenizer and config


TOKENIZER_CASES = [
    ("tokenizer.json", b"not json at all"),
    ("tokenizer.json", b"[1, 2, 3]"),
    ("tokenizer.json", b"\x00\xff\xfe binary \x89PNG"),
    ("tokenizer.json", b'{"model": {"type": "BPE", "vocab": 5}}'),
    ("tokenizer_config.json", b"not json"),
    ("tokenizer_config.json", b'["a list"]'),
    ("tokenizer_config.json", b"\xff\xfe\x00\x01"),
]


@pytest.mark.parametrize("command", ["eval", "compress"])
@pytest.mark.parametrize(("name", "content"), TOKENIZER_CASES, ids=[f"{n}:{c[:12]!r}" for n, c in TOKENIZER_CASES])
def test_bad_tokenizer(capsys: pytest.CaptureFixture[str], tiny: Path, command: str, name: str, content: bytes) -> None:
    (tiny / name).write_bytes(content)
    before = tree(tiny.parent)
    if command == "eval":
        out = lmpress(capsys, "eval", tiny, *EVAL_FAST)
    else:
        out = lmpress(capsys, "compress", tiny, "-r", "w8", "--no-eval", "-o", tiny.parent / "out")
    assert_refused(out, "tokenizer" if b"model" in content else name, before=before, root=tiny.parent)


ALL = ("eval", "inspect", "compress")
LOADS = ("eval", "compress")  # inspect reads only the sizes and names it shows
CONFIG_CASES = [  # (key, value, the commands that must refuse it; the others must just not crash)
    ("num_hidden_layers", "x", ALL),
    ("vocab_size", -1, ()),  # well-typed: a bound (the plausibility checks name it); here: no crash
    ("hidden_size", 1e300, ALL),
    ("num_attention_heads", [4], ALL),
    ("max_position_embeddings", {"a": 1}, ALL),
    ("tie_word_embeddings", "yes", LOADS),
    ("rms_norm_eps", "x", LOADS),
    ("rope_scaling", "x", LOADS),
    ("architectures", {"LlamaForCausalLM": 1}, ("inspect",)),  # transformers goes by model_type
]


@pytest.mark.parametrize("command", ALL)
@pytest.mark.parametrize(("key", "value", "refused_by"), CONFIG_CASES, ids=[f"{k}={v!r}" for k, v, _ in CONFIG_CASES])
def test_absurd_config(
    capsys: pytest.CaptureFixture[str], tiny: Path, command: str, key: str, value: Any, refused_by: tuple[str, ...]
) -> None:
    config = json.loads((tiny / "config.json").read_text())
    (tiny / "config.json").write_text(json.dumps({**config, key: value}))
    before = tree(tiny.parent)
    if command == "eval":
        out = lmpress(capsys, "eval", tiny, *EVAL_FAST)
    elif command == "inspect":
        out = lmpress(capsys, "inspect", tiny)
    else:
        out = lmpress(capsys, "compress", tiny, "-r", "w8", "--no-eval", "-o", tiny.parent / "out")
    if command in refused_by:
        assert_refused(out, "config.json", before=before, root=tiny.parent)
    elif out.code != 0:  # it may run; if it stops, it stops as a refusal
        assert_refused(out, before=before, root=tiny.parent)


# ---------------------------------------------------------------- properties

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
TOP_KEYS = ["format_version", "modules", "structure", "shared", "metrics", "recipe", "stages", "calibration"]


def _assert_one_line_or_dict(path: Path) -> None:
    try:
        meta = read_meta(path)
    except ModelLoadError as e:
        msg = str(e)
        assert "\n" not in msg and "lmpress.json" in msg and len(msg) < 600, msg
    else:
        assert isinstance(meta, dict)


@settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture], database=None)
@given(value=JSON)
def test_read_meta_of_any_json(tmp_path: Path, value: Any) -> None:
    (tmp_path / "lmpress.json").write_text(json.dumps(value))
    _assert_one_line_or_dict(tmp_path)


@settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture], database=None)
@given(data=st.data())
def test_read_meta_of_mutated_records(tmp_path: Path, compressed_master: Path, data: st.DataObject) -> None:
    meta = _meta(compressed_master)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        key = data.draw(st.sampled_from(TOP_KEYS), label="key")
        if (
            key == "modules"
            and isinstance(meta["modules"], dict)
            and meta["modules"]
            and data.draw(st.booleans(), label="inside a module")
        ):
            name = data.draw(st.sampled_from(sorted(meta["modules"])), label="module")
            field = data.draw(st.sampled_from(["format", "bits", "in_features", "bias", "base", "scale_dtype"]))
            meta["modules"][name] = {**meta["modules"][name], field: data.draw(JSON, label="value")}
        else:
            meta[key] = data.draw(JSON, label="value")
    (tmp_path / "lmpress.json").write_text(json.dumps(meta))
    _assert_one_line_or_dict(tmp_path)


@settings(max_examples=200, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture], database=None)
@given(data=st.data())
def test_check_gguf_of_damaged_headers(tmp_path: Path, good_gguf: bytes, data: st.DataObject) -> None:
    """Flip bytes (mostly in the header), overwrite 8-byte fields with extreme values, truncate:
    the checker accepts or refuses with one ModelLoadError line, quickly, and nothing else."""
    buf = bytearray(good_gguf)
    header = _tensor_info_offset(good_gguf) + 2 * 40
    for _ in range(data.draw(st.integers(1, 4), label="edits")):
        at = data.draw(st.integers(0, min(header, len(buf) - 1)), label="at")
        if data.draw(st.booleans(), label="wide"):
            big = data.draw(st.sampled_from([0, 1, 2**31, 2**32 - 1, 2**40, 2**63, 2**64 - 1]), label="value")
            buf[at : at + 8] = big.to_bytes(8, "little")[: len(buf) - at]
        else:
            buf[at] = data.draw(st.integers(0, 255), label="byte")
    cut = data.draw(st.none() | st.integers(0, len(buf)), label="truncate")
    f = tmp_path / "fuzz.gguf"
    f.write_bytes(bytes(buf if cut is None else buf[:cut]))
    t0 = time.perf_counter()
    try:
        check_gguf(f)
    except ModelLoadError as e:
        assert "\n" not in str(e) and len(str(e)) < 600
    else:  # what the checker lets through, inspect reads (or refuses) in one line too
        try:
            inspect_model(f)
        except ModelLoadError as e:
            assert "\n" not in str(e) and len(str(e)) < 600
    assert time.perf_counter() - t0 < 2.0  # a header walk, not a read of the file
