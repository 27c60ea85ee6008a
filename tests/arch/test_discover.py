"""The generic path: a decoder whose family has no spec is read by its structure (blocks, linears),
compressed with what needs no roles (GPTQ here), streamed or whole, saved and reloaded; what needs
roles is refused in one line; `lmpress inspect` says which it is."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from typer.testing import CliRunner

import lmpress
from lmpress.arch import GENERIC_ROLE, Adapter, is_supported
from lmpress.cli import app
from lmpress.errors import ExportError, ModelLoadError
from lmpress.export import export
from lmpress.preflight import why_whole
from lmpress.recipe import load_recipe
from tests.export.helpers import exact_fp32, kl
from tests.robustness.conftest import FAST, assert_refused
from tests.robustness.conftest import lmpress as run_cli

# model_types transformers builds and lmpress has no spec for -> (linears in one block, final norm)
NO_SPEC = {
    "helium": (7, "model.norm"),
    "seed_oss": (7, "model.norm"),
    "exaone4": (7, "model.norm"),
    "arcee": (6, "model.norm"),  # a two-projection MLP
    "persimmon": (4, "model.final_layernorm"),  # fused q/k/v, LayerNorms
}
GPTQ = {"name": "w4", "stages": [{"method": "gptq", "bits": 4, "group_size": 32}]}


def generic_config(model_type: str, vocab: int):  # type: ignore[no-untyped-def]
    return AutoConfig.for_model(
        model_type,
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return {k: t for f in sorted(path.glob("*.safetensors")) for k, t in load_file(f).items()}


@pytest.fixture
def generic_dir(tmp_path: Path, tokenizer) -> Callable[[str], Path]:  # type: ignore[no-untyped-def]
    def make(model_type: str) -> Path:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(generic_config(model_type, len(tokenizer)))
        out = tmp_path / f"tiny-{model_type}"
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        return out

    return make


@pytest.mark.parametrize("model_type", sorted(NO_SPEC))
def test_discovery_finds_blocks_and_linears(model_type: str) -> None:
    assert not is_supported(model_type)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(generic_config(model_type, 256))
    a = Adapter(model)
    assert a.spec.generic and a.spec.blocks == "model.layers" and a.num_blocks == 2
    assert a.blocks() is model.model.layers
    linears = a.block_linears(1)
    n, final_norm = NO_SPEC[model_type]
    assert len(linears) == n and len(a.linears()) == 2 * n
    assert all(n.startswith("model.layers.1.") and isinstance(m, nn.Linear) for n, m in linears.items())
    assert set(a.linear_roles(0).values()) == {GENERIC_ROLE}
    assert a.embeddings() == {"model.embed_tokens": model.get_input_embeddings()}
    assert a.head()[1] is model.get_output_embeddings() and a.final_norm()[0] == final_norm
    assert a.attention_linears(0) == {} and a.spec.scale_groups == () and a.spec.gguf is None


def test_logits_scaled_after_the_head_load_whole(generic_dir, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A config that scales the logits after the head (Cohere's logit_scale): a streamed run, whose
    logits are head(norm(h)), would miss it, so the model is compressed whole."""
    src = generic_dir("helium")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "logit_scale": 0.0625}))
    assert why_whole(src, load_recipe(GPTQ), tmp_path / "x") == (
        "lmpress has no spec for it and cannot tell what runs between its blocks and its logits"
    )
    with torch.device("meta"):
        a = Adapter(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src)))
    assert a.num_blocks == 2 and len(a.block_linears(0)) == 7
    with pytest.raises(ModelLoadError, match="load it whole"):
        a.final_norm()


def test_no_blocks_is_one_line() -> None:
    with pytest.raises(ModelLoadError, match=r"unknown architecture None .*found no decoder blocks \(an nn.ModuleList"):
        Adapter(nn.Sequential(nn.Linear(2, 2)))


