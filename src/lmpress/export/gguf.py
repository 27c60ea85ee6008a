"""GGUF export: an lmpress model as a file llama.cpp (and Ollama, LM Studio) runs.

Every tensor is written exactly as lmpress computes with it:

- dense weights in their own dtype (F32, F16, BF16); norms and biases as F32 (exact upcasts);
- `GGUFLinear` / `GGUFEmbedding` (a quantizer run with ``grid:``): their bytes, as stored;
- `QuantLinear` / `QuantEmbedding` whose grid is a GGUF type (symmetric 8/5/4-bit in groups of 32
  with float16 scales: Q8_0, Q5_0, Q4_0; asymmetric 4/5-bit groups of 32 whose min ``-zero*scale``
  is exact in float16: Q4_1, Q5_1): the same codes and scales, repacked;
- anything else is refused with the nearest type named, or with ``requantize=TYPE`` rounded to
  that type from the weight the layer computes with (and reported).

Llama-family query and key rows are reordered the way llama.cpp's converter does (its rotary
embedding pairs neighbouring rows); rows are independent in every block type, so quantized rows
move as bytes. The tokenizer goes into the file's ``tokenizer.ggml.*`` keys (`lmpress.export.gguf_vocab`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lmpress.arch import Spec, is_conv1d, is_supported, spec_for, supporting, text_model
from lmpress.arch.gguf_keys import ROLE_NAMES, rope_settings, rope_theta
from lmpress.errors import ExportError
from lmpress.export.gguf_vocab import tokenizer_metadata
from lmpress.export.walk import Part, count_types, model_parts
from lmpress.formats import ggml, ggml_bytes
from lmpress.formats.ggml import GRID_FALLBACK
from lmpress.formats.gguf_file import BF16, F16, F32, U32, TensorSpec, write_gguf
from lmpress.formats.packing import decode_codes, decode_zeros
from lmpress.io.files import clean_stale
from lmpress.nn.gguf_linear import GGUFEmbedding, GGUFLinear
from lmpress.nn.quant_embedding import QuantEmbedding
from lmpress.nn.quant_linear import QuantLinear
from lmpress.quant import ggml_fit
from lmpress.quant.base import replace_module

log = logging.getLogger(__name__)

DENSE_TYPES = {torch.float32: F32, torch.float16: F16, torch.bfloat16: BF16}


@dataclass
class GGUFReport:
    """What an export wrote: the file, its size, the type of each tensor, what was requantized."""

    path: Path
    bytes: int
    types: dict[str, str] = field(default_factory=dict)  # GGUF tensor name -> type
    requantized: dict[str, str] = field(default_factory=dict)  # module -> why
    requantize_kl: float | None = None  # KL(model || requantized model) per token, measured

    def type_counts(self) -> dict[str, int]:
        return count_types(self.types)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "bytes": self.bytes,
            "types": self.type_counts(),
            "requantized": self.requantized,
            "requantize_kl": self.requantize_kl,
        }


def exact_gguf_type(layer: QuantLinear | QuantEmbedding) -> str | None:
    """The GGUF type that holds this layer's codes and scales exactly, or None."""
    width = layer.in_features if isinstance(layer, QuantLinear) else layer.embedding_dim
    if layer.group_size != 32 or width % 32 or getattr(layer, "act_bits", None):
        return None
    if getattr(layer, "float_zeros", False):
        return None
    scales = layer.scales
    if scales.dtype != torch.float16 and not torch.equal(scales.float(), scales.half().float()):
        return None
    if layer.symmetric:
        return {8: "q8_0", 5: "q5_0", 4: "q4_0"}.get(layer.bits)
    if layer.bits not in (4, 5):
        return None
    zeros = _zeros(layer)
    m = -(zeros * scales.float())
    return {4: "q4_1", 5: "q5_1"}[layer.bits] if torch.equal(m, m.half().float()) else None


def _zeros(layer: QuantLinear | QuantEmbedding) -> Tensor:
    if isinstance(layer, QuantLinear):
        return layer.zeros()

    return decode_zeros(layer.qzeros, None, layer.bits, tuple(layer.scales.shape), layer.scales.device)  # type: ignore[arg-type]


