"""compressed-tensors export: lmpress's own codes in the checkpoint llm-compressor writes, loaded as
users load it (``transformers.AutoModelForCausalLM.from_pretrained`` with the package installed)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from lmpress.cli import app
from lmpress.export import ExportError, export
from lmpress.io.load import LoadedModel
from lmpress.nn.quant_linear import QuantLinear
from tests.export.helpers import compress, exact_fp32, held_out_windows, kl

pytest.importorskip("compressed_tensors")

KL_MAX = 1e-5  # per token, against lmpress's own float32 forward of the same model (the issue asks 1e-4)


@pytest.fixture(scope="module")
def held_out() -> torch.Tensor:
    return held_out_windows()


def _check_in_transformers(loaded: LoadedModel, out: Path, ids: torch.Tensor) -> float:
    """KL per token between lmpress's and transformers' float32 logits of the exported model; the
    weights transformers decoded are lmpress's (up to the float16 rounding of code x scale, where
    it decodes in the scales' dtype while loading)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ours_model = exact_fp32(loaded.model)
    with torch.no_grad():
        ours = ours_model(input_ids=ids).logits
        theirs = model(input_ids=ids).logits
    for name, m in ours_model.named_modules():
        if isinstance(m, QuantLinear):
            theirs_w, ours_w = model.get_submodule(name).weight, m.dequantize_weight(torch.float32)
            assert torch.allclose(theirs_w, ours_w, rtol=2**-11, atol=0), name
    return kl(ours, theirs)


