"""``lmpress inspect``: what a model directory or an exported file holds, read without running it.

For a directory written by lmpress: the architecture, bytes and weights per storage format (from
``lmpress.json``'s per-module formats and the safetensors headers), bits per weight stored and
dense-equivalent, the recipe, each stage's report, the metrics against the original and the data
it was calibrated and evaluated on. A plain Hugging Face directory shows its architecture and
tensors; an export what its exporter reads (`lmpress.export.base.Exporter.contents`): a GGUF
file its metadata and tensor types (llama.cpp's names), an ONNX directory its initializers by the
operator that uses them (``MatMulNBits``, ``MatMulInteger``, dense). A directory also shows how
lmpress reads its model (`layout`): the family's spec or, without one, what was found by structure
(`lmpress.arch.discover`), the blocks, one block's linears with their roles, and what each class of
method can do with it.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lmpress.arch import Adapter
from lmpress.errors import ModelLoadError
from lmpress.export.base import Exporter
from lmpress.export.registry import exporter_for
from lmpress.io import META_FILE, check_safetensors, check_weights, read_config, resolve_path, weight_bytes
from lmpress.io.meta import read_meta, show
from lmpress.preflight import meta_adapter

__all__ = ["FormatGroup", "Inspection", "capabilities", "inspect_model", "layout"]

# safetensors dtype -> bytes per element (for counting elements from byte ranges)
_ST_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_ST_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


@dataclass
class FormatGroup:
    """Modules stored one way: how many, the weights they stand for, the weights kept, the bytes."""

    format: str
    modules: int = 0
    weights: int = 0  # dense-equivalent: every weight of the matrices, pruned ones included
    kept: int = 0  # weights actually stored (a sparse layer's non-zeros)
    bytes: int = 0

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / self.weights if self.weights else float("nan")


@dataclass
class Inspection:
    """What `inspect_model` found; ``meta`` is ``lmpress.json`` without its module list."""

    source: str
    kind: str  # "lmpress", "huggingface", or the name of the export format (`lmpress.export.registry`)
    architecture: dict[str, Any]
    formats: list[FormatGroup]
    bytes_on_disk: int
    meta: dict[str, Any] = field(default_factory=dict)
    layout: dict[str, Any] = field(default_factory=dict)  # how lmpress reads the model (`layout`)

    @property
    def parameters(self) -> int:
        return sum(g.weights for g in self.formats)

    @property
    def kept_parameters(self) -> int:
        return sum(g.kept for g in self.formats)

    @property
    def bits_per_weight(self) -> float:
        """File bits over every weight the model stands for (pruned ones included)."""
        return 8 * self.bytes_on_disk / self.parameters if self.parameters else float("nan")

    @property
    def bits_per_kept_weight(self) -> float:
        return 8 * self.bytes_on_disk / self.kept_parameters if self.kept_parameters else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "kind": self.kind,
            "architecture": self.architecture,
            "parameters": self.parameters,
            "kept_parameters": self.kept_parameters,
            "bytes_on_disk": self.bytes_on_disk,
            "bits_per_weight": self.bits_per_weight,
            "bits_per_kept_weight": self.bits_per_kept_weight,
            "formats": [{**asdict(g), "bits_per_weight": g.bits_per_weight} for g in self.formats],
            **({"layout": self.layout} if self.layout else {}),
            **self.meta,
        }


def describe_format(fmt: dict[str, Any], dtype: str | None = None) -> str:
    """One short name for a module's saved format: ``int4 g128 asym``, ``sparse 2:4 + int4 g128``."""
    kind = fmt.get("format")
    if kind == "dense":
        return f"dense {fmt.get('dtype') or dtype or ''}".strip()
    if kind in ("quant", "quant_embedding"):
        g = fmt.get("group_size")
        text = f"int{fmt['bits']} " + (f"g{g}" if g else "per-channel") + (" sym" if fmt.get("symmetric") else " asym")
        if fmt.get("act_bits"):
            text = f"W{fmt['bits']}A{fmt['act_bits']}" + (f" g{g}" if g else "")
        return text + (" embedding" if kind == "quant_embedding" else "")
    if kind == "sparse":
        pattern = fmt.get("pattern") or "unstructured"
        values = (
            f"int{fmt['bits']}" + (f" g{fmt['group_size']}" if fmt.get("group_size") else "") if fmt.get("bits") else ""
        )
        return f"sparse {pattern}" + (f" + {values}" if values else "")
    if kind == "gguf":
        return f"GGUF {fmt['type']}"
    if kind == "gguf_embedding":
        return f"GGUF {fmt['type']} embedding"
    if kind == "codebook":
        return f"codebook {fmt['bits']}-bit" + (" per-channel" if fmt.get("per_channel") else "")
    if kind == "lowrank":
        return f"low rank r{fmt['rank']}"
    if kind == "lora":
        return f"{describe_format(fmt['base'])} + LoRA r{fmt['rank']}"
    if kind == "quant_experts":
        g = fmt.get("group_size")
        grid = f"int{fmt['bits']} " + (f"g{g}" if g else "per-channel") + (" sym" if fmt.get("symmetric") else " asym")
        return f"{fmt['num_experts']} experts {grid}"
    return str(kind)


