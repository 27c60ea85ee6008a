"""Importance matrices: llama.cpp's file formats written and read, the statistic itself, and its use
by rtn and hqq on GGUF grids (`lmpress.quant.imatrix`, `lmpress.formats.imatrix`)."""

from __future__ import annotations

import copy
import os
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lmpress.arch import linear_weight
from lmpress.cli import run
from lmpress.formats.imatrix import Imatrix, ImatrixEntry, ImatrixError, read_imatrix, write_imatrix
from lmpress.method import Context
from lmpress.quant import hqq, rtn
from lmpress.quant.imatrix import collect_imatrix, layer_importance, llama_names
from tests.conftest import tiny_config

ROLES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@pytest.fixture(scope="module")
def llama() -> nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", 512)).eval()
    with torch.no_grad():  # channels of unequal size, as trained models have: importance to weigh
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p.copy_(torch.randn_like(p).exp())
    return model


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    return torch.randint(0, 512, (5, 24), generator=torch.Generator().manual_seed(1))  # (N, T)


@pytest.fixture(scope="module")
def imatrix(llama: nn.Module, windows: torch.Tensor) -> Imatrix:
    return collect_imatrix(llama, windows, batch_size=2)


def test_values_are_the_sums_of_squared_inputs(llama: nn.Module, windows: torch.Tensor, imatrix: Imatrix) -> None:
    names = llama_names(llama)
    assert sorted(names.values()) == sorted(f"blk.{i}.{r}.weight" for i in range(2) for r in ROLES)
    sums: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable[..., None]:
        def add(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.pow(2).sum(0)

        return add

    handles = [llama.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    with torch.no_grad():
        llama(input_ids=windows)
    for h in handles:
        h.remove()
    assert imatrix.chunk_count == 5 and imatrix.chunk_size == 24
    for module_name, gname in names.items():
        e = imatrix.entries[gname]
        assert e.counts.tolist() == [5 * 24]
        np.testing.assert_allclose(e.in_sum2[0], sums[module_name].numpy(), rtol=1e-5)


def test_gguf_form_reads_back_in_the_gguf_package(tmp_path: Path, imatrix: Imatrix) -> None:
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "model.imatrix"
    write_imatrix(path, imatrix)
    reader = gguf.GGUFReader(path)
    field = reader.fields["general.type"]
    assert bytes(field.parts[field.data[0]]).decode() == "imatrix"
    for key, want in (("imatrix.chunk_count", 5), ("imatrix.chunk_size", 24)):
        f = reader.fields[key]
        assert f.types == [gguf.GGUFValueType.UINT32] and int(f.parts[f.data[0]][0]) == want
    tensors = {t.name: t for t in reader.tensors}
    assert sorted(tensors) == sorted(f"{n}.{s}" for n in imatrix.entries for s in ("in_sum2", "counts"))
    for name, e in imatrix.entries.items():
        sums, counts = tensors[f"{name}.in_sum2"], tensors[f"{name}.counts"]
        width = 128 if name.endswith("ffn_down.weight") else 64
        assert sums.tensor_type == counts.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(sums.shape) == [width, 1] and list(counts.shape) == [1, 1]  # ggml order: innermost first
        np.testing.assert_array_equal(np.asarray(sums.data).reshape(-1), e.in_sum2[0])
        assert float(np.asarray(counts.data).reshape(-1)[0]) == 120.0
    back = read_imatrix(path)
    assert (back.chunk_count, back.chunk_size, back.datasets) == (5, 24, ["lmpress"])
    for name, e in imatrix.entries.items():
        np.testing.assert_array_equal(back.entries[name].in_sum2, e.in_sum2)
        np.testing.assert_array_equal(back.entries[name].counts, e.counts)


def test_legacy_form_round_trip_and_a_file_written_by_hand(tmp_path: Path, imatrix: Imatrix) -> None:
    path = tmp_path / "model.dat"
    write_imatrix(path, imatrix)
    back = read_imatrix(path)
    assert back.chunk_count == 5 and back.datasets == ["lmpress"]
    for name, e in imatrix.entries.items():
        np.testing.assert_allclose(back.entries[name].mean_sq(), e.mean_sq(), rtol=1e-6)
    # llama.cpp's layout: entries, then (name, ncall, values = mean x² * ncall), chunk count, dataset
    values = np.array([2.0, 4.0, 6.0], np.float32)
    raw = struct.pack("<i", 1) + struct.pack("<i", 5) + b"blk.0" + struct.pack("<ii", 2, 3) + values.tobytes()
    (tmp_path / "hand.dat").write_bytes(raw + struct.pack("<ii", 7, 4) + b"wiki")
    hand = read_imatrix(tmp_path / "hand.dat")
    assert hand.chunk_count == 7 and hand.datasets == ["wiki"]
    np.testing.assert_allclose(hand.entries["blk.0"].mean_sq(), [[1.0, 2.0, 3.0]])


def test_unreadable_and_foreign_files_are_one_line_errors(tmp_path: Path, llama: nn.Module) -> None:
    (tmp_path / "junk.dat").write_bytes(b"\x01\x00")
    with pytest.raises(ImatrixError, match="not a llama.cpp importance matrix"):
        read_imatrix(tmp_path / "junk.dat")
    other = Imatrix({"blk.0.attn_q.weight": ImatrixEntry(np.ones((1, 96), np.float32), np.ones(1, np.float32))})
    write_imatrix(tmp_path / "other.imatrix", other)
    with pytest.raises(ImatrixError, match="96 columns but model.layers.0.self_attn.q_proj takes 64"):
        layer_importance(llama, tmp_path / "other.imatrix")
    stranger = Imatrix({"enc.0.weight": ImatrixEntry(np.ones((1, 8), np.float32), np.ones(1, np.float32))})
    write_imatrix(tmp_path / "stranger.imatrix", stranger)
    with pytest.raises(ImatrixError, match="covers none of this model's layers"):
        layer_importance(llama, tmp_path / "stranger.imatrix")


def _weighted_errors(before: nn.Module, after: nn.Module, importance: dict[str, torch.Tensor]) -> np.ndarray:
    errs = []
    for name, imp in importance.items():
        stored = after.get_submodule(name).dequantize_weight()  # a GGUFLinear's weights as it computes with them
        diff = stored - linear_weight(before.get_submodule(name)).float()
        errs.append(float((diff.pow(2) * imp[None, :]).sum().detach()))
    return np.array(errs)


@pytest.mark.parametrize("method, grid", [(rtn, "q4_0"), (rtn, "q4_1"), (hqq, "q4_1")])
def test_imatrix_lowers_the_weighted_error_of_gguf_fits(
    tmp_path: Path, llama: nn.Module, imatrix: Imatrix, method: object, grid: str
) -> None:
    path = tmp_path / "model.imatrix"
    write_imatrix(path, imatrix)
    importance = layer_importance(llama, path)
    assert len(importance) == 14
    config_cls = rtn.RTNConfig if method is rtn else hqq.HQQConfig
    ctx = Context(tokenizer=None, device=torch.device("cpu"))
    plain, weighted = copy.deepcopy(llama), copy.deepcopy(llama)
    method.apply(plain, config_cls(grid=grid), ctx)  # type: ignore[attr-defined]
    report = method.apply(weighted, config_cls(grid=grid, imatrix=path), ctx)  # type: ignore[attr-defined]
    assert report["imatrix"] == {"file": str(path), "weighted_layers": 14}
    e_plain, e_weighted = _weighted_errors(llama, plain, importance), _weighted_errors(llama, weighted, importance)
    assert (e_weighted <= e_plain * 1.001).all()
    assert e_weighted.sum() < 0.8 * e_plain.sum()  # measured: 0.74 (rtn q4_0), 0.57 (rtn q4_1), 0.49 (hqq q4_1)


def test_cli_writes_both_forms_streamed_and_compress_takes_one(
    tmp_path: Path, tiny_model_dir: Callable[..., Path], text_file: Path
) -> None:
    model = tiny_model_dir("llama")
    common = ["--data", str(text_file), "--calib-windows", "3", "--seq-len", "32", "-q"]
    assert run(["imatrix", str(model), *common, "-o", str(tmp_path / "m.imatrix")]) == 0
    assert run(["imatrix", str(model), *common, "-o", str(tmp_path / "m.dat")]) == 0
    gguf_form, dat_form = read_imatrix(tmp_path / "m.imatrix"), read_imatrix(tmp_path / "m.dat")
    assert len(gguf_form.entries) == 14 and gguf_form.chunk_count == 3 and gguf_form.chunk_size == 32
    for name, e in gguf_form.entries.items():
        np.testing.assert_allclose(dat_form.entries[name].mean_sq(), e.mean_sq(), rtol=1e-5)
    assert run(["imatrix", str(model), *common, "-o", str(tmp_path / "m.imatrix")]) == 2  # exists
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - method: rtn\n    grid: q4_0\n")
    out = tmp_path / "out"
    args = ["compress", str(model), "-r", str(recipe), "-o", str(out), "--no-eval", "--no-speed", "--json", "-q"]
    assert run([*args, "--imatrix", str(tmp_path / "m.imatrix"), "--data", str(text_file)]) == 0
    assert (out / "lmpress.json").is_file()
    (tmp_path / "bad.imatrix").write_bytes(b"GGUF")
    assert run([*args, "--overwrite", "--imatrix", str(tmp_path / "bad.imatrix")]) == 2
    other = Imatrix({"blk.0.attn_q.weight": ImatrixEntry(np.ones((1, 96), np.float32), np.ones(1, np.float32))})
    write_imatrix(tmp_path / "other.imatrix", other)
    args[5] = str(tmp_path / "out2")
    assert run([*args, "--imatrix", str(tmp_path / "other.imatrix"), "--data", str(text_file)]) == 2
    assert not (tmp_path / "out2").exists()  # another model's matrix: refused, nothing written


def test_cli_checks_its_inputs_as_compress_does(
    tmp_path: Path, tiny_model_dir: Callable[..., Path], text_file: Path
) -> None:
    """An encoder or a model without a tokenizer: one line, exit 2, no file (the streamed path too)."""
    from transformers import AutoConfig, AutoModelForMaskedLM

    bert = tmp_path / "bert"
    config = AutoConfig.for_model("bert", vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    AutoModelForMaskedLM.from_config(config).save_pretrained(bert)
    bare = tiny_model_dir("qwen2")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (bare / f).unlink()
    for model in (bert, bare):
        out = tmp_path / f"{model.name}.imatrix"
        assert run(["imatrix", str(model), "--data", str(text_file), "-o", str(out), "-q"]) == 2
        assert not out.exists()


def test_a_recipe_without_an_imatrix_stage_refuses_one(tmp_path: Path, imatrix: Imatrix) -> None:
    from lmpress.cli.compress import with_imatrix
    from lmpress.errors import RecipeError
    from lmpress.recipe import load_recipe

    write_imatrix(tmp_path / "m.imatrix", imatrix)
    with pytest.raises(RecipeError, match="no stage that uses an importance matrix"):
        with_imatrix(load_recipe("gguf-q4_k_m"), tmp_path / "m.imatrix")  # gptq has its own statistics
    given = with_imatrix(load_recipe("w8"), tmp_path / "m.imatrix")
    assert [getattr(s, "imatrix", None) for s in given.stages] == [tmp_path / "m.imatrix"]


def test_layers_the_file_leaves_out_are_fitted_unweighted(tmp_path: Path, llama: nn.Module, imatrix: Imatrix) -> None:
    partial = Imatrix({k: v for k, v in imatrix.entries.items() if k.startswith("blk.0.")})
    write_imatrix(tmp_path / "p.imatrix", partial)
    config = rtn.RTNConfig(grid="q8_0", imatrix=tmp_path / "p.imatrix")
    report = rtn.apply(copy.deepcopy(llama), config, Context(None, torch.device("cpu")))
    assert report["imatrix"]["weighted_layers"] == 7 and sum(report["layers"].values()) == 14


TOOLS = os.environ.get("LMPRESS_LLAMA_TOOLS")  # a directory holding llama.cpp's llama-imatrix and llama-quantize


@pytest.mark.skipif(not TOOLS, reason="LMPRESS_LLAMA_TOOLS names no directory with llama-imatrix and llama-quantize")
def test_llama_cpp_computes_the_same_matrix_and_quantizes_with_ours(tmp_path: Path, text_file: Path) -> None:
    from lmpress.api import load
    from lmpress.export import export

    tools = Path(str(TOOLS))
    model = tmp_path / "builtin.gguf"
    export("builtin", "gguf", model)
    args = ["-m", model, "-f", text_file, "-o", tmp_path / "theirs.gguf", "-c", "128", "--chunks", "4", "--no-ppl"]
    subprocess.run([tools / "llama-imatrix", *args, "-t", "1"], check=True, capture_output=True)
    theirs = read_imatrix(tmp_path / "theirs.gguf")
    loaded = load("builtin", device="cpu", dtype="float32")
    ids = loaded.tokenizer(text_file.read_text(), add_special_tokens=False).input_ids  # no BOS: the GGUF adds none
    ours = collect_imatrix(loaded.model, torch.tensor(ids[: 4 * 128]).view(4, 128))
    assert sorted(ours.entries) == sorted(theirs.entries) and len(ours.entries) == 28
    for name, e in theirs.entries.items():
        assert ours.entries[name].counts.tolist() == e.counts.tolist() == [512.0]
        ref = e.mean_sq()[0]
        assert np.abs(ours.entries[name].mean_sq()[0] - ref).max() < 5e-3 * np.abs(ref).max(), name  # measured 9e-4
    for form in ("ours.imatrix", "ours.dat"):  # IQ2_XXS: a type llama.cpp refuses to make without an imatrix
        write_imatrix(tmp_path / form, ours)
        out = tmp_path / f"{form}.gguf"
        run_q = subprocess.run(
            [tools / "llama-quantize", "--imatrix", tmp_path / form, model, out, "IQ2_XXS", "1"],
            capture_output=True,
            text=True,
        )
        assert run_q.returncode == 0 and "loaded 28 importance matrix entries" in run_q.stdout, run_q.stderr
        assert out.stat().st_size < model.stat().st_size / 3


@pytest.mark.parametrize("arch", ["gpt2", "phi3", "gemma2"])
def test_names_and_widths_are_those_of_the_exported_gguf(
    arch: str, tiny_model_dir: Callable[..., Path], tmp_path: Path
) -> None:
    gguf = pytest.importorskip("gguf")
    from lmpress.export import export
    from lmpress.io.load import load_model

    src = tiny_model_dir(arch)
    export(src, "gguf", tmp_path / "m.gguf")
    widths = {t.name: int(t.shape[0]) for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}  # innermost: inputs
    model = load_model(src).model
    im = collect_imatrix(model, torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(0)))
    assert im.entries and all(name in widths for name in im.entries), sorted(set(im.entries) - set(widths))
    assert {n: e.in_sum2.shape[1] for n, e in im.entries.items()} == {n: widths[n] for n in im.entries}
    linear = {n for n in widths if n.startswith("blk.") and n.endswith(".weight") and "norm" not in n}
    assert set(im.entries) == linear  # every matrix llama.cpp multiplies in the blocks
