"""ONNX export: lmpress's codes as ONNX Runtime's MatMulNBits / MatMulInteger in a decoder graph
with its KV cache, run by ``onnxruntime`` itself and compared with lmpress's own forward."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import lmpress
from lmpress.cli import app
from lmpress.evaluation import count_parameters
from lmpress.export import ExportError, export
from lmpress.io import weight_bytes
from lmpress.io.load import LoadedModel
from tests.export.helpers import compress, exact_fp32, held_out_windows, kl

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from lmpress.export.onnx_runtime import OnnxModel  # noqa: E402

KL_MAX = 1e-5  # per token, against lmpress's own float32 forward (the issue asks 1e-4)
# W8A8 rounds every activation to int8: float32 differences of one ulp in a layer's input (ONNX
# Runtime fuses RMSNorm and reorders sums) flip roundings, and the flips add up over 28 layers.
# lmpress against itself with its embeddings perturbed by 1e-7 (relative) differs by 1.6e-5.
KL_W8A8 = 1e-3


@pytest.fixture(scope="module")
def held_out() -> torch.Tensor:
    return held_out_windows()


def _kl_in_ort(loaded: LoadedModel, out: Path, ids: torch.Tensor) -> float:
    """KL per token between lmpress's float32 logits and ONNX Runtime's of the exported graph."""
    ours_model = exact_fp32(loaded.model)
    with torch.no_grad():
        ours = ours_model(input_ids=ids).logits
    theirs = OnnxModel(out)(input_ids=ids).logits
    return kl(ours, theirs)


@pytest.mark.parametrize(
    ("stages", "layout"),
    [
        ([{"method": "rtn", "bits": 4, "group_size": 128, "symmetric": True}], "MatMulNBits w4 g128"),
        ([{"method": "gptq", "bits": 4, "group_size": 64}], "MatMulNBits w4 g64"),
        ([{"method": "rtn", "bits": 4, "group_size": 256}], "MatMulNBits w4 g256"),
        ([{"method": "rtn", "bits": 4, "group_size": None}], "MatMulNBits w4 channel"),
        ([{"method": "rtn", "bits": 8, "group_size": None, "symmetric": True}], "MatMulNBits w8 channel"),
        ([{"method": "rtn", "bits": 8, "group_size": 32}], "MatMulNBits w8 g32"),
        ([{"method": "w8a8"}], "MatMulInteger w8a8"),
    ],
)
def test_onnx_runtime_computes_what_lmpress_computes(
    stages: list[dict[str, object]], layout: str, held_out: torch.Tensor, tmp_path: Path
) -> None:
    loaded = compress(stages)
    report = export(loaded, "onnx", tmp_path / "onnx")
    assert report.type_counts() == {layout: 28, "MatMul": 1}  # every block linear; the head stays dense
    assert _kl_in_ort(loaded, tmp_path / "onnx", held_out) < (KL_W8A8 if "w8a8" in layout else KL_MAX)
    assert (tmp_path / "onnx" / "tokenizer.json").is_file() and (tmp_path / "onnx" / "config.json").is_file()


def test_the_cache_decodes_like_the_whole_sequence_and_generation_matches(
    held_out: torch.Tensor, tmp_path: Path
) -> None:
    loaded = compress([{"method": "gptq", "bits": 4, "group_size": 128}])
    export(loaded, "onnx", tmp_path / "onnx")
    ort_model = OnnxModel(tmp_path / "onnx")
    ids = held_out[:, :40]
    whole = ort_model(input_ids=ids).logits
    out = ort_model(input_ids=ids[:, :30], use_cache=True)
    steps = []
    for t in range(30, 40):
        out = ort_model(input_ids=ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
        steps.append(out.logits[:, 0])
    assert out.past_key_values.length == 40
    assert torch.allclose(torch.stack(steps, 1), whole[:, 30:], atol=1e-4)

    prompt = held_out[:1, :24]
    theirs = ort_model.generate(prompt, max_new_tokens=32)
    ours = exact_fp32(loaded.model).generate(  # type: ignore[operator]
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, do_sample=False, pad_token_id=0
    )
    assert theirs.shape == (1, 56) and torch.equal(theirs, ours)


def test_large_models_keep_their_weights_beside_the_graph(
    held_out: torch.Tensor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past protobuf's 2 GB the weights must live in model.onnx.data: forced here on the built-in model."""
    import lmpress.export.onnx as onnx_export

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    loaded = compress([{"method": "rtn", "bits": 4, "group_size": 64}])
    report = export(loaded, "onnx", tmp_path / "onnx")
    graph, data = tmp_path / "onnx" / "model.onnx", tmp_path / "onnx" / "model.onnx.data"
    assert graph.stat().st_size < 200_000 and data.stat().st_size > 0.95 * report.bytes
    assert _kl_in_ort(loaded, tmp_path / "onnx", held_out) < KL_MAX


