"""LFM2: attention and short-convolution blocks in one model, through the methods, save and reload,
and llama.cpp's lfm2 (the family list of tests/export/test_gguf.py runs the trained tiny model)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

import lmpress
from lmpress.arch.families.lfm2 import ffn_width
from lmpress.data_options import DataOptions
from lmpress.errors import ExportError
from lmpress.export import export
from lmpress.io.load import LoadedModel, load_model
from lmpress.pipeline import compress
from lmpress.sources import load_documents

HYBRID = ["conv", "conv", "full_attention", "conv"]  # as LFM2 itself: convolutions first


def _hybrid_config(vocab: int, **kw: object):  # type: ignore[no-untyped-def]
    """Four blocks in LFM2's order, and an MLP width LFM2-style: 2/3 of intermediate_size rounded up
    to a multiple (200 -> 133 -> 160), which the GGUF metadata must state as built."""
    sizes = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}
    sizes |= {"num_hidden_layers": len(HYBRID), "intermediate_size": 200, "block_multiple_of": 32}
    # initializer_range: logits away from uniform (at 0.2 they are so sharp that llama.cpp's 8-bit
    # activations alone cost a KL of 3e-3 with 4- or 8-bit weights)
    common = {"vocab_size": vocab, "bos_token_id": 0, "eos_token_id": 0, "initializer_range": 0.05}
    return AutoConfig.for_model("lfm2", **(common | sizes | {"layer_types": HYBRID} | kw))


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"block_multiple_of": 256},
        {"block_ffn_dim_multiplier": 1.5, "block_multiple_of": 48},
        {"block_auto_adjust_ff_dim": False},
    ],
)
def test_ffn_width_is_the_width_transformers_builds(kw: dict[str, object]) -> None:
    torch.manual_seed(0)
    config = _hybrid_config(64, **kw)
    model = AutoModelForCausalLM.from_config(config)
    assert ffn_width(config) == model.model.layers[0].feed_forward.w1.out_features


STAGES = {
    "gptq": {"method": "gptq", "bits": 4, "group_size": 32},
    "awq": {"method": "awq", "bits": 4, "group_size": 32},
    "hqq": {"method": "hqq", "bits": 4, "group_size": 32},
    "sparsegpt": {"method": "sparsegpt", "sparsity": 0.5},
}


@pytest.mark.parametrize("method", list(STAGES))
def test_each_method_compresses_every_linear_and_reloads_identically(
    method: str, tiny_model_dir: Callable[..., Path], text_file: Path, tmp_path: Path
) -> None:
    """Both block kinds' linears are compressed; the depthwise convolution kernels stay as they
    were (float); the saved directory reloads to the same logits."""
    src = tiny_model_dir("lfm2")
    original = load_model(src).model
    data = DataOptions(source=text_file, seq_len=32, eval_windows=4, calib_windows=8)
    r = compress(src, {"stages": [STAGES[method]]}, data, output=tmp_path / "o", measure_speed=False)
    layers = r.model.model.layers
    for name in ("conv.in_proj", "conv.out_proj", "feed_forward.w2"):
        assert not isinstance(layers[0].get_submodule(name), nn.Linear), name
    for name in ("self_attn.q_proj", "self_attn.out_proj", "feed_forward.w1"):
        assert not isinstance(layers[1].get_submodule(name), nn.Linear), name
    assert torch.equal(layers[0].conv.conv.weight, original.model.layers[0].conv.conv.weight)
    assert r.metrics["compressed"]["kl"] < 2
    ids = torch.arange(40)[None] % 300
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "o").model(input_ids=ids).logits, r.model(input_ids=ids).logits)


def test_compressed_tensors_loads_in_transformers(
    tiny_model_dir: Callable[..., Path], text_file: Path, tmp_path: Path
) -> None:
    """The W4 linears of both block kinds as compressed-tensors, the kernels dense: transformers
    computes lmpress's logits (measured KL 2e-8)."""
    pytest.importorskip("compressed_tensors")
    from tests.export.test_compressed_tensors import KL_MAX, _check_in_transformers

    data = DataOptions(source=text_file, seq_len=32, eval_windows=4, calib_windows=8)
    compress(tiny_model_dir("lfm2"), {"stages": [STAGES["gptq"]]}, data, output=tmp_path / "o", measure_speed=False)
    loaded = load_model(tmp_path / "o")
    report = export(loaded, "compressed-tensors", tmp_path / "ct")
    assert report.type_counts() == {"w4 g32 asym": 12}  # 5 linears in the convolution block, 7 in the attention one
    assert _check_in_transformers(loaded, tmp_path / "ct", torch.arange(64)[None] % 500) < KL_MAX


def _field(reader: object, key: str) -> list[int]:
    f = reader.fields[key]  # type: ignore[attr-defined]
    return [int(f.parts[i][0]) for i in f.data]


@pytest.mark.parametrize(
    ("stage", "kl_max"),
    [({"method": "cast", "dtype": "float32"}, 1e-6), (STAGES["gptq"] | {"symmetric": True}, 1e-3)],
    ids=["dense", "gptq-q4_0"],
)
def test_hybrid_layout_in_llama_cpp(stage: dict[str, object], kl_max: float, tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Convolution blocks first, an attention block between them, and an adjusted MLP width:
    llama.cpp's lfm2 reads each block's kind from head_count_kv and computes lmpress's logits."""
    from tests.export.test_gguf import _llama_check

    gguf = pytest.importorskip("gguf")
    pytest.importorskip("llama_cpp")
    torch.manual_seed(0)
    src = tmp_path / "src"
    AutoModelForCausalLM.from_config(_hybrid_config(len(tokenizer))).save_pretrained(src)
    tokenizer.save_pretrained(src)
    r = lmpress.compress(src, {"stages": [stage]}, DataOptions(calib_windows=4), run_eval=False)
    out = tmp_path / "m.gguf"
    export(LoadedModel(r.model, tokenizer, "lfm2", src), "gguf", out)
    reader = gguf.GGUFReader(str(out))
    assert _field(reader, "lfm2.attention.head_count_kv") == [0, 0, 2, 0]
    assert _field(reader, "lfm2.feed_forward_length") == [160]
    tensors = {t.name: t for t in reader.tensors}
    assert "token_embd_norm.weight" in tensors and "output_norm.weight" not in tensors
    assert "blk.2.attn_q.weight" in tensors and "blk.2.shortconv.in_proj.weight" not in tensors
    kernel = tensors["blk.0.shortconv.conv.weight"]
    want = r.model.model.layers[0].conv.conv.weight.detach().flatten(1)  # (hidden, taps)
    assert np.array_equal(np.asarray(kernel.data).reshape(want.shape), want.numpy())
    docs = [d for d in load_documents("stdlib") if d.path == "json/decoder.py"]
    ids = tokenizer(docs[0].text[:2000])["input_ids"][:200]
    assert _llama_check(out, r.model, tokenizer, ids) < kl_max  # measured: 3e-9 dense, 3e-5 q4_0


def test_llama_cpp_lacks_convolution_biases(tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model = AutoModelForCausalLM.from_config(_hybrid_config(len(tokenizer), conv_bias=True))
    out = tmp_path / "m.gguf"
    with pytest.raises(ExportError, match="LFM2 with conv_bias: llama.cpp's lfm2 has no convolution"):
        export(LoadedModel(model, tokenizer, "lfm2", tmp_path), "gguf", out)
    assert not out.exists()
