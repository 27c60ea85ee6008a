"""GGUF export: tensors exactly as lmpress computes with them, checked in llama.cpp itself.

llama.cpp runs through llama-cpp-python (the ``gguf`` extra); without it the llama.cpp checks are
skipped, unless LMPRESS_REQUIRE_LLAMA_CPP=1 (CI) makes them required.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import lmpress
from lmpress.arch import rope_permutation
from lmpress.cli import app
from lmpress.data import select_split, tokenize_documents
from lmpress.export import ExportError, export
from lmpress.formats import ggml
from lmpress.io.load import LoadedModel
from lmpress.nn.gguf_linear import GGUFLinear
from lmpress.sources import load_documents

gguf = pytest.importorskip("gguf")
try:
    import llama_cpp
except ImportError:
    if os.environ.get("LMPRESS_REQUIRE_LLAMA_CPP"):
        raise
    llama_cpp = None
needs_llama = pytest.mark.skipif(
    llama_cpp is None, reason="llama-cpp-python not installed (pip install 'lmpress[gguf]')"
)

KL_MAX = 1e-3  # llama.cpp rounds activations to 8 bits in quantized dot products (~2e-4 on the built-in model)


@pytest.fixture(scope="module")
def builtin() -> LoadedModel:
    return lmpress.load("builtin", device="cpu")


@pytest.fixture(scope="module")
def held_out(builtin: LoadedModel) -> list[int]:
    """256 tokens of evaluation-split text (a document the model was not trained on)."""
    docs = select_split(load_documents("stdlib"), "eval")[:3]
    return tokenize_documents(docs, builtin.tokenizer)[1000:1256].tolist()  # type: ignore[no-any-return]


def _compress(stage: dict[str, object]) -> LoadedModel:
    r = lmpress.compress("builtin", {"stages": [stage]}, lmpress.DataOptions(calib_windows=16), run_eval=False)
    return LoadedModel(
        r.model, r.tokenizer if hasattr(r, "tokenizer") else lmpress.load("builtin").tokenizer, "builtin", Path(".")
    )


def _lmpress_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model.float()(torch.tensor([ids])).logits[0].float()  # type: ignore[no-any-return]


def _llama(path: Path, n_ctx: int = 512) -> object:
    return llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx, verbose=False, n_threads=2)  # type: ignore[union-attr]


def _kl(ref: torch.Tensor, other: torch.Tensor) -> float:
    p, q = ref.log_softmax(-1), other.log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def _llama_check(path: Path, model: torch.nn.Module, tokenizer: object, ids: list[int], n_ctx: int = 512) -> float:
    """Tokenization identical, and the mean per-token KL of llama.cpp's logits from lmpress's."""
    llm = _llama(path, n_ctx)
    text = tokenizer.decode(ids)  # type: ignore[attr-defined]
    assert (
        llm.tokenize(text.encode(), add_bos=False, special=False)
        == tokenizer(  # type: ignore[attr-defined]
            text, add_special_tokens=False
        )["input_ids"]
    )
    llm.reset()  # type: ignore[attr-defined]
    llm.eval(ids)  # type: ignore[attr-defined]
    ours = torch.tensor(np.array(llm.scores[: len(ids)]))  # type: ignore[attr-defined]
    return _kl(_lmpress_logits(model, ids), ours)


def _reader_tensors(path: Path) -> dict[str, object]:
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def test_dense_tensors_are_the_model_weights(builtin: LoadedModel, tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    report = export(builtin, "gguf", out)
    tensors = _reader_tensors(out)
    assert len(tensors) == 2 + 4 * 9 + 1  # embeddings, 4 blocks of 9, head (untied)
    m = builtin.model
    embed = tensors["token_embd.weight"]
    assert embed.tensor_type == gguf.GGMLQuantizationType.BF16  # type: ignore[attr-defined]
    assert np.array_equal(np.asarray(embed.data).view(np.int16), m.model.embed_tokens.weight.view(torch.int16).numpy())  # type: ignore[attr-defined, union-attr, operator]
    q = tensors["blk.1.attn_q.weight"]
    perm = rope_permutation(256, 4)
    assert np.array_equal(
        np.asarray(q.data).view(np.int16), m.model.layers[1].self_attn.q_proj.weight[perm].view(torch.int16).numpy()
    )  # type: ignore[attr-defined, index, union-attr, operator]
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32  # type: ignore[attr-defined]
    assert report.bytes == out.stat().st_size and report.type_counts() == {"bf16": 30, "f32": 9}
    fields = gguf.GGUFReader(str(out)).fields
    assert bytes(fields["tokenizer.ggml.pre"].parts[-1]).decode() == "gpt-2"
    assert int(fields["llama.block_count"].parts[-1][0]) == 4


def test_quantized_tensors_decode_to_what_the_layers_compute(tmp_path: Path) -> None:
    stage = {
        "method": "gptq",
        "grid": "q4_k",
        "embedding_grid": "q6_k",
        "ignore": [],
        "overrides": [
            {"targets": ["re:.*v_proj"], "grid": "q6_k"},
            {"targets": ["re:.*down_proj"], "bits": 8, "group_size": 32, "symmetric": True},  # a QuantLinear: Q8_0
        ],
    }
    loaded = _compress(stage)
    out = tmp_path / "q.gguf"
    report = export(loaded, "gguf", out)
    assert report.type_counts() == {"q4_k": 4 * 5 + 1, "q6_k": 4 + 1, "q8_0": 4, "f32": 9}
    tensors = _reader_tensors(out)
    layers = loaded.model.model.layers  # type: ignore[union-attr]
    for i in range(4):
        for gname, module, perm in (
            (f"blk.{i}.attn_q.weight", layers[i].self_attn.q_proj, rope_permutation(256, 4)),
            (f"blk.{i}.attn_k.weight", layers[i].self_attn.k_proj, rope_permutation(128, 2)),
            (f"blk.{i}.attn_v.weight", layers[i].self_attn.v_proj, None),
            (f"blk.{i}.ffn_down.weight", layers[i].mlp.down_proj, None),
        ):
            t = tensors[gname]
            decoded = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)  # type: ignore[attr-defined]
            ours = module.dequantize_weight(torch.float32)
            ours = ours[perm] if perm is not None else ours
            assert np.array_equal(decoded.reshape(ours.shape), ours.numpy()), gname
        q = layers[i].self_attn.q_proj
        assert isinstance(q, GGUFLinear)
        assert np.array_equal(
            np.asarray(tensors[f"blk.{i}.attn_q.weight"].data), q.blocks[rope_permutation(256, 4)].numpy()
        )  # type: ignore[attr-defined]


# (name, stage): every GGUF type, from a grid or from lmpress's own integer grid where one is exact
TYPES = [
    ("q8_0-quantlinear", {"method": "rtn", "bits": 8, "group_size": 32, "symmetric": True, "ignore": []}),
    ("q5_0-quantlinear", {"method": "rtn", "bits": 5, "group_size": 32, "symmetric": True}),
    ("q4_0-quantlinear", {"method": "gptq", "bits": 4, "group_size": 32, "symmetric": True}),
    *[(g, {"method": "rtn", "grid": g, "embedding_grid": g, "ignore": []}) for g in ggml.GRID_NAMES],
    ("q4_k-gptq", {"method": "gptq", "grid": "q4_k", "overrides": [{"targets": ["re:.*v_proj"], "grid": "q6_k"}]}),
    ("q3_k-awq", {"method": "awq", "grid": "q3_k"}),
    ("q4_k-hqq", {"method": "hqq", "grid": "q4_k"}),
]


@needs_llama
@pytest.mark.parametrize(("name", "stage"), TYPES, ids=[t[0] for t in TYPES])
def test_llama_cpp_runs_every_type(name: str, stage: dict[str, object], held_out: list[int], tmp_path: Path) -> None:
    loaded = _compress(stage)
    out = tmp_path / f"{name}.gguf"
    report = export(loaded, "gguf", out)
    expected = name.split("-")[0]
    assert report.type_counts().get(expected, 0) >= 20, report.type_counts()
    kl = _llama_check(out, loaded.model, loaded.tokenizer, held_out)
    assert kl < KL_MAX, kl


@needs_llama
def test_dense_builtin_in_llama_cpp(builtin: LoadedModel, held_out: list[int], tmp_path: Path) -> None:
    out = tmp_path / "dense.gguf"
    export(builtin, "gguf", out)
    assert _llama_check(out, builtin.model, builtin.tokenizer, held_out) < 1e-4


@needs_llama
@pytest.mark.parametrize(
    "arch",
    [
        "llama",
        "mistral",
        "qwen2",
        "gpt2",
        "gpt_neox",
        "phi",
        "gemma",
        "qwen3",
        "smollm3",
        "olmo2",
        "olmo3",
        "granite",
        "ministral",
        "gemma2",
        "gemma3_text",
        "starcoder2",
        "stablelm",
        "phi3",
        "lfm2",
        "gptj",
        "cohere",
        "cohere2",
        "gpt_bigcode",
        "falcon",
    ],
)
def test_families_in_llama_cpp(arch: str, trained_dir: Callable[[str], Path], tmp_path: Path) -> None:
    """Each family, dense and with 8-bit codes (GPT-2's Conv1D transposed), matches in llama.cpp."""
    src = trained_dir(arch)
    for recipe in (
        {"stages": [{"method": "cast", "dtype": "float32"}]},
        {"stages": [{"method": "rtn", "bits": 8, "group_size": 32, "symmetric": True}]},
    ):
        r = lmpress.compress(src, recipe, lmpress.DataOptions(calib_windows=4), run_eval=False)
        loaded = lmpress.load(src, device="cpu")
        out = tmp_path / f"{arch}-{recipe['stages'][0]['method']}.gguf"  # type: ignore[index]
        export(LoadedModel(r.model, loaded.tokenizer, str(src), src), "gguf", out)
        docs = [d for d in load_documents("stdlib") if d.path == "json/decoder.py"]
        ids = tokenize_documents(docs, loaded.tokenizer)[:200].tolist()
        kl = _llama_check(out, r.model, loaded.tokenizer, ids)
        assert kl < KL_MAX, (arch, recipe, kl)


@needs_llama
def test_per_head_norms_and_a_parallel_residual_in_llama_cpp(tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """StableLM 2 12B's layout: a LayerNorm per query and key head, written stacked (heads, head_dim),
    and the MLP reading the attention's norm (no ffn_norm written), as llama.cpp's stablelm reads them."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_config

    config = tiny_config("stablelm", len(tokenizer))
    config.qk_layernorm, config.use_parallel_residual, config.initializer_range = True, True, 0.2
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # per-head norms that differ, so the order of the stacked rows matters
        for name, p in model.named_parameters():
            if "layernorm.norms" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1 if name.endswith("weight") else 0))
    out = tmp_path / "stablelm.gguf"
    export(LoadedModel(model, tokenizer, "stablelm", tmp_path), "gguf", out)
    tensors = _reader_tensors(out)
    assert "blk.0.attn_q_norm.weight" in tensors and "blk.0.ffn_norm.weight" not in tensors
    k_norm = np.asarray(tensors["blk.1.attn_k_norm.weight"].data)  # type: ignore[attr-defined]
    want = torch.stack([n.weight for n in model.model.layers[1].self_attn.k_layernorm.norms])
    assert np.array_equal(k_norm.reshape(want.shape), want.detach().numpy())
    docs = [d for d in load_documents("stdlib") if d.path == "json/decoder.py"]
    ids = tokenize_documents(docs, tokenizer)[:200].tolist()
    assert _llama_check(out, model, tokenizer, ids) < KL_MAX


@needs_llama
def test_phi3_long_rope_in_llama_cpp(trained_dir: Callable[[str], Path], tmp_path: Path) -> None:
    """Phi-3.5 / Phi-4-mini's LongRoPE: short factors up to the original context, long ones beyond,
    cos/sin scaled by the attention factor; llama.cpp reads the factors as tensors and picks them by
    its context size (short in a context of the original 256, long in 512, where transformers takes
    the long ones for the 300-token sequence)."""
    from transformers import AutoModelForCausalLM

    src = trained_dir("phi3")
    loaded = lmpress.load(src, device="cpu")
    config = loaded.model.config.to_dict()
    n = int(16 * config["rope_parameters"]["partial_rotary_factor"]) // 2  # rotary frequencies per head
    torch.manual_seed(0)
    short, long = (1 + torch.rand(n)).tolist(), (4 + 8 * torch.rand(n)).tolist()
    rope = {"rope_type": "longrope", "short_factor": short, "long_factor": long, "rope_theta": 10000.0}
    config.update(max_position_embeddings=1024, original_max_position_embeddings=256)
    config["rope_parameters"] = {**config["rope_parameters"], **rope, "original_max_position_embeddings": 256}
    model = AutoModelForCausalLM.from_pretrained(src, config=type(loaded.model.config).from_dict(config)).eval()
    out = tmp_path / "phi35.gguf"
    export(LoadedModel(model, loaded.tokenizer, "phi3.5", src), "gguf", out)
    tensors, fields = _reader_tensors(out), gguf.GGUFReader(str(out)).fields
    for name, factors in (("rope_factors_short.weight", short), ("rope_factors_long.weight", long)):
        assert np.allclose(np.asarray(tensors[name].data), factors)  # type: ignore[attr-defined]
    attn_factor = float(fields["phi3.rope.scaling.attn_factor"].parts[-1][0])
    assert attn_factor == pytest.approx(model.model.rotary_emb.attention_scaling) and attn_factor > 1
    assert int(fields["phi3.rope.scaling.original_context_length"].parts[-1][0]) == 256
    docs = [d for d in load_documents("stdlib") if d.path == "json/decoder.py"]
    ids = tokenize_documents(docs, loaded.tokenizer)[:300].tolist()
    assert _llama_check(out, model, loaded.tokenizer, ids[:200], n_ctx=256) < KL_MAX  # short factors
    assert _llama_check(out, model, loaded.tokenizer, ids, n_ctx=512) < KL_MAX  # long factors
    swapped = _llama_check(out, model, loaded.tokenizer, ids[:200], n_ctx=512)  # long in llama.cpp only
    assert swapped > 5 * KL_MAX  # the factors matter: a mix-up would show (8e-3 here)


@needs_llama
def test_command_r_q_k_norms_in_llama_cpp(tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Command R+'s layout: a LayerNorm weight row per query and key head, written (heads, head_dim);
    llama.cpp's command-r reads them only in models of 64 layers or more, so fewer are refused."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_config

    config = tiny_config("cohere", len(tokenizer))
    config.use_qk_norm, config.initializer_range = True, 0.2
    torch.manual_seed(0)
    two_layers = LoadedModel(AutoModelForCausalLM.from_config(config), tokenizer, "cohere", tmp_path)
    with pytest.raises(ExportError, match="Cohere with q/k norms in 2 layers: llama.cpp's command-r reads"):
        export(two_layers, "gguf", tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())
    config.num_hidden_layers = 64
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # per-head norms that differ, so the order of the rows matters
        for name, p in model.named_parameters():
            if "_norm" in name:
                p.copy_(torch.randn_like(p) * 0.5 + 1)
    out = tmp_path / "command-r.gguf"
    export(LoadedModel(model, tokenizer, "cohere", tmp_path), "gguf", out)
    k_norm = np.asarray(_reader_tensors(out)["blk.1.attn_k_norm.weight"].data)  # type: ignore[attr-defined]
    want = model.model.layers[1].self_attn.k_norm.weight.detach().numpy()  # (key/value heads, head_dim)
    assert np.array_equal(k_norm.reshape(want.shape), want)
    docs = [d for d in load_documents("stdlib") if d.path == "json/decoder.py"]
    ids = tokenize_documents(docs, tokenizer)[:200].tolist()
    assert _llama_check(out, model, tokenizer, ids) < KL_MAX


def test_a_layer_without_an_exact_type_is_refused_or_requantized(tmp_path: Path) -> None:
    loaded = _compress({"method": "rtn", "bits": 4, "group_size": 128})
    out = tmp_path / "w4.gguf"
    with pytest.raises(ExportError, match=r"model\.layers\.0\.self_attn\.q_proj .*nearest is q4_k.*--requantize q4_k"):
        export(loaded, "gguf", out)
    assert not out.exists() and not list(tmp_path.iterdir())
    report = export(loaded, "gguf", out, requantize="q4_k")
    assert len(report.requantized) == 28 and report.type_counts()["q4_k"] == 28


@pytest.mark.parametrize(
    ("stage", "match"),
    [
        ({"method": "magnitude", "sparsity": 0.5}, "sparse layers have no GGUF type; pass --densify"),
        ({"method": "lowrank", "target": 0.2, "whiten": False}, "low-rank layers have no GGUF type"),
        ({"method": "share", "target": 0.25, "merge": "mean"}, "shared with"),
    ],
)
def test_unrepresentable_models_are_refused(stage: dict[str, object], match: str, tmp_path: Path) -> None:
    loaded = _compress(stage)
    with pytest.raises(ExportError, match=match):
        export(loaded, "gguf", tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())


def test_widths_the_config_cannot_state_are_refused(
    tiny_model_dir: Callable[..., Path], text_file: Path, tmp_path: Path
) -> None:
    """Phi-3 with fewer heads in every block: its config cannot say so (transformers' rope checks
    read hidden_size / heads), so lmpress reloads it from its record, and no runtime file can hold it."""
    data = lmpress.DataOptions(source=text_file, seq_len=64, calib_windows=4)
    stage = {"method": "structured", "target": 0.5, "multiple_of": 8}
    lmpress.compress(tiny_model_dir("phi3"), {"stages": [stage]}, data, output=tmp_path / "s", run_eval=False)
    with pytest.raises(ExportError, match=r"heads': 2.*which its config cannot state.*attention: false"):
        export(tmp_path / "s", "gguf", tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_densify_writes_sparse_layers_exactly(tmp_path: Path) -> None:
    loaded = _compress({"method": "magnitude", "sparsity": 0.5})
    out = tmp_path / "s.gguf"
    export(loaded, "gguf", out, densify=True)
    t = _reader_tensors(out)["blk.0.ffn_up.weight"]
    dense = loaded.model.model.layers[0].mlp.up_proj.dense_weight(torch.bfloat16)  # type: ignore[union-attr, operator]
    assert np.array_equal(np.asarray(t.data).view(np.int16), dense.view(torch.int16).numpy())  # type: ignore[attr-defined]


def test_opt_is_refused(tiny_model_dir: Callable[..., Path], tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="opt models are not exported.*gpt_neox.*phi"):
        export(tiny_model_dir("opt"), "gguf", tmp_path / "o.gguf")


runner = CliRunner()


def test_cli_export_and_bad_input(tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    r = runner.invoke(app, ["export", "builtin", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "exported" in r.stdout and out.stat().st_size > 8_000_000
    before = out.read_bytes()
    for args, msg in (
        (["export", "builtin", "-o", str(out)], "exists"),
        (["export", "builtin", "-o", str(tmp_path / "m.bin")], "should end in .gguf"),
        (["export", "builtin", "-o", str(tmp_path / "n.gguf"), "--requantize", "q9_k"], "unknown GGUF type"),
        (["export", "nowhere", "-o", str(tmp_path / "n.gguf")], "neither a model directory"),
        (["export", "builtin", "--to", "onnx2", "-o", str(tmp_path / "n.gguf")], "unknown export format"),
        (["compress", "-r", "w8", "--export", "gguf"], "--export needs -o"),
    ):
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, (args, r.output)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_compress_export_writes_beside_the_directory(tmp_path: Path) -> None:
    out = tmp_path / "q8"
    r = runner.invoke(
        app,
        ["compress", "-r", "gguf-q8_0", "-o", str(out), "--export", "gguf", "--no-eval", "--calib-windows", "8"],
    )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "q8.gguf").is_file() and (out / "lmpress.json").is_file()
    assert "q8_0" in r.stdout


@needs_llama
def test_eval_measures_a_gguf_file_in_llama_cpp(tmp_path: Path) -> None:
    loaded = _compress({"method": "gptq", "grid": "q4_k", "embedding_grid": "q4_k", "ignore": []})
    src = tmp_path / "q4k"
    lmpress.save(loaded.model, loaded.tokenizer, src)
    out = tmp_path / "q4k.gguf"
    export(src, "gguf", out)
    data = lmpress.DataOptions(eval_windows=4)
    ours = lmpress.evaluate(out, data, reference=src, measure_speed=True)
    m = ours.metrics
    assert m["kl"] < KL_MAX and m["top1_agreement"] > 0.97
    assert 0 <= m["kl_median"] <= m["kl"] <= m["kl_p99"] <= m["kl_p999"] <= m["kl_max"]  # llama.cpp's KL summary
    assert m["bytes_on_disk"] == out.stat().st_size and m["parameters"] == ours.reference_metrics["parameters"]  # type: ignore[index]
    assert m["perplexity"] == pytest.approx(ours.reference_metrics["perplexity"], rel=0.02)  # type: ignore[index]
    assert m["decode_tokens_per_s"] > 0 and m["prefill_tokens_per_s"] > 0
    r = runner.invoke(app, ["eval", str(out), "--max-windows", "2", "--no-speed"])
    assert r.exit_code == 0 and "perplexity" in r.stdout, r.output
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf file")
    r = runner.invoke(app, ["eval", str(fake)])
    assert r.exit_code == 2 and "not a GGUF file" in r.output


def test_requantize_reports_the_kl_it_cost(tmp_path: Path) -> None:
    loaded = _compress({"method": "rtn", "bits": 4, "group_size": 64, "embedding_bits": 8, "embedding_group_size": 64})
    before = {n: type(m).__name__ for n, m in loaded.model.named_modules()}
    report = export(loaded, "gguf", tmp_path / "r.gguf", requantize="q4_0", kl_windows=2)
    assert report.requantize_kl is not None and 1e-4 < report.requantize_kl < 0.05
    assert report.type_counts()["q4_0"] == 29  # 28 linears + the embeddings (the head is not quantized)
    assert {n: type(m).__name__ for n, m in loaded.model.named_modules()} == before  # the model is left as it was


# ---- more families, rope scaling, byte-fallback tokenizers ------------------------------------------


def _family_check(src: Path, tmp_path: Path, tag: str) -> float:
    loaded = lmpress.load(src, device="cpu")
    out = tmp_path / f"{tag}.gguf"
    export(loaded, "gguf", out)
    docs = [d for d in load_documents("stdlib") if d.path == "json/decoder.py"]
    ids = tokenize_documents(docs, loaded.tokenizer)[:200].tolist()
    return _llama_check(out, loaded.model, loaded.tokenizer, ids)


def _with_config(src: Path, dst: Path, **changes: object) -> Path:
    """A copy of a saved model with its config.json changed."""
    import json
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@needs_llama
@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
            "rope_theta": 10000.0,
        },
    ],
    ids=["linear", "llama3"],
)
def test_scaled_rope_in_llama_cpp(rope: dict[str, object], trained_dir: Callable[[str], Path], tmp_path: Path) -> None:
    """Llama 3.1-style and linear rope scaling: llama.cpp computes what the model computes (and the
    scaling changes the logits, so the check is not vacuous)."""
    src = _with_config(trained_dir("llama"), tmp_path / "scaled", rope_parameters=rope, rope_scaling=rope)
    loaded = lmpress.load(src, device="cpu")
    plain = lmpress.load(trained_dir("llama"), device="cpu")
    docs = [d for d in load_documents("stdlib") if d.path == "json/decoder.py"]
    ids = tokenize_documents(docs, loaded.tokenizer)[:200].tolist()
    assert _kl(_lmpress_logits(plain.model, ids), _lmpress_logits(loaded.model, ids)) > 1e-3  # the scaling matters
    out = tmp_path / "scaled.gguf"
    report = export(loaded, "gguf", out)
    assert ("rope_freqs.weight" in report.types) == (rope["rope_type"] == "llama3")
    assert _llama_check(out, loaded.model, loaded.tokenizer, ids) < KL_MAX


def test_yarn_rope_is_refused(trained_dir: Callable[[str], Path], tmp_path: Path) -> None:
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0}
    src = _with_config(trained_dir("llama"), tmp_path / "yarn", rope_parameters=rope, rope_scaling=rope)
    with pytest.raises(ExportError, match="rope scaling 'yarn' is not exported"):
        export(src, "gguf", tmp_path / "y.gguf")
    assert not (tmp_path / "y.gguf").exists()


def _spm_vocab_and_merges(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A SentencePiece BPE model's vocabulary and merges, ordered as transformers' converter orders
    them (every split of a piece into two pieces, by the piece's score), without its protobuf reader."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(path))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    score = {p: sp.get_score(i) for p, i in vocab.items()}
    merges: list[tuple[str, str, float]] = []
    for piece in vocab:
        local = [(piece[:k], piece[k:], score[piece]) for k in range(1, len(piece))]
        local = [m for m in local if m[0] in vocab and m[1] in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return vocab, [(left, right) for left, right, _ in merges]


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama-2-style model directory: a SentencePiece BPE tokenizer with byte fallback, trained with
    sentencepiece and built as transformers builds Llama 2's and Mistral's, and a tiny random Llama."""
    import sentencepiece as spm
    from transformers import AutoModelForCausalLM, LlamaTokenizer

    from tests.conftest import tiny_config

    root = tmp_path_factory.mktemp("spm")
    text = root / "train.txt"
    docs = [d for d in load_documents("stdlib") if d.path in ("json/encoder.py", "abc.py", "csv.py", "base64.py")]
    text.write_text("\n".join(d.text for d in docs))
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(root / "sp"), vocab_size=600, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, minloglevel=2,
    )  # fmt: skip
    tokenizer = LlamaTokenizer(*_spm_vocab_and_merges(root / "sp.model"))
    torch.manual_seed(0)
    config = tiny_config("llama", len(tokenizer))
    config.bos_token_id, config.eos_token_id = 1, 2
    model = AutoModelForCausalLM.from_config(config)
    out = root / "model"
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def test_byte_fallback_split_matches_the_tokenizer(spm_dir: Path) -> None:
    """lmpress's copy of llama.cpp's SentencePiece merging, on the exported scores, splits held-out text
    (with characters the vocabulary lacks) exactly as the tokenizer does."""
    from lmpress.export.gguf_vocab import _backend_json, spm_metadata, spm_tokenize

    tokenizer = lmpress.load(spm_dir, device="cpu").tokenizer
    tok = _backend_json(tokenizer)
    meta = spm_metadata(tokenizer, tok, len(tokenizer))
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.add_space_prefix"] is True
    types = meta["tokenizer.ggml.token_type"]
    assert types[0] == 2 and types[1] == types[2] == 3 and types[3:259] == [6] * 256  # unk, control, 256 bytes
    ids = {t: i for i, t in enumerate(meta["tokenizer.ggml.tokens"])}
    byte_ids = [ids[f"<0x{b:02X}>"] for b in range(256)]
    docs = select_split(load_documents("stdlib"), "eval")[:2]
    for doc in docs:
        text = doc.text[:3000] + " — ünïcödé 中文 🙂"
        want = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert spm_tokenize(text, ids, meta["tokenizer.ggml.scores"], byte_ids, True) == want
        assert any(i in byte_ids for i in want)  # byte fallback was exercised


@needs_llama
def test_byte_fallback_tokenizer_in_llama_cpp(spm_dir: Path, tmp_path: Path) -> None:
    loaded = lmpress.load(spm_dir, device="cpu")
    out = tmp_path / "spm.gguf"
    export(loaded, "gguf", out)
    docs = select_split(load_documents("stdlib"), "eval")[:1]
    text = docs[0].text[:900] + "\n  naïve 中文 🙂 end"
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert _llama_check(out, loaded.model, loaded.tokenizer, ids) < KL_MAX
    llm = _llama(out)
    with_bos = llm.tokenize(b"hello world", add_bos=True, special=False)  # type: ignore[attr-defined]
    assert with_bos == loaded.tokenizer("hello world")["input_ids"]
    assert llm.detokenize(llm.tokenize(text.encode(), add_bos=False)).decode() == " " + text  # type: ignore[attr-defined]


def test_a_tokenizer_llama_cpp_would_split_differently_is_refused(spm_dir: Path, tmp_path: Path) -> None:
    import json
    import shutil

    from tokenizers import pre_tokenizers

    loaded = lmpress.load(spm_dir, device="cpu")
    loaded.tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(split=True)  # type: ignore[union-attr]
    with pytest.raises(ExportError, match="handles spaces in a way llama.cpp"):
        export(loaded, "gguf", tmp_path / "odd.gguf")
    # a token no merge makes: llama.cpp's merging (by the concatenation's score) would still produce it
    tok = json.loads((spm_dir / "tokenizer.json").read_text())
    merges = [m.split(" ") if isinstance(m, str) else m for m in tok["model"]["merges"]]
    last = "".join(merges[-1])  # made by the last merge only; renamed, nothing makes it
    tok["model"]["merges"] = [m for m in merges if "".join(m) != last]
    tok["model"]["vocab"]["qz"] = tok["model"]["vocab"].pop(last)  # no merge (q, z): the tokenizer never uses it
    src = tmp_path / "odd"
    shutil.copytree(spm_dir, src)
    (src / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ExportError, match="would split 'qz' differently"):
        export(src, "gguf", tmp_path / "odd.gguf")
    assert not (tmp_path / "odd.gguf").exists()
