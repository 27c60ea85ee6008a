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
move as bytes. The tokenizer goes into the file's ``tokenizer.ggml.*`` keys (`lmpress.export.vocab`).
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

from lmpress.export.gguf_file import BF16, F16, F32, U32, TensorSpec, write_gguf
from lmpress.export.vocab import tokenizer_metadata
from lmpress.export.walk import ExportError, Part, count_types, model_parts
from lmpress.nn.gguf_linear import GGUFEmbedding, GGUFLinear
from lmpress.nn.quant_embedding import QuantEmbedding
from lmpress.nn.quant_linear import QuantLinear
from lmpress.quant import ggml

log = logging.getLogger(__name__)

DENSE_TYPES = {torch.float32: F32, torch.float16: F16, torch.bfloat16: BF16}
# Hugging Face model_type -> llama.cpp architecture; "permute": q/k rows reordered for its rotary layout
ARCH = {
    "llama": ("llama", True),
    "mistral": ("llama", True),
    "qwen2": ("qwen2", False),
    "qwen3": ("qwen3", False),
    "gpt2": ("gpt2", False),
}
ROLE_NAMES = {
    "token_embd": "token_embd",
    "output_norm": "output_norm",
    "output": "output",
    "attn_norm": "attn_norm",
    "ffn_norm": "ffn_norm",
    "attn_q": "attn_q",
    "attn_k": "attn_k",
    "attn_v": "attn_v",
    "attn_output": "attn_output",
    "ffn_gate": "ffn_gate",
    "ffn_up": "ffn_up",
    "ffn_down": "ffn_down",
    "attn_q_norm": "attn_q_norm",
    "attn_k_norm": "attn_k_norm",
    "position_embd": "position_embd",
    "attn_qkv": "attn_qkv",
}


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
    from lmpress.nn.packing import decode_zeros

    return decode_zeros(layer.qzeros, None, layer.bits, tuple(layer.scales.shape), layer.scales.device)  # type: ignore[arg-type]


def _codes(layer: QuantLinear | QuantEmbedding) -> Tensor:
    if isinstance(layer, QuantLinear):
        return layer.codes()
    from lmpress.nn.packing import decode_codes

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