def _codes(layer: QuantLinear | QuantEmbedding) -> Tensor:
    if isinstance(layer, QuantLinear):
        return layer.codes()

    return decode_codes(layer.qweight, layer.bits, layer.embedding_dim, layer.symmetric)


def quant_to_blocks(layer: QuantLinear | QuantEmbedding, type_name: str) -> ggml.GGMLBlocks:
    """The same codes and scales as GGML blocks of ``type_name`` (an `exact_gguf_type`)."""
    t = ggml.ggml_type(type_name)
    d = layer.scales.half()
    if t.affine:
        m = (-(_zeros(layer) * layer.scales.float())).half()
        return ggml.GGMLBlocks(t, _codes(layer), d, m)
    return ggml.GGMLBlocks(t, _codes(layer), d)


def _dense_weight(module: nn.Module) -> Tensor | None:
    """The (out, in) weight of a layer that decodes to a dense matrix exactly, else None."""
    for attr in ("dense_weight", "dequantize_weight"):
        fn = getattr(module, attr, None)
        if callable(fn):
            return fn()  # type: ignore[no-any-return]
    w = getattr(module, "weight", None)
    return w if isinstance(w, Tensor) else None


def _rows_numpy(t: Tensor) -> np.ndarray:
    """A tensor's bytes as numpy (bfloat16 via its int16 view)."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy()
    return t.numpy()


def _f32_of(t: Tensor) -> Callable[[], np.ndarray]:
    return lambda: _rows_numpy(t.float())


class _Plan:
    """The tensors of one model in GGUF form, each converted only when written."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        floats = [p.dtype for p in model.parameters() if p.dtype in DENSE_TYPES]
        self.dtype = max(set(floats), key=floats.count) if floats else torch.float32  # the model's dtype
        self.report_types: dict[str, str] = {}

    def spec(self, name: str, part: Part, rows_perm: Tensor | None) -> TensorSpec:
        m = part.module
        if part.kind in ("norm", "bias", "tensor"):
            vec = part.tensor
            assert vec is not None
            if part.norm_kind == "rmsnorm_1p":  # llama.cpp's RMSNorm multiplies by the stored weight
                vec = vec.float() + 1
            self.report_types[name] = "f32"
            return TensorSpec(name, tuple(vec.shape), F32, vec.numel() * 4, lambda: _rows_numpy(vec.float()))
        blocks = self._blocks(part)
        if blocks is not None:
            type_name, get = blocks
            gt = ggml.ggml_type(type_name)
            rows, width = _shape(m)
            self.report_types[name] = type_name

            def data() -> np.ndarray:
                raw = get()
                return _rows_numpy(raw[rows_perm] if rows_perm is not None else raw)

            return TensorSpec(name, (rows, width), gt.type_id, rows * gt.row_bytes(width), data)
        w = _dense_weight(m)
        if w is None:
            raise ExportError(f"{part.module_name}: {type(m).__name__} has no weight to export")
        if part.conv1d:
            w = w.T
        dtype = w.dtype if w.dtype in DENSE_TYPES else torch.float32
        if dtype == torch.float32 and self.dtype != torch.float32:  # a decoded layer: its own dtype if exact
            narrow = w.to(self.dtype)
            if torch.equal(narrow.float(), w.float()):
                dtype = self.dtype
        self.report_types[name] = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}[dtype]
        shape = tuple(w.shape)

        def dense() -> np.ndarray:
            x = w.detach().to(dtype)
            return _rows_numpy(x[rows_perm] if rows_perm is not None else x)

        return TensorSpec(name, shape, DENSE_TYPES[dtype], w.numel() * dtype.itemsize, dense)

    def _blocks(self, part: Part) -> tuple[str, Callable[[], Tensor]] | None:
        m = part.module
        if isinstance(m, GGUFLinear | GGUFEmbedding):
            return m.gtype.name, lambda: m.blocks
        if isinstance(m, QuantLinear | QuantEmbedding):
            exact = exact_gguf_type(m)
            if exact is not None:
                return exact, lambda: ggml_bytes.pack(quant_to_blocks(m, exact))
            nearest = nearest_type(m)
            raise ExportError(
                f"{part.module_name} ({_describe(m)}) has no exact GGUF type; the nearest is {nearest}: "
                f"pass --requantize {nearest} (the extra error is measured), or quantize with grid: {nearest}"
            )
        return None