@pytest.mark.parametrize(
    ("stages", "layout"),
    [
        ([{"method": "rtn", "bits": 4, "group_size": 128, "symmetric": True}], "w4 g128 sym"),
        ([{"method": "gptq", "bits": 4, "group_size": 64}], "w4 g64 asym"),
        ([{"method": "rtn", "bits": 8, "group_size": None, "symmetric": True}], "w8 channel sym"),
        ([{"method": "awq", "bits": 4, "group_size": 128}], "w4 g128 asym"),
        ([{"method": "w8a8"}], "w8a8"),
    ],
)
def test_transformers_loads_the_same_model(
    stages: list[dict[str, object]], layout: str, held_out: torch.Tensor, tmp_path: Path
) -> None:
    loaded = compress(stages)
    out = tmp_path / "ct"
    report = export(loaded, "compressed-tensors", out)
    assert report.type_counts() == {layout: 28}  # every block linear; the head stays dense
    # W8A8: the same int8 weights, but compressed-tensors' emulation rounds activations on a grid of
    # max/127.5 where lmpress (and vLLM's int8 kernels) use max/127
    assert _check_in_transformers(loaded, out, held_out) < (1e-3 if layout == "w8a8" else KL_MAX)

    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["quantization_status"] == "compressed"
    assert config["ignore"] == ["lm_head"] and config["config_groups"]["group_0"]["targets"] == ["Linear"]
    weights = config["config_groups"]["group_0"]["weights"]
    q = loaded.model.model.layers[0].self_attn.q_proj  # type: ignore[union-attr]
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (q.bits, q.group_size, q.symmetric)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        name = "model.layers.0.self_attn.q_proj"
        if layout == "w8a8":
            assert f.get_tensor(f"{name}.weight").dtype == torch.int8
            assert config["config_groups"]["group_0"]["input_activations"]["dynamic"] is True
        else:
            packed = f.get_tensor(f"{name}.weight_packed")
            assert packed.dtype == torch.int32 and packed.shape == (256, 256 * q.bits // 32)
            assert f.get_tensor(f"{name}.weight_shape").tolist() == [256, 256]
        assert f.get_tensor(f"{name}.weight_scale").dtype == torch.float16  # lmpress's own scales
        assert (f"{name}.weight_zero_point" in keys) == (not q.symmetric)
        assert f"{name}.weight" not in keys or layout == "w8a8"


def test_bytes_follow_the_bits(tmp_path: Path) -> None:
    dense = export("builtin", "compressed-tensors", tmp_path / "dense")
    w4 = export(compress([{"method": "rtn", "bits": 4, "group_size": 128}]), "compressed-tensors", tmp_path / "w4")
    assert dense.quantization_format == "dense" and w4.quantization_format == "pack-quantized"
    # the blocks' linears go from 16 bits to 4 + a float16 scale and a 4-bit zero per 128; the
    # embeddings and the head stay bfloat16
    weights = 4 * (2 * 256 * 256 + 2 * 256 * 128 + 3 * 256 * 512)  # q, o; k, v; gate, up, down
    assert dense.bytes - w4.bytes == pytest.approx(weights * (16 - 4 - 20 / 128) / 8, rel=0.01)


def test_families(trained_dir: Callable[[str], Path], tmp_path: Path) -> None:
    """Qwen2 quantized; GPT-2 dense (bf16) loads, and its quantized Conv1D layers are refused."""
    ids = torch.arange(64)[None] % 500
    qwen = compress([{"method": "rtn", "bits": 4, "group_size": 32}], trained_dir("qwen2"))
    export(qwen, "compressed-tensors", tmp_path / "qwen")
    assert _check_in_transformers(qwen, tmp_path / "qwen", ids) < KL_MAX
    gpt2 = compress([{"method": "cast", "dtype": "bfloat16"}], trained_dir("gpt2"))
    export(gpt2, "compressed-tensors", tmp_path / "gpt2")
    assert _check_in_transformers(gpt2, tmp_path / "gpt2", ids) < KL_MAX
    w4 = compress([{"method": "rtn", "bits": 4, "group_size": 32}], trained_dir("gpt2"))
    with pytest.raises(ExportError, match=r"transformer\.h\.0\.attn\.c_attn: GPT-2's Conv1D .* gguf or onnx"):
        export(w4, "compressed-tensors", tmp_path / "gpt2-w4")
    assert not (tmp_path / "gpt2-w4").exists()


@pytest.mark.parametrize("arch", ["falcon", "gpt_bigcode"])
def test_families_transformers_cannot_load_quantized_are_refused(
    arch: str, tiny_model_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    """Their weight initialisation reads ``weight`` of layers compressed-tensors holds packed:
    refused in one line before writing, rather than a checkpoint transformers cannot load."""
    loaded = compress([{"method": "rtn", "bits": 8, "group_size": 32}], tiny_model_dir(arch))
    with pytest.raises(ExportError, match="transformers cannot load its quantized layers.*gguf or onnx"):
        export(loaded, "compressed-tensors", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_quantized_sparse_layers_densify_to_exact_zeros(held_out: torch.Tensor, tmp_path: Path) -> None:
    loaded = compress([{"method": "sparsegpt", "sparsity": 0.5, "pattern": "2:4", "bits": 4, "group_size": 128}])
    with pytest.raises(ExportError, match="no sparse layout.*--densify"):
        export(loaded, "compressed-tensors", tmp_path / "s")
    report = export(loaded, "compressed-tensors", tmp_path / "s", densify=True)
    assert len(report.densified) == 28 and set(report.type_counts()) == {"w4 g128 asym"}
    assert _check_in_transformers(loaded, tmp_path / "s", held_out) < KL_MAX


@pytest.mark.parametrize(
    ("stages", "match"),
    [
        ([{"method": "hqq", "bits": 4, "group_size": 64}], "fractional zero points"),
        ([{"method": "rtn", "bits": 4, "group_size": 96}], "groups of 96 do not divide its 256 inputs"),
        ([{"method": "lowrank", "target": 0.2, "whiten": False}], "low-rank layers have no compressed-tensors"),
        ([{"method": "share", "target": 0.25, "merge": "mean"}], "shared with"),
        ([{"method": "rtn", "grid": "q4_k"}], "GGUF block types"),
    ],
)
def test_layouts_the_format_cannot_hold_are_refused(
    stages: list[dict[str, object]], match: str, tmp_path: Path
) -> None:
    loaded = compress(stages)
    with pytest.raises(ExportError, match=match):
        export(loaded, "compressed-tensors", tmp_path / "x")
    assert not list(tmp_path.iterdir())


runner = CliRunner()


def test_cli_export_eval_and_bad_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "w4"
    args = ["compress", "-r", "w4", "-o", str(src), "--export", "compressed-tensors", "--no-eval"]
    r = runner.invoke(app, [*args, "--calib-windows", "4"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "w4-compressed-tensors"
    assert (out / "config.json").is_file() and "w4 g128 asym" in r.stdout, r.output
    r = runner.invoke(app, ["eval", str(out), "--reference", str(src), "--max-windows", "2", "--no-speed", "--json"])
    assert r.exit_code == 0, r.output
    # in the model's bfloat16, transformers rounds each decoded weight to bfloat16 and lmpress's int4
    # kernel rounds zero x scale: the two bfloat16 runtimes differ by about 2e-4
    assert json.loads(r.stdout)["metrics"]["kl"] < 1e-3
    before = sorted(p.name for p in tmp_path.iterdir())
    for args, msg in (
        (["export", str(src), "--to", "compressed-tensors", "-o", str(out)], "exists and is not empty"),
        (["export", str(src), "--to", "compressed-tensors", "-o", str(tmp_path / "m.gguf")], "writes a directory"),
        (["export", str(src), "--to", "compressed-tensors", "-o", str(tmp_path / "n"), "--requantize", "q4_k"], "GGUF"),
    ):
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, (args, r.output)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "compressed_tensors" else real(n, *a))
    r = runner.invoke(app, ["export", str(src), "--to", "compressed-tensors", "-o", str(tmp_path / "n")])
    assert r.exit_code == 2 and "pip install 'lmpress[compressed-tensors]'" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before