def test_bytes_follow_the_bits(tmp_path: Path) -> None:
    dense = export("builtin", "onnx", tmp_path / "dense")
    w4 = export(compress([{"method": "rtn", "bits": 4, "group_size": 128}]), "onnx", tmp_path / "w4")
    # the blocks' linears go from bfloat16 (stored as the model holds them) to 4 bits + a float32
    # scale and a 4-bit zero per 128; the embeddings and the head stay bfloat16
    weights = 4 * (2 * 256 * 256 + 2 * 256 * 128 + 3 * 256 * 512)  # q, o; k, v; gate, up, down
    assert dense.bytes - w4.bytes == pytest.approx(weights * (16 - 4 - 36 / 128) / 8, rel=0.01)
    assert dense.bytes == pytest.approx(weight_bytes(lmpress.load("builtin").path), rel=0.01)


def _tiny(arch: str, tmp_path: Path, tokenizer: object, name: str = "", **overrides: object) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    kw: dict[str, object] = {
        "vocab_size": len(tokenizer),  # type: ignore[arg-type]
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "bos_token_id": 0,
        "eos_token_id": 0,
        **overrides,
    }
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **kw))
    out = tmp_path / f"tiny-{arch}{name}"
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)  # type: ignore[attr-defined]
    return out


def test_families(trained_dir: Callable[[str], Path], tokenizer: object, tmp_path: Path) -> None:
    """Qwen2 and GPT-2 (quantized Conv1D, tied head) trained; Qwen3 (per-head q/k norms, explicit
    head_dim), a Llama whose MLP width (100) is no multiple of any block (padded codes), and Llamas
    with scaled ropes: yarn (computed in the graph, attention scaling 1.14) and dynamic (tables)."""
    ids = torch.arange(64)[None] % 500
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0}
    dynamic = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    cases = [
        (trained_dir("qwen2"), {"bits": 4, "group_size": 32}),
        (trained_dir("gpt2"), {"bits": 4, "group_size": 32}),
        (trained_dir("gpt2"), {"bits": 8, "group_size": None}),
        (_tiny("qwen3", tmp_path, tokenizer, head_dim=32), {"bits": 4, "group_size": 16}),
        (_tiny("llama", tmp_path, tokenizer, intermediate_size=100), {"bits": 4, "group_size": None}),
        (_tiny("llama", tmp_path, tokenizer, "-yarn", rope_parameters=yarn), {"bits": 8, "group_size": 64}),
        (_tiny("llama", tmp_path, tokenizer, "-dyn", rope_parameters=dynamic), {"bits": 4, "group_size": 64}),
    ]
    for i, (src, quant) in enumerate(cases):
        loaded = compress([{"method": "rtn", **quant}], src)
        out = tmp_path / f"onnx-{i}"
        report = export(loaded, "onnx", out)
        assert sum(n for f, n in report.type_counts().items() if f.startswith("MatMulNBits")) >= 8, report.formats
        graph = onnx.load(str(out / "model.onnx"))
        tables = {
            i.name.split("_")[0] + "_" + i.name.split("_")[1] for i in graph.graph.initializer if "rope_" in i.name
        }
        if "llama" in src.name:
            assert tables == ({"rope_cos", "rope_sin"} if "dyn" in src.name else {"rope_inv"}), tables
        assert _kl_in_ort(loaded, out, ids) < KL_MAX, src