def _describe(m: QuantLinear | QuantEmbedding) -> str:
    return f"{m.bits}-bit, group {m.group_size}, {'symmetric' if m.symmetric else 'asymmetric'}"


def requantize_layers(model: nn.Module, type_name: str) -> dict[str, tuple[nn.Module, str]]:
    """Swap every quantized layer that has no exact GGUF type for a GGUF layer of ``type_name``
    (rounded from the weight it computes with); returns name -> (the original layer, what changed)."""
    swapped: dict[str, tuple[nn.Module, str]] = {}
    for name, m in list(model.named_modules()):
        if not isinstance(m, QuantLinear | QuantEmbedding) or exact_gguf_type(m) is not None:
            continue
        target = _fits(type_name, _shape(m)[1], name)
        if isinstance(m, QuantLinear):
            bias = m.bias.detach() if m.bias is not None else None
            new: nn.Module = GGUFLinear.from_blocks(ggml_fit.quantize(m.dequantize_weight(), target), bias)
        else:
            new = GGUFEmbedding.from_blocks(ggml_fit.quantize(m.weight.float(), target), m.out_dtype, m.padding_idx)
        replace_module(model, name, new)
        swapped[name] = (m, f"{_describe(m)} -> {target}")
    return swapped


@torch.no_grad()
def _logits(model: nn.Module, windows: Tensor) -> list[Tensor]:
    return [model(input_ids=w[None], use_cache=False).logits[0].float().log_softmax(-1) for w in windows]


def requantization_kl(
    model: nn.Module, type_name: str, windows: Tensor
) -> tuple[dict[str, tuple[nn.Module, str]], float]:
    """`requantize_layers`, with the mean per-token KL(before || after) it cost on ``windows``."""
    before = _logits(model, windows)
    swapped = requantize_layers(model, type_name)
    if not swapped:
        return swapped, 0.0
    after = _logits(model, windows)
    kl = sum(float((p.exp() * (p - q)).sum()) for p, q in zip(before, after, strict=True))
    return swapped, kl / sum(p.shape[0] for p in before)


def _fits(type_name: str, width: int, name: str) -> str:
    t = ggml.ggml_type(type_name)
    if width % t.block == 0:
        return t.name

    fb = GRID_FALLBACK.get(t.name)
    if fb and width % 32 == 0:
        return fb
    raise ExportError(f"{name}: {width} inputs are not a multiple of {t.block}, which {t.name} needs")


def nearest_type(m: QuantLinear | QuantEmbedding) -> str:
    """The GGUF type closest to a layer's bits and kind (for the refusal message)."""
    sym = m.symmetric
    return {2: "q2_k", 3: "q3_k", 4: "q4_0" if sym else "q4_k", 5: "q5_0" if sym else "q5_k", 6: "q6_k"}.get(
        m.bits, "q8_0"
    )


def _shape(m: nn.Module) -> tuple[int, int]:
    if isinstance(m, GGUFEmbedding | QuantEmbedding | nn.Embedding):
        return m.num_embeddings, m.embedding_dim
    if is_conv1d(m):  # GPT-2's Conv1D stores (in, out)
        return int(m.weight.shape[1]), int(m.weight.shape[0])  # type: ignore[union-attr, index]
    return m.out_features, m.in_features  # type: ignore[return-value]