def _weights_of(fmt: dict[str, Any]) -> tuple[int, int] | None:
    """(dense-equivalent weights, kept weights) a compressed module stands for, from its format."""
    kind = fmt.get("format")
    if kind == "lora":
        return _weights_of(fmt["base"])
    if fmt.get("tied_to"):  # a head tied to the embeddings holds no weights of its own
        return (0, 0)
    if "num_embeddings" in fmt:
        n = int(fmt["num_embeddings"]) * int(fmt["embedding_dim"])
        return n, n
    if "num_experts" in fmt:  # gate, up and down of each expert
        n = 3 * int(fmt["num_experts"]) * int(fmt["hidden"]) * int(fmt["intermediate"])
        return n, n
    if "in_features" in fmt:
        n = int(fmt["in_features"]) * int(fmt["out_features"]) + (int(fmt["out_features"]) if fmt.get("bias") else 0)
        kept = int(fmt["nnz"]) + n - int(fmt["in_features"]) * int(fmt["out_features"]) if "nnz" in fmt else n
        return n, kept
    return None


def _safetensors_header(file: Path) -> dict[str, Any]:
    check_safetensors(file)
    with file.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header: dict[str, Any] = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def _owner(tensor: str, modules: set[str]) -> str | None:
    """The described module a tensor belongs to (its name is the module's plus one part)."""
    parent = tensor.rpartition(".")[0]
    while parent:
        if parent in modules:
            return parent
        parent = parent.rpartition(".")[0]
    return None


def _directory_formats(path: Path, modules: dict[str, dict[str, Any]]) -> list[FormatGroup]:
    groups: dict[str, FormatGroup] = {}
    owners: dict[str, set[str]] = {}
    names = set(modules)
    for file in sorted(path.glob("*.safetensors")):
        for tensor, info in _safetensors_header(file).items():
            start, end = info["data_offsets"]
            nbytes = int(end) - int(start)
            owner = _owner(tensor, names)
            fmt = modules[owner] if owner is not None else {"format": "dense"}
            name = describe_format(fmt, _ST_NAMES.get(info["dtype"], info["dtype"].lower()))
            group = groups.setdefault(name, FormatGroup(name))
            group.bytes += nbytes
            module = owner or tensor.rpartition(".")[0]
            weights = None if fmt.get("format") == "dense" else _weights_of(fmt)
            if weights is None:  # dense: the tensor's own elements
                n = nbytes // _ST_BYTES.get(info["dtype"], 1)
                group.weights += n
                group.kept += n
            elif module not in owners.get(name, set()):
                group.weights += weights[0]
                group.kept += weights[1]
            owners.setdefault(name, set()).add(module)
    for name, fmt in modules.items():  # described modules with no tensors of their own (a tied head)
        label = describe_format(fmt)
        if fmt.get("format") != "dense" and name not in owners.get(label, set()):
            groups.setdefault(label, FormatGroup(label))
            owners.setdefault(label, set()).add(name)
    for name, group in groups.items():
        group.modules = len(owners.get(name, ()))
    return sorted(groups.values(), key=lambda g: -g.bytes)