def rope_permutation(rows: int, n_head: int) -> Tensor:
    """Row order llama.cpp's converter gives Llama q/k projections: within each head, the two
    rotary halves interleaved.  -> (rows,) indices"""
    return torch.arange(rows).view(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(-1)


class _Plan:
    """The tensors of one model in GGUF form, each converted only when written."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        floats = [p.dtype for p in model.parameters() if p.dtype in DENSE_TYPES]
        self.dtype = max(set(floats), key=floats.count) if floats else torch.float32  # the model's dtype
        self.report_types: dict[str, str] = {}

    def spec(self, name: str, part: Part, rows_perm: Tensor | None) -> TensorSpec:
        m = part.module
        if part.kind in ("norm", "bias"):
            vec = part.tensor
            assert vec is not None
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
                return exact, lambda: ggml.pack(quant_to_blocks(m, exact))
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
    from lmpress.quant.base import replace_module

    swapped: dict[str, tuple[nn.Module, str]] = {}
    for name, m in list(model.named_modules()):
        if not isinstance(m, QuantLinear | QuantEmbedding) or exact_gguf_type(m) is not None:
            continue
        target = _fits(type_name, _shape(m)[1], name)
        if isinstance(m, QuantLinear):
            bias = m.bias.detach() if m.bias is not None else None
            new: nn.Module = GGUFLinear.from_blocks(ggml.quantize(m.dequantize_weight(), target), bias)
        else:
            new = GGUFEmbedding.from_blocks(ggml.quantize(m.weight.float(), target), m.out_dtype, m.padding_idx)
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
    from lmpress.quant.base import GRID_FALLBACK

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
    return m.out_features, m.in_features  # type: ignore[return-value]


def gpt2_metadata(config: Any, n_vocab: int) -> dict[str, Any]:
    """llama.cpp's hyper-parameter keys for a GPT-2 config."""
    if getattr(config, "activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ExportError(f"GPT-2 with activation {config.activation_function!r}: llama.cpp's gpt2 uses tanh GELU")
    return {
        "gpt2.context_length": U32(config.n_positions),
        "gpt2.embedding_length": U32(config.n_embd),
        "gpt2.feed_forward_length": U32(config.n_inner or 4 * config.n_embd),
        "gpt2.block_count": U32(config.n_layer),
        "gpt2.attention.head_count": U32(config.n_head),
        "gpt2.attention.layer_norm_epsilon": float(config.layer_norm_epsilon),
        "gpt2.vocab_size": U32(n_vocab),
    }


def architecture_metadata(config: Any, arch: str, n_vocab: int) -> dict[str, Any]:
    """llama.cpp's hyper-parameter keys for a Llama-family config."""
    if arch == "gpt2":
        return gpt2_metadata(config, n_vocab)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in ("default", None):
        raise ExportError(f"rope scaling {rope_type!r} is not exported to GGUF yet; export a model with default rope")
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    theta = float(theta or getattr(config, "rope_theta", None) or 10000.0)
    meta: dict[str, Any] = {
        f"{arch}.context_length": U32(config.max_position_embeddings),
        f"{arch}.embedding_length": U32(config.hidden_size),
        f"{arch}.block_count": U32(config.num_hidden_layers),
        f"{arch}.feed_forward_length": U32(config.intermediate_size),
        f"{arch}.attention.head_count": U32(heads),
        f"{arch}.attention.head_count_kv": U32(getattr(config, "num_key_value_heads", None) or heads),
        f"{arch}.attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
        f"{arch}.rope.freq_base": float(theta),
        f"{arch}.rope.dimension_count": U32(head_dim),
        f"{arch}.vocab_size": U32(n_vocab),
    }
    if head_dim != config.hidden_size // heads:
        meta[f"{arch}.attention.key_length"] = U32(head_dim)
        meta[f"{arch}.attention.value_length"] = U32(head_dim)
    return meta


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
    anything when a module has no GGUF form."""
    config = model.config  # type: ignore[union-attr]
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCH:
        raise ExportError(
            f"{model_type} models are not exported to GGUF yet; lmpress exports {', '.join(sorted(ARCH))}"
        )
    arch, permute = ARCH[model_type]
    parts = model_parts(model, densify)
    n_vocab = _shape(next(p.module for p in parts if p.role == "token_embd"))[0]
    meta: dict[str, Any] = {  # refusals of the config or tokenizer come before any work
        "general.architecture": arch,
        "general.name": name,
        "general.quantization_version": U32(2),
        **architecture_metadata(config, arch, n_vocab),
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
        return _write(model, meta, path, parts, permute, config, swapped, kl)
    finally:
        from lmpress.quant.base import replace_module

        for module_name, (original, _) in swapped.items():  # the caller's model as it was
            replace_module(model, module_name, original)


def _write(
    model: nn.Module,
    meta: dict[str, Any],
    path: Path,
    parts: list[Part],
    permute: bool,
    config: Any,
    swapped: dict[str, tuple[nn.Module, str]],
    kl: float | None,
) -> GGUFReport:
    plan = _Plan(model)
    heads = getattr(config, "num_attention_heads", 0)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    specs = []
    for p in parts:
        base = ROLE_NAMES[p.role]
        gname = (f"blk.{p.block}." if p.block is not None else "") + base + (".bias" if p.kind == "bias" else ".weight")
        perm = None
        if permute and p.role in ("attn_q", "attn_k") and p.kind == "linear":
            perm = rope_permutation(_shape(p.module)[0], heads if p.role == "attn_q" else kv_heads)
        if permute and p.role in ("attn_q", "attn_k") and p.kind == "bias":
            assert p.tensor is not None
            perm = rope_permutation(p.tensor.shape[0], heads if p.role == "attn_q" else kv_heads)
            vec = p.tensor[perm]
            specs.append(TensorSpec(gname, tuple(vec.shape), F32, vec.numel() * 4, _f32_of(vec)))
            plan.report_types[gname] = "f32"
            continue
        specs.append(plan.spec(gname, p, perm))
    path = Path(path)
    size = write_gguf(path, meta, specs)
    requantized = {k: why for k, (_, why) in swapped.items()}
    return GGUFReport(path, size, plan.report_types, requantized, kl if swapped else None)