def rope_tensors(model: nn.Module, spec: Spec) -> dict[str, Tensor]:
    """The rope tensors llama.cpp reads beside the weights: those the family makes of its config
    (Phi-3's long-rope factors), and llama3 rope as ``rope_freqs.weight``: the factor each rotary
    frequency is divided by, from the frequencies the model itself computes with."""
    config: Any = model.config
    gguf = spec.gguf
    out = dict(gguf.config_tensors(config)) if gguf is not None and gguf.config_tensors is not None else {}
    rope_type, rope = rope_settings(config)
    if gguf is None or not gguf.rope_freqs or rope_type != "llama3":
        return out
    inv_freq = next((f for m in model.modules() if isinstance(f := getattr(m, "inv_freq", None), Tensor)), None)
    if inv_freq is None:
        raise ExportError("llama3 rope: the model has no rotary module with inv_freq")
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    base = 1.0 / (rope_theta(config, rope) ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    return {**out, "rope_freqs.weight": (base / inv_freq.double()).float()}


def export_gguf(
    model: nn.Module,
    tokenizer: Any,
    path: Path,
    *,
    name: str = "lmpress",
    requantize: str | None = None,
    densify: bool = False,
    kl_windows: Tensor | None = None,
) -> GGUFReport:
    """Write ``model`` (with its tokenizer) as a GGUF file at ``path``; refuses before writing
    anything when a module has no GGUF form. A multimodal model is written as its text part."""
    model = text_model(model)
    config = model.config  # type: ignore[union-attr]
    model_type = getattr(config, "model_type", None)
    spec = spec_for(model_type) if is_supported(model_type) else None
    if spec is None or spec.gguf is None:
        raise ExportError(
            f"{model_type} models are not exported to GGUF yet; lmpress exports {', '.join(supporting('gguf'))}"
        )
    parts = model_parts(model, densify)
    n_vocab = _shape(next(p.module for p in parts if p.role == "token_embd"))[0]
    meta: dict[str, Any] = {  # refusals of the config or tokenizer come before any work
        "general.architecture": spec.gguf.arch,
        "general.name": name,
        "general.quantization_version": U32(2),
        **spec.gguf.metadata(config, n_vocab),
        **tokenizer_metadata(tokenizer, n_vocab),
    }
    swapped: dict[str, tuple[nn.Module, str]] = {}
    kl = None
    if requantize is not None:
        requantize = ggml.ggml_type(requantize).name
        if kl_windows is not None:
            swapped, kl = requantization_kl(model, requantize, kl_windows)
        else:
            swapped = requantize_layers(model, requantize)
        parts = model_parts(model, densify)
    try:
        return _write(model, meta, path, parts, spec, swapped, kl)
    finally:
        for module_name, (original, _) in swapped.items():  # the caller's model as it was
            replace_module(model, module_name, original)


def _zero_bias(plan: _Plan, gname: str, module: nn.Module) -> list[TensorSpec]:
    """The zero bias an architecture requires of a linear that has none (nothing where it has one)."""
    if isinstance(getattr(module, "bias", None), Tensor):
        return []
    name, zeros = gname.removesuffix(".weight") + ".bias", torch.zeros(_shape(module)[0])
    plan.report_types[name] = "f32"
    return [TensorSpec(name, tuple(zeros.shape), F32, zeros.numel() * 4, _f32_of(zeros))]


def _write(
    model: nn.Module,
    meta: dict[str, Any],
    path: Path,
    parts: list[Part],
    spec: Spec,
    swapped: dict[str, tuple[nn.Module, str]],
    kl: float | None,
) -> GGUFReport:
    plan = _Plan(model)
    specs = []
    config = model.config  # type: ignore[union-attr]
    extra = rope_tensors(model, spec)  # written after the token embedding
    names = spec.gguf.names if spec.gguf is not None else {}
    for p in parts:
        base = names.get(p.role) or ROLE_NAMES[p.role]
        gname = (f"blk.{p.block}." if p.block is not None else "") + base + (".bias" if p.kind == "bias" else ".weight")
        if p.kind == "bias":
            assert p.tensor is not None
            perm = spec.gguf_row_order(p.role, p.tensor.shape[0], config)
            vec = p.tensor[perm] if perm is not None else p.tensor
            specs.append(TensorSpec(gname, tuple(vec.shape), F32, vec.numel() * 4, _f32_of(vec)))
            plan.report_types[gname] = "f32"
            continue
        perm = spec.gguf_row_order(p.role, _shape(p.module)[0], config) if p.kind == "linear" else None
        specs.append(plan.spec(gname, p, perm))
        if p.kind == "linear" and spec.gguf is not None and p.role in spec.gguf.zero_biases:
            specs += _zero_bias(plan, gname, p.module)
        for tname, t in extra.items() if p.role == "token_embd" else ():
            specs.append(TensorSpec(tname, tuple(t.shape), F32, t.numel() * 4, _f32_of(t)))
            plan.report_types[tname] = "f32"
    path = Path(path)
    clean_stale(path)  # a file a killed export of the same path left
    size = write_gguf(path, meta, specs)
    requantized = {k: why for k, (_, why) in swapped.items()}
    return GGUFReport(path, size, plan.report_types, requantized, kl if swapped else None)