# each family's tiny model with what sets it apart from Llama visible in 48 tokens: windows shorter
# than the text, soft-caps that bite, a layer without rope, StableLM's per-head norms and parallel residual
FAMILY_CONFIGS: dict[str, dict[str, object]] = {
    "gemma3_text": {},  # a local (window 32) and a global layer, each with its rope base; 1 + w norms
    "qwen3": {},
    "smollm3": {"no_rope_layers": [1, 0]},
    "granite": {},
    "ministral": {"sliding_window": 16},
    "olmo2": {},
    "olmo3": {},  # a local (window 32) and a global layer
    "gemma2": {"attn_logit_softcapping": 0.5, "final_logit_softcapping": 0.3},
    "gemma": {},
    "starcoder2": {"sliding_window": 16},
    "stablelm": {"qk_layernorm": True, "use_parallel_residual": True},
}
TRANSFORMERS_ATOL = 1e-4  # the bound on the logits, float32


def _family_dir(arch: str, tokenizer: object, tmp_path: Path) -> Path:
    """A tiny random model of ``arch`` whose norms are not all ones (their weights and the order of
    StableLM's stacked per-head norms matter)."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_config

    config = tiny_config(arch, len(tokenizer))  # type: ignore[arg-type]
    for key, value in FAMILY_CONFIGS[arch].items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    out = tmp_path / arch
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)  # type: ignore[attr-defined]
    return out


def _decode(ort_model: OnnxModel, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """ONNX Runtime's logits over ``ids``: the first ``prompt`` tokens at once, then one a step with the cache."""
    out = ort_model(input_ids=ids[:, :prompt], use_cache=True)
    logits = [out.logits]
    for t in range(prompt, ids.shape[1]):
        out = ort_model(input_ids=ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
        logits.append(out.logits)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("arch", FAMILY_CONFIGS)
def test_families_decode_in_onnx_runtime_as_in_transformers(arch: str, tokenizer: object, tmp_path: Path) -> None:
    """Dense: ONNX Runtime with its cache (40 tokens, then 8 one at a time) gives transformers'
    float32 logits within 1e-4. RTN W4: MatMulNBits everywhere, within KL_MAX of lmpress's forward."""
    src = _family_dir(arch, tokenizer, tmp_path)
    loaded = lmpress.load(src, device="cpu")
    ids = torch.randint(0, len(tokenizer), (1, 48), generator=torch.Generator().manual_seed(1))  # type: ignore[arg-type]
    export(loaded, "onnx", tmp_path / "dense")
    with torch.no_grad():
        ours = exact_fp32(loaded.model)(input_ids=ids).logits
    theirs = _decode(OnnxModel(tmp_path / "dense"), ids, 40)
    assert (theirs - ours).abs().max() < TRANSFORMERS_ATOL, (arch, (theirs - ours).abs().max())

    w4 = compress([{"method": "rtn", "bits": 4, "group_size": 16}], src)
    report = export(w4, "onnx", tmp_path / "w4")
    n_linears = 2 * (6 if arch == "starcoder2" else 7)
    assert report.type_counts().get("MatMulNBits w4 g16") == n_linears, report.formats
    assert _kl_in_ort(w4, tmp_path / "w4", ids) < KL_MAX


def test_what_the_onnx_graph_cannot_compute_is_refused(tokenizer: object, tmp_path: Path) -> None:
    """A family without a graph (OPT), Gemma 3 attending both ways, an MLP activation the graph
    lacks: one line, nothing written."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_config

    opt = AutoModelForCausalLM.from_config(tiny_config("opt", len(tokenizer)))  # type: ignore[arg-type]
    with pytest.raises(ExportError, match="opt models have no graph in lmpress's ONNX export for ONNX Runtime"):
        export(LoadedModel(opt, tokenizer, "opt", tmp_path), "onnx", tmp_path / "x")
    src = _family_dir("gemma3_text", tokenizer, tmp_path)
    loaded = lmpress.load(src, device="cpu")
    loaded.model.config.use_bidirectional_attention = True
    with pytest.raises(ExportError, match="ONNX export of Gemma 3 with use_bidirectional_attention set"):
        export(loaded, "onnx", tmp_path / "x")
    loaded.model.config.use_bidirectional_attention = False
    loaded.model.model.layers[1].mlp.act_fn = torch.nn.Mish()
    with pytest.raises(ExportError, match=r"layers\.1\.mlp: no activation lmpress's ONNX graph computes among .*Mish"):
        export(loaded, "onnx", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_quantized_sparse_layers_densify_to_exact_zeros(held_out: torch.Tensor, tmp_path: Path) -> None:
    loaded = compress([{"method": "sparsegpt", "sparsity": 0.5, "pattern": "2:4", "bits": 4, "group_size": 128}])
    with pytest.raises(ExportError, match="no sparse MatMul.*--densify"):
        export(loaded, "onnx", tmp_path / "s")
    report = export(loaded, "onnx", tmp_path / "s", densify=True)
    assert len(report.densified) == 28 and report.type_counts() == {"MatMulNBits w4 g128": 28, "MatMul": 1}
    assert _kl_in_ort(loaded, tmp_path / "s", held_out) < KL_MAX


@pytest.mark.parametrize(
    ("stages", "match"),
    [
        ([{"method": "rtn", "bits": 3, "group_size": 64}], "3-bit codes have no MatMulNBits form"),
        ([{"method": "rtn", "bits": 4, "group_size": 96}], "groups of 96 are not"),
        ([{"method": "hqq", "bits": 4, "group_size": 64}], "fractional zero points"),
        ([{"method": "lowrank", "target": 0.2, "whiten": False}], "low-rank layers have no ONNX form"),
        ([{"method": "share", "target": 0.25, "merge": "mean"}], "shared with"),
        ([{"method": "rtn", "grid": "q4_k"}], "GGUF block types"),
    ],
)
def test_layouts_onnx_cannot_hold_are_refused(stages: list[dict[str, object]], match: str, tmp_path: Path) -> None:
    loaded = compress(stages)
    with pytest.raises(ExportError, match=match):
        export(loaded, "onnx", tmp_path / "x")
    assert not list(tmp_path.iterdir())


runner = CliRunner()


def test_cli_export_eval_and_bad_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "w4"
    args = ["compress", "-r", "w4", "-o", str(src), "--export", "onnx", "--no-eval", "--calib-windows", "4"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    out = tmp_path / "w4-onnx"
    assert (out / "model.onnx").is_file() and "MatMulNBits w4 g128" in r.stdout, r.output
    r = runner.invoke(app, ["eval", str(out), "--reference", str(src), "--max-windows", "2", "--json"])
    assert r.exit_code == 0, r.output
    metrics = json.loads(r.stdout)["metrics"]
    # the reference runs lmpress's bfloat16 int4 kernel, ONNX Runtime computes in float32
    assert metrics["kl"] < 1e-3 and metrics["decode_tokens_per_s"] > 0
    assert metrics["bytes"] == sum(f.stat().st_size for f in out.glob("model.onnx*"))
    assert metrics["parameters"] == count_parameters(lmpress.load(src, device="cpu").model)
    r = runner.invoke(app, ["compress", str(out), "-r", "w4", "-o", str(tmp_path / "again")])
    assert r.exit_code == 2 and "runs in ONNX Runtime" in r.output, r.output
    before = sorted(p.name for p in tmp_path.iterdir())
    for args, msg in (
        (["export", str(src), "--to", "onnx", "-o", str(out)], "exists and is not empty"),
        (["export", str(out), "--to", "gguf", "-o", str(tmp_path / "x.gguf")], "is already an export"),
        (["export", str(src), "--to", "onnx", "-o", str(tmp_path / "m.gguf")], "writes a directory"),
        (["export", str(src), "--to", "onnx", "-o", str(tmp_path / "n"), "--requantize", "q4_k"], "GGUF"),
    ):
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, (args, r.output)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "onnx" else real(n, *a))
    r = runner.invoke(app, ["export", str(src), "--to", "onnx", "-o", str(tmp_path / "n")])
    assert r.exit_code == 2 and "pip install 'lmpress[onnx]'" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before
