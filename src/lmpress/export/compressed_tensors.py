"""compressed-tensors export: an lmpress model as the checkpoint llm-compressor writes, vLLM serves
and transformers loads (with the ``compressed-tensors`` package installed).

Every quantized layer keeps lmpress's own codes, scales and zero points:

- weight-only `QuantLinear` (2-8 bits, per group or per channel, symmetric or asymmetric) as
  ``pack-quantized``: ``weight_packed`` int32 (codes as signed ``q - 2**(bits-1)``, packed by the
  package's own ``pack_to_int32``), ``weight_scale``, ``weight_zero_point`` (asymmetric, packed
  along the output dimension) and ``weight_shape``;
- W8A8 `QuantLinear` as ``int-quantized``: the int8 ``weight`` and per-channel ``weight_scale``,
  activations quantized per token at run time (dynamic);
- dense modules as they are, in their own dtype.

The ``quantization_config`` is built from the package's own schema classes, one config group per
distinct scheme; ``targets`` name exactly the quantized modules (the class ``Linear`` with the rest
in ``ignore`` when one scheme covers every quantized layer, as llm-compressor writes it).

What the format cannot hold is refused before anything is written, with what would export:
compressed-tensors 0.20 dropped its sparse layouts, so sparse layers export only with
``densify`` (quantized sparse layers then stay quantized, their pruned codes decoding to exact
zeros); fractional zero points (hqq), codebooks, low rank, LoRA, GGUF block types and shared
layers have no layout; and GPT-2's ``Conv1D`` holds its weight transposed, which the format's
``Linear``-only layouts do not describe, so its quantized layers are refused (its dense ones export).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lmpress.arch import is_conv1d, is_supported, spec_for
from lmpress.errors import ExportError
from lmpress.export.base import Exporter, ExportOptions
from lmpress.export.hf_checkpoint import check_init, check_shapes, dequantize_on_load, set_dtype, write_shards
from lmpress.export.walk import count_types
from lmpress.io import atomic_dir, save_companions, weight_bytes
from lmpress.io.load import _tied_keys as tied_keys
from lmpress.nn.quant_linear import QuantLinear

INSTALL_HINT = "pip install 'lmpress[compressed-tensors]'"


@dataclass
class CTReport:
    """What an export wrote: the directory, its bytes, each quantized module's layout."""

    path: Path
    bytes: int
    formats: dict[str, str] = field(default_factory=dict)  # module -> "w4 g128 sym" ...
    densified: list[str] = field(default_factory=list)
    quantization_format: str = "dense"

    def type_counts(self) -> dict[str, int]:
        return count_types(self.formats)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "compressed-tensors",
            "path": str(self.path),
            "bytes": self.bytes,
            "quantization_format": self.quantization_format,
            "types": self.type_counts(),
            "modules": self.formats,
            "densified": self.densified,
        }


def require_package() -> Any:
    try:
        import compressed_tensors
    except ImportError:
        raise ExportError(f"compressed-tensors export needs the compressed-tensors package: {INSTALL_HINT}") from None
    return compressed_tensors


@dataclass(frozen=True)
class _Scheme:
    bits: int
    group_size: int | None
    symmetric: bool
    act_bits: int | None

    def label(self) -> str:
        if self.act_bits:
            return "w8a8"
        return (
            f"w{self.bits} "
            + (f"g{self.group_size}" if self.group_size else "channel")
            + (" sym" if self.symmetric else " asym")
        )

    def args(self) -> Any:
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

        weights = QuantizationArgs(
            num_bits=self.bits,
            type="int",
            symmetric=self.symmetric,
            strategy="group" if self.group_size else "channel",
            group_size=self.group_size,
            observer=None,
        )
        acts = None
        if self.act_bits:
            acts = QuantizationArgs(
                num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True, observer=None
            )
        return lambda targets: QuantizationScheme(
            targets=targets,
            weights=weights,
            input_activations=acts,
            format="int-quantized" if self.act_bits else "pack-quantized",
        )


def _refusal(name: str, m: nn.Module, densify: bool) -> str | None:
    """Why ``m`` has no compressed-tensors layout (None: it has one, or densify writes it)."""
    kind = type(m).__name__
    if isinstance(m, QuantLinear):
        if m.float_zeros:
            return (
                f"{name}: fractional zero points (hqq) have no compressed-tensors layout; "
                "quantize with rtn, gptq or awq (integer zero points), or export to gguf"
            )
        if m.tied_to:
            return f"{name}: a quantized head tied to the embeddings has no compressed-tensors layout; keep the head"
        return None
    if kind == "SparseLinear":
        if densify:
            return None
        return (
            f"{name}: compressed-tensors 0.20 has no sparse layout (its bitmask formats were dropped); "
            "pass --densify to write the kept weights densely (quantized sparse layers stay quantized, "
            "pruned weights as exact zero codes)"
        )
    if kind in ("LowRankLinear", "CodebookLinear"):
        if densify:
            return None
        what = {"LowRankLinear": "low-rank", "CodebookLinear": "codebook"}[kind]
        return f"{name}: {what} layers have no compressed-tensors layout; pass --densify to write them dense"
    if kind in ("GGUFLinear", "GGUFEmbedding"):
        return f"{name}: GGUF block types (grid: ...) have no compressed-tensors layout; export to gguf"
    if kind in ("QuantEmbedding",):
        return f"{name}: quantized embeddings have no compressed-tensors layout in transformers; keep the embeddings"
    if kind == "LoRALinear":
        return f"{name}: LoRA adapters have no compressed-tensors layout; train with codes: train instead of lora_rank"
    return None


