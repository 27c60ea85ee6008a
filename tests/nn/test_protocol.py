"""Every compressed layer is a `CompressedLayer` and comes back from its saved record and tensors
computing exactly what it computed before (alone, and inside a model saved and loaded by lmpress)."""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lmpress.nn
from lmpress.io import save
from lmpress.io.load import load_model
from lmpress.nn import (
    LAYER_FORMATS,
    CodebookLinear,
    CompressedLayer,
    GGUFEmbedding,
    GGUFLinear,
    LoRALinear,
    LowRankLinear,
    QuantEmbedding,
    QuantLinear,
    SparseLinear,
)
from lmpress.quant import ggml_fit
from lmpress.quant.grid import quantize


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.05


def _lora(out_f: int, in_f: int) -> LoRALinear:
    layer = LoRALinear(_quant(out_f, in_f), rank=2)
    layer.lora_a.copy_(_randn(2, in_f, seed=3))
    layer.lora_b.copy_(_randn(out_f, 2, seed=4))
    return layer


def _quant(out_f: int, in_f: int) -> QuantLinear:  # 4-bit groups of 32: the int4 kernel, codes dropped
    return QuantLinear.from_quantized(quantize(_randn(out_f, in_f), 4, 32), _randn(out_f, seed=1), False)


def _sparse(out_f: int, in_f: int, quantized: bool = False) -> SparseLinear:
    w = _randn(out_f, in_f)
    mask = w.abs() > 0.03
    q = quantize(w, 4, 32, symmetric=True) if quantized else None
    return SparseLinear.from_dense(w, mask, _randn(out_f, seed=1), q=q, symmetric=True)