def _architecture(path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    config = read_config(path)
    attribute_map = {"n_layer": "layers", "n_embd": "hidden", "n_head": "heads", "n_inner": "intermediate"}
    keys = {
        "num_hidden_layers": "layers",
        "hidden_size": "hidden",
        "num_attention_heads": "heads",
        "num_key_value_heads": "kv_heads",
        "intermediate_size": "intermediate",
        "ffn_hidden_size": "intermediate",  # Falcon's
        "vocab_size": "vocab",
        "max_position_embeddings": "context",
        "n_positions": "context",
        **attribute_map,
    }
    file = path / "config.json"
    classes = config.get("architectures")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise ModelLoadError(f"{file}: architectures must be a list of class names, got {show(classes)}; fix it")
    if config.get("model_type") is not None and not isinstance(config["model_type"], str):
        raise ModelLoadError(f"{file}: model_type must be a string, got {show(config['model_type'])}; fix it")
    arch: dict[str, Any] = {"model_type": config.get("model_type"), "class": (classes or [None])[0]}
    for key, name in keys.items():
        if key in config and name not in arch:
            value = config[key]
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ModelLoadError(f"{file}: {key} must be a whole number, got {show(value)}; fix it")
            arch[name] = value
    arch["dtype"] = config.get("torch_dtype") or config.get("dtype")
    if meta.get("structure"):
        arch["per_block_widths"] = True
    return arch


NEEDS_SPEC = "needs a spec"


def capabilities(adapter: Adapter) -> dict[str, str]:
    """What each class of method can do with the model: "yes", "needs a spec" (a model lmpress
    reads by structure: the method needs roles), or why not for this family."""
    spec = adapter.spec

    def where(has: bool) -> str:
        return "yes" if has else NEEDS_SPEC if spec.generic else "not for this family"

    multimodal = "no: the vision part reads it (multimodal)" if adapter.language_model else None
    return {
        "quantize (rtn gptq hqq)": "yes" if spec.experts is None else "yes; experts: rtn and hqq only (issue 32)",
        "prune (magnitude wanda sparsegpt n:m)": "yes" if spec.experts is None else "yes; experts kept dense",
        "lowrank cluster drop_blocks cast": "yes",
        "vocab": multimodal or "yes",
        "awq/smoothquant": where(bool(spec.scale_groups)),
        "structured/share": "share only: structured cuts blocks of one kind"
        if spec.optional_linears or spec.experts
        else where(not spec.generic),
        "hidden": multimodal or where(spec.hidden_prunable),
        "stream": "yes" if spec.final_norm is not None else "no: loads whole",
        "gguf export": where(spec.gguf is not None),
        "onnx export": where(spec.onnx is not None),
        "compressed-tensors export": "yes" if spec.experts is None else "not with quantized experts yet (issue 32)",
    }


def layout(path: Path) -> dict[str, Any]:
    """How lmpress reads the model in ``path`` (its architecture built on the meta device, no
    weights read): family, blocks, one block's linears and their roles, `capabilities`."""
    adapter = meta_adapter(path)
    if isinstance(adapter, str):
        return {"family": None, "why": adapter}
    spec = adapter.spec
    prefix = adapter.block_name(0) + "."
    return {
        "family": None if spec.generic else spec.name,
        "generic": spec.generic,
        "blocks": spec.blocks,
        "num_blocks": adapter.num_blocks,
        "linears": {n.removeprefix(prefix): r for n, r in adapter.linear_roles(0).items()},
        "final_norm": spec.final_norm.path if spec.final_norm is not None else None,
        "experts": _experts(adapter),
        "can": capabilities(adapter),
    }


def _experts(adapter: Adapter) -> str | None:
    """One line on a block's mixture of experts (`lmpress.arch.spec.Experts`), None without one."""
    e = adapter.spec.experts
    if e is None:
        return None
    config = adapter.model.config
    count, top_k = getattr(config, e.count_key, "?"), getattr(config, e.top_k_key, "?")
    layout = (
        (f"{e.gate_up} [gate | up]" if e.fused else f"{e.gate_up} gate, {e.up} up")
        + f", {e.down}"
        + (" (E, in, out)" if e.transposed else " (E, out, in)")
    )
    shared = f"; shared expert {', '.join(e.shared)}" if e.shared else ""
    kept = ", ".join(e.float_paths)
    return f"{e.path}: {top_k} of {count} experts, {layout}{shared}; kept in float: {kept}"


def _exported(path: Path, exporter: Exporter) -> Inspection:
    """An export's contents as its exporter reads them, grouped by storage format."""
    contents = exporter.contents(path)
    groups: dict[str, FormatGroup] = {}
    for name, weights, kept, nbytes in contents.modules:
        g = groups.setdefault(name, FormatGroup(name))
        g.modules += 1
        g.weights += weights
        g.kept += kept
        g.bytes += nbytes
    arch = contents.architecture
    if arch is None:
        arch = _architecture(path, {}) if (path / "config.json").is_file() else {}
    formats = sorted(groups.values(), key=lambda g: -g.bytes)
    return Inspection(str(path), exporter.name, arch, formats, contents.bytes_on_disk)


def inspect_model(source: str | Path) -> Inspection:
    """Read what ``source`` holds (a directory written by lmpress, a Hugging Face directory, a
    built-in name, a ``.gguf`` file or an ONNX directory) without loading its weights."""
    if (exporter := exporter_for(source)) is not None:  # its reader checks it is what it claims first
        return _exported(Path(source).expanduser(), exporter)
    path = resolve_path(source)
    check_weights(path, allow_pickle=False)
    meta: dict[str, Any] = {}
    if (path / META_FILE).is_file():
        meta = read_meta(path)  # every field's shape checked
    modules = meta.pop("modules", None) or {}
    try:
        formats = _directory_formats(path, modules)
    except (KeyError, TypeError, ValueError) as e:  # a module's format record lacks a field its format needs
        raise ModelLoadError(
            f"{path / META_FILE}: a module's format record is incomplete ({type(e).__name__}: "
            f"{str(e)[:60]}); re-run the compression"
        ) from None
    kind = "lmpress" if (path / META_FILE).is_file() else "huggingface"
    arch = _architecture(path, meta)
    return Inspection(str(source), kind, arch, formats, weight_bytes(path), meta, layout(path))