def _leaf_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules that hold their own tensors, by name; a module reached twice (share) is refused."""
    seen: dict[int, str] = {}
    out: dict[str, nn.Module] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        owns = any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False))
        if not owns:
            continue
        if id(m) in seen and not _is_tied_embedding(model, m):
            raise ExportError(
                f"{name} is shared with {seen[id(m)]} (share); compressed-tensors stores each block's weights, "
                "so choose a recipe without share"
            )
        seen.setdefault(id(m), name)
        out.setdefault(name, m)
    return out


def _is_tied_embedding(model: nn.Module, m: nn.Module) -> bool:
    get = getattr(model, "get_input_embeddings", None)
    return callable(get) and get() is m


def plan(model: nn.Module, densify: bool = False) -> tuple[dict[str, _Scheme], list[str]]:
    """The scheme of every quantized module, and the modules ``densify`` writes dense; refuses what
    the format cannot hold."""
    schemes: dict[str, _Scheme] = {}
    densified: list[str] = []
    for name, m in _leaf_modules(model).items():
        why = _refusal(name, m, densify)
        if why:
            raise ExportError(why)
        kind = type(m).__name__
        q = _quantized_view(m)
        if q is not None:
            if _is_conv1d_slot(model, name):
                raise ExportError(
                    f"{name}: GPT-2's Conv1D stores its weight transposed and compressed-tensors quantizes "
                    "nn.Linear layers only; export GPT-2 quantized to gguf or onnx, or keep this layer dense"
                )
            in_f = q.codes.shape[1]
            if q.group_size and in_f % q.group_size:
                fit = max(g for g in (16, 32, 64, 128) if in_f % g == 0) if in_f % 16 == 0 else None
                raise ExportError(
                    f"{name}: groups of {q.group_size} do not divide its {in_f} inputs and compressed-tensors "
                    "needs whole groups; quantize with "
                    + (f"group_size: {fit} or " if fit else "")
                    + "group_size: null (per channel), or export to gguf or onnx"
                )
            schemes[name] = _Scheme(q.bits, q.group_size, q.symmetric, getattr(m, "act_bits", None))
            if kind == "SparseLinear":
                densified.append(name)
        elif kind in ("SparseLinear", "LowRankLinear", "CodebookLinear"):
            densified.append(name)
    return schemes, densified


def _is_conv1d_slot(model: nn.Module, name: str) -> bool:
    """``name`` is where the family keeps a linear as a transposed Conv1D (GPT-2)."""
    model_type = getattr(model.config, "model_type", None)
    spec = spec_for(model_type) if is_supported(model_type) else None
    return spec is not None and spec.conv1d and any(name.endswith(f".{p}") for p in spec.linears)


@dataclass
class _QuantView:
    bits: int
    group_size: int | None
    symmetric: bool
    codes: Tensor  # (out, in) unsigned (offset binary) codes
    scales: Tensor  # (out, G)
    zeros: Tensor | None  # (out, G) integer zero points, unsigned
    bias: Tensor | None


def _quantized_view(m: nn.Module) -> _QuantView | None:
    """Codes, scales and zeros of a quantized layer (a sparse one with its pruned weights as the
    zero point's code, which decodes to an exact 0)."""
    if isinstance(m, QuantLinear):
        return _QuantView(
            m.bits, m.group_size, m.symmetric, m.codes(), m.scales, None if m.symmetric else m.zeros(), m.bias
        )
    if type(m).__name__ == "SparseLinear" and getattr(m, "bits", None) is not None:
        codes, zeros = m.dense_codes()  # type: ignore[operator]
        return _QuantView(m.bits, m.group_size, m.symmetric, codes, m.scales, zeros, m.bias)  # type: ignore[arg-type]
    return None


def _signed(codes: Tensor, bits: int) -> Tensor:
    return (codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)


def _quant_tensors(view: _QuantView, scheme: _Scheme) -> dict[str, Tensor]:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    out_f, in_f = view.codes.shape
    q = _signed(view.codes, view.bits)
    scale = view.scales if view.group_size else view.scales.reshape(out_f, 1)
    t: dict[str, Tensor] = {}
    if scheme.act_bits:
        t["weight"] = q.contiguous()
    else:
        t["weight_packed"] = pack_to_int32(q, view.bits)
        t["weight_shape"] = torch.tensor([out_f, in_f], dtype=torch.int64)
    t["weight_scale"] = scale.contiguous()
    if view.zeros is not None:
        zp = _signed(view.zeros.round().to(torch.int16), view.bits)
        zp = zp if view.group_size else zp.reshape(out_f, 1)
        t["weight_zero_point"] = zp.contiguous() if scheme.act_bits else pack_to_int32(zp, view.bits, packed_dim=0)
    if view.bias is not None:
        t["bias"] = view.bias.detach()
    return t


def _dense_tensors(m: nn.Module) -> dict[str, Tensor]:
    """A densified layer's ``weight`` (and bias), exactly as its forward computes with it."""
    dense = getattr(m, "dense_weight", None)
    weight: Tensor = dense() if callable(dense) else m.weight  # type: ignore[assignment]
    t = {"weight": weight.detach()}
    bias = getattr(m, "bias", None)
    if isinstance(bias, Tensor):
        t["bias"] = bias.detach()
    return t


def state_dict(model: nn.Module, schemes: dict[str, _Scheme], densified: list[str]) -> dict[str, Tensor]:
    """Every tensor of the checkpoint under its compressed-tensors name."""
    special = set(schemes) | set(densified)
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        module = key.rsplit(".", 1)[0]
        if module not in special:
            out[key] = value
    for name in special:
        m = model.get_submodule(name)
        view = _quantized_view(m)
        tensors = _quant_tensors(view, schemes[name]) if view is not None else _dense_tensors(m)
        out.update({f"{name}.{k}": v for k, v in tensors.items()})
    for key in tied_keys(model):
        out.pop(key, None)
    return {k: v.detach().contiguous() for k, v in out.items()}


def quantization_config(model: nn.Module, schemes: dict[str, _Scheme]) -> Any:
    """The package's own `QuantizationConfig` for these schemes (None for a dense model)."""
    from compressed_tensors.quantization import QuantizationConfig

    if not schemes:
        return None
    by_scheme: dict[_Scheme, list[str]] = {}
    for name, s in schemes.items():
        by_scheme.setdefault(s, []).append(name)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | QuantLinear) or _is_layer(m)]
    groups: dict[str, Any] = {}
    ignore: list[str] = []
    if len(by_scheme) == 1:
        ((scheme, names),) = by_scheme.items()
        groups["group_0"] = scheme.args()(["Linear"])
        ignore = [n for n in linears if n not in schemes]
    else:
        for i, (scheme, names) in enumerate(sorted(by_scheme.items(), key=lambda kv: kv[0].label())):
            groups[f"group_{i}"] = scheme.args()(names)
    formats = {"int-quantized" if s.act_bits else "pack-quantized" for s in by_scheme}
    return QuantizationConfig(
        config_groups=groups,
        ignore=ignore,
        format=formats.pop() if len(formats) == 1 else "mixed-precision",
        quantization_status="compressed",
    )