def _codebook(out_f: int, in_f: int) -> CodebookLinear:
    idx = torch.randint(0, 16, (out_f, in_f), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    book = torch.linspace(-0.1, 0.1, 16)[None]
    return CodebookLinear.from_indices(idx, book, 4, None, torch.float16, _randn(out_f, seed=5).abs() + 0.5)


# one tiny layer of every format: (rows, cols) -> layer; rows x cols is (out, in) or (vocab, dim)
MAKE: dict[str, Callable[[int, int], CompressedLayer]] = {
    "quant": _quant,
    "sparse": _sparse,
    "lowrank": lambda o, i: LowRankLinear.from_factors(_randn(o, 4), _randn(4, i, seed=1), None, torch.float32),
    "codebook": _codebook,
    "gguf": lambda o, i: GGUFLinear.from_blocks(ggml_fit.quantize(_randn(o, i), "q8_0"), _randn(o, seed=1)),
    "lora": _lora,
    "quant_embedding": lambda v, d: QuantEmbedding.from_quantized(
        quantize(_randn(v, d), 4, 32), False, torch.float32, torch.float16
    ),
    "gguf_embedding": lambda v, d: GGUFEmbedding.from_blocks(ggml_fit.quantize(_randn(v, d), "q4_0"), torch.float32),
}


def _input(layer: CompressedLayer, rows: int, cols: int) -> torch.Tensor:
    if isinstance(layer, QuantEmbedding | GGUFEmbedding):
        return torch.tensor([[0, 5, rows - 1], [7, 7, 2]])
    return _randn(2, 3, cols, seed=9)


def _round_trip(layer: CompressedLayer, tmp_path: Path) -> CompressedLayer:
    """What `lmpress.io` does: the record through JSON, the tensors through safetensors, an empty
    layer built on the meta device from the record, the tensors assigned."""
    record = json.loads(json.dumps(layer.lmpress_format()))
    save_file({k: v.contiguous() for k, v in layer.state_dict().items()}, str(tmp_path / "layer.safetensors"))
    with torch.device("meta"):
        empty = LAYER_FORMATS[record["format"]].from_format(record, torch.float32)
    empty.load_state_dict(load_file(str(tmp_path / "layer.safetensors")), strict=True, assign=True)
    return empty


def test_every_layer_class_declares_the_protocol() -> None:
    modules = [importlib.import_module(m.name) for m in pkgutil.iter_modules(lmpress.nn.__path__, "lmpress.nn.")]
    defined = {c for m in modules for c in vars(m).values() if isinstance(c, type) and c.__module__ == m.__name__}
    layers = {c for c in defined if issubclass(c, nn.Module)} - {CompressedLayer}
    assert layers == set(LAYER_FORMATS.values())
    # a new format needs its case here; the experts layer (three inputs, 3-D weights): tests/test_moe.py
    assert set(MAKE) | {"quant_experts"} == set(LAYER_FORMATS)
    for name, cls in LAYER_FORMATS.items():
        assert issubclass(cls, CompressedLayer) and name == cls.FORMAT and not inspect.isabstract(cls)


def test_a_layer_without_a_format_name_or_with_a_taken_one_is_refused() -> None:
    with pytest.raises(TypeError, match="declares no FORMAT"):

        class Nameless(CompressedLayer):
            pass

    with pytest.raises(TypeError, match="format 'quant' is already QuantLinear's"):

        class Twin(CompressedLayer):
            FORMAT = "quant"

    assert LAYER_FORMATS["quant"] is QuantLinear


@pytest.mark.parametrize("fmt", sorted(MAKE))
def test_a_layer_comes_back_exactly_from_its_record_and_tensors(fmt: str, tmp_path: Path) -> None:
    rows, cols = 64, 128
    layer = MAKE[fmt](rows, cols)
    assert isinstance(layer, CompressedLayer) and layer.lmpress_format()["format"] == fmt
    x = _input(layer, rows, cols)
    with torch.no_grad():
        before = layer(x)  # prepares any kernel layout (the int4 one holds the only copy of the codes)
        again = _round_trip(layer, tmp_path)
        after = again(x)
    assert float((after - before).abs().max()) == 0.0
    assert again.lmpress_format() == layer.lmpress_format()
    assert again.num_logical_params() == layer.num_logical_params()
    w = layer.dense_weight().detach()
    assert w.shape == (rows, cols) and w.dtype == torch.float32
    assert float((again.dense_weight().detach() - w).abs().max()) == 0.0
    assert layer.dense_weight(torch.bfloat16).dtype == torch.bfloat16
    layer.materialize()  # the codes back from the kernel layout, then the layout dropped
    layer.forget_kernel()
    with torch.no_grad():
        assert float((layer(x) - before).abs().max()) == 0.0  # prepared again, same numbers


# where each linear format goes in a tiny llama (hidden 64, MLP 128, 2 blocks)
SLOTS = {
    "model.layers.0.self_attn.q_proj": "quant",
    "model.layers.0.self_attn.k_proj": "sparse",
    "model.layers.0.self_attn.v_proj": "lowrank",
    "model.layers.0.self_attn.o_proj": "codebook",
    "model.layers.0.mlp.down_proj": "gguf",
    "model.layers.1.self_attn.q_proj": "lora",
}


@pytest.mark.parametrize("embedding", ["quant_embedding", "gguf_embedding"])
def test_a_model_of_every_format_saves_and_loads_exactly(
    embedding: str, tiny_model_dir: Callable[..., Path], tmp_path: Path
) -> None:
    loaded = load_model(tiny_model_dir("llama"), device="cpu")
    model = loaded.model
    for name, fmt in {**SLOTS, "model.embed_tokens": embedding}.items():
        weight = model.get_submodule(name).weight
        assert isinstance(weight, torch.Tensor)
        rows, cols = weight.shape  # (out, in) or (vocab, dim)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, MAKE[fmt](int(rows), int(cols)))
    ids = torch.arange(48)[None] % 90
    with torch.no_grad():
        before = model(input_ids=ids).logits
    out = save(model, loaded.tokenizer, tmp_path / "out")
    records = json.loads((out / "lmpress.json").read_text())["modules"]
    again = load_model(out, device="cpu")
    for name, fmt in {**SLOTS, "model.embed_tokens": embedding}.items():
        assert records[name]["format"] == fmt
        assert type(again.model.get_submodule(name)) is LAYER_FORMATS[fmt]
    with torch.no_grad():
        after = again.model(input_ids=ids).logits
    assert float((after - before).abs().max()) == 0.0