@pytest.mark.parametrize("model_type", ["helium", "seed_oss", "exaone4", "arcee"])
def test_gptq_compresses_streams_and_reloads(model_type: str, generic_dir, text_file: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = generic_dir(model_type)
    assert why_whole(src, load_recipe(GPTQ), tmp_path / "x") is None  # its blocks are found: it streams
    data = lmpress.DataOptions(source=text_file, seq_len=32, eval_windows=4, calib_windows=8)
    runs = {}
    for stream in (False, True):
        out = tmp_path / f"out-{stream}"
        runs[stream] = lmpress.compress(src, GPTQ, data, output=out, stream=stream, measure_speed=False)
        assert (json.loads((out / "lmpress.json").read_text()).get("streamed") is True) == stream
    assert runs[False].metrics["compressed"]["perplexity"] > 0
    whole, streamed = (_tensors(tmp_path / f"out-{s}") for s in (False, True))
    assert set(whole) == set(streamed) and all(torch.equal(t, streamed[k]) for k, t in whole.items())
    assert sum(k.endswith(".qweight") for k in whole) == 2 * NO_SPEC[model_type][0]
    reloaded = lmpress.load(tmp_path / "out-False", device="cpu").model
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        diff = (runs[False].model(input_ids=ids).logits - reloaded(input_ids=ids).logits).abs().max()
    assert diff == 0


@pytest.mark.parametrize("model_type", ["phimoe", "llama4_text", "hunyuan_v1_moe"])
def test_mixture_routers_stay_float(model_type: str, tokenizer, text_file: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A mixture without a spec: its routers (Phi-MoE's and Llama 4's nn.Linear subclasses that return
    the routing, Hunyuan's gate whose forward reads .weight) are not compressed, so GPTQ calibrates
    through them and the result reloads with the same logits, streamed or not."""
    config = generic_config(model_type, len(tokenizer))
    for key in ("num_experts", "num_local_experts"):
        if hasattr(config, key):
            setattr(config, key, 4)
    torch.manual_seed(0)
    src = tmp_path / model_type
    AutoModelForCausalLM.from_config(config).save_pretrained(src)
    tokenizer.save_pretrained(src)
    data = lmpress.DataOptions(source=text_file, seq_len=32, calib_windows=8)
    r = lmpress.compress(src, GPTQ, data, output=tmp_path / "out", run_eval=False, measure_speed=False)
    routers = Adapter(r.model).float_modules()
    assert len(routers) == 2 and all(type(r.model.get_submodule(n)).__name__ != "QuantLinear" for n in routers)
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        diff = r.model(input_ids=ids).logits - lmpress.load(tmp_path / "out", device="cpu").model(input_ids=ids).logits
    assert diff.abs().max() == 0
    # streamed, the experts are saved one by one as a whole run's save_pretrained writes them
    lmpress.compress(src, GPTQ, data, output=tmp_path / "s", stream=True, run_eval=False, measure_speed=False)
    whole, streamed = _tensors(tmp_path / "out"), _tensors(tmp_path / "s")
    assert set(whole) == set(streamed) and all(torch.equal(t, streamed[k]) for k, t in whole.items())


def test_compressed_tensors_export_needs_no_spec(generic_dir, text_file: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """transformers builds the family itself, so the compressed-tensors checkpoint needs no roles;
    GGUF needs llama.cpp's names for each tensor, so it is refused."""
    pytest.importorskip("compressed_tensors")
    data = lmpress.DataOptions(source=text_file, seq_len=32, eval_windows=4, calib_windows=8)
    out = tmp_path / "out"
    lmpress.compress(generic_dir("exaone4"), GPTQ, data, output=out, run_eval=False, measure_speed=False)
    export(out, "compressed-tensors", tmp_path / "ct")
    ours = exact_fp32(lmpress.load(out, device="cpu").model)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        assert kl(ours(input_ids=ids).logits, theirs(input_ids=ids).logits) < 1e-5
    with pytest.raises(ExportError, match="exaone4 models are not exported to GGUF"):
        export(out, "gguf", tmp_path / "m.gguf")


def test_awq_is_refused_in_one_line(generic_dir, text_file: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    src = generic_dir("helium")
    recipe = tmp_path / "awq.yaml"
    recipe.write_text("stages:\n  - method: awq\n    bits: 4\n    group_size: 32\n")
    out = run_cli(capsys, "compress", src, "-r", recipe, "--data", text_file, "-o", tmp_path / "out", *FAST)
    assert_refused(out, "awq needs lmpress to know the helium family's norms", "add a spec")
    assert not (tmp_path / "out").exists()


def test_inspect_names_the_generic_family(generic_dir) -> None:  # type: ignore[no-untyped-def]
    r = CliRunner().invoke(app, ["inspect", str(generic_dir("arcee"))])
    assert r.exit_code == 0, r.output
    for text in ("family: generic (no spec): found by structure", "blocks: model.layers x 2", "awq/smoothquant: needs"):
        assert text in r.output, text