def _is_layer(m: nn.Module) -> bool:
    return type(m).__name__ in ("SparseLinear", "LowRankLinear", "CodebookLinear")


def export_compressed_tensors(
    model: nn.Module, tokenizer: Any, out: Path, *, densify: bool = False, overwrite: bool = False
) -> CTReport:
    """Write ``model`` as a compressed-tensors directory at ``out`` (atomically)."""
    require_package()
    from compressed_tensors.compressors import ModelCompressor

    schemes, densified = plan(model, densify)
    tensors = state_dict(model, schemes, densified)
    check_shapes(model, tensors, schemes)
    check_init(model, schemes)
    qconfig = quantization_config(model, schemes)
    with atomic_dir(out, overwrite) as tmp:
        write_shards(tensors, tmp)
        dtypes = {v.dtype for k, v in tensors.items() if v.is_floating_point() and not k.endswith("weight_scale")}
        save_companions(model, tokenizer, tmp)
        if len(dtypes) == 1:  # the dtype transformers loads in: that of the dense tensors
            set_dtype(tmp / "config.json", dtypes.pop())
        if qconfig is not None:
            ModelCompressor(quantization_config=qconfig).update_config(str(tmp))
            if any(not sc.symmetric and not sc.act_bits for sc in schemes.values()):
                dequantize_on_load(tmp / "config.json")
        size = weight_bytes(tmp)
    return CTReport(
        out,
        size,
        {n: s.label() for n, s in schemes.items()},
        densified,
        qconfig.format if qconfig is not None else "dense",
    )


class CompressedTensorsExporter(Exporter):
    """A Hugging Face directory; it loads back as one (no runtime of its own)."""

    name = "compressed-tensors"
    help = "transformers, vLLM"
    artifact = "compressed-tensors directory"
    file_suffixes = (".json", ".safetensors")
    package = ("compressed_tensors", "compressed-tensors")

    def write(self, model: nn.Module, tokenizer: Any, path: Path, options: ExportOptions) -> CTReport:
        return export_compressed_tensors(model, tokenizer, path, densify=options.densify, overwrite=options.overwrite)


EXPORTER = CompressedTensorsExporter()

__all__ = [
    "EXPORTER",
    "CTReport",
    "CompressedTensorsExporter",
    "export_compressed_tensors",
    "is_conv1d",
    "plan",
    "quantization_config",
    "state_dict",
]
