"""The one walk of a model's modules that every export format shares.

`model_parts` lists what a runtime needs, in file order, each with a role that names it the same
way for every family (``token_embd``, ``attn_q``, ``ffn_down``, ``output_norm`` ...), the block it
belongs to, and the module holding it. It refuses, before anything is written, a model no runtime
file can represent as it is: layers shared across blocks, per-block widths, and layer formats that
have no export form unless asked to write them dense.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmpress.arch import Adapter, NormKind, is_conv1d, supporting
from lmpress.arch.widths import block_structure, needs_structure_record
from lmpress.errors import ExportError
from lmpress.nn.gguf_linear import GGUFEmbedding, GGUFLinear
from lmpress.nn.quant_embedding import QuantEmbedding
from lmpress.nn.quant_linear import QuantLinear


@dataclass(frozen=True)
class Part:
    """One tensor-holding piece of the model, as an export sees it."""

    role: str
    module_name: str
    module: nn.Module
    # "linear", "embedding", "norm" (tensor: the norm's weight), "bias" (tensor: a linear's bias),
    # "tensor" (a float parameter written as it is: LFM2's convolution kernels)
    kind: str
    block: int | None = None
    tensor: Tensor | None = None
    conv1d: bool = False  # GPT-2's Conv1D: the weight is stored (in, out)
    norm_kind: NormKind | None = None  # what a norm computes: a runtime's plain RMSNorm needs 1 + w stored


_EXPORTABLE = (nn.Linear, QuantLinear, GGUFLinear)
_DENSIFIABLE = {"SparseLinear", "LowRankLinear", "CodebookLinear"}


def check_layer(name: str, module: nn.Module, densify: bool) -> None:
    """Refuse a layer format that has no exported form (or none unless written dense)."""
    if isinstance(module, _EXPORTABLE) or is_conv1d(module):
        return
    kind = type(module).__name__
    if kind in _DENSIFIABLE and densify:
        return
    if kind in _DENSIFIABLE:
        what = {"SparseLinear": "sparse", "LowRankLinear": "low-rank", "CodebookLinear": "codebook"}[kind]
        raise ExportError(
            f"{name}: {what} layers have no GGUF type; pass --densify to write them as exact dense weights "
            "(no size saving in the runtime), or choose a quantizing recipe"
        )
    if kind == "LoRALinear":
        raise ExportError(f"{name}: LoRA adapters have no GGUF type here; train with codes: train instead of lora_rank")
    raise ExportError(f"{name}: {kind} layers cannot be exported")


def _family_parts(model: nn.Module, adapter: Adapter, densify: bool) -> list[Part]:
    parts: list[Part] = []
    token_embd: nn.Module | None = None
    for embed_name, role in adapter.embedding_roles().items():
        embed = model.get_submodule(embed_name)
        if not isinstance(embed, nn.Embedding | QuantEmbedding | GGUFEmbedding):
            raise ExportError(f"{embed_name}: {type(embed).__name__} embeddings cannot be exported")
        parts.append(Part(role, embed_name, embed, "embedding"))
        token_embd = embed if token_embd is None else token_embd
    seen: dict[int, str] = {}
    for i in range(adapter.num_blocks):
        for n in adapter.spec.norms:
            if adapter.has_role(i, n.role):
                parts += _norm_parts(n.role, adapter.role_name(i, n.role), adapter.role(i, n.role), i, n.kind)
        for name, role in adapter.linear_roles(i).items():
            parts += _linear_parts(model, name, role, i, densify, seen)
        for name, role in adapter.block_tensors(i).items():  # as a matrix: one row per channel
            owner = model.get_submodule(name.rpartition(".")[0])
            parts.append(Part(role, name, owner, "tensor", i, model.get_parameter(name).flatten(1)))
    norm_name, norm = adapter.final_norm()
    assert adapter.spec.final_norm is not None  # a spec's, never a generic one
    parts += _norm_parts("output_norm", norm_name, norm, None, adapter.spec.final_norm.kind)
    head_name, head = adapter.head()
    gguf = adapter.spec.gguf
    if not _tied(head, token_embd) or (gguf is not None and gguf.tied_output):  # the table again where read
        check_layer(head_name, head, densify)
        parts.append(Part("output", head_name, head, "linear"))
        bias = getattr(head, "bias", None)
        if isinstance(bias, Tensor):
            parts.append(Part("output", head_name, head, "bias", None, bias))
    _check_uniform(parts, model)
    return parts


def _norm_parts(role: str, name: str, norm: nn.Module, block: int | None, kind: NormKind) -> list[Part]:
    weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
    heads = getattr(norm, "norms", None)
    if weight is None and isinstance(heads, nn.ModuleList):  # one norm per head (StableLM): (heads, head_dim)
        weight = torch.stack([h.get_parameter("weight") for h in heads])
        has_bias = getattr(heads[0], "bias", None) is not None
        bias = torch.stack([h.get_parameter("bias") for h in heads]) if has_bias else None
    assert isinstance(weight, Tensor)
    out = [Part(role, name, norm, "norm", block, weight, norm_kind=kind)]
    if isinstance(bias, Tensor):
        out.append(Part(role, name, norm, "bias", block, bias))
    return out


def _linear_parts(
    model: nn.Module, name: str, role: str, block: int, densify: bool, seen: dict[int, str]
) -> list[Part]:
    m = model.get_submodule(name)
    if id(m) in seen:
        raise ExportError(
            f"{name} is shared with {seen[id(m)]} (share); runtime files store each block's weights, "
            "so choose a recipe without share"
        )
    seen[id(m)] = name
    check_layer(name, m, densify)
    out = [Part(role, name, m, "linear", block, conv1d=is_conv1d(m))]
    bias = getattr(m, "bias", None)
    if isinstance(bias, Tensor):
        out.append(Part(role, name, m, "bias", block, bias))
    return out


def _tied(head: nn.Module, embed: nn.Module | None) -> bool:
    """The head is the embedding table itself: a dense table's ``weight``, or a compressed head that
    reads the compressed table's codes (``tied_to``; a compressed embedding's ``weight`` is a decoded
    copy, which is never read here)."""
    if embed is not None and getattr(head, "reads_table", False):
        return getattr(head, "blocks", None) is getattr(embed, "blocks", None)
    return isinstance(embed, nn.Embedding) and getattr(head, "weight", None) is embed.weight


def _check_uniform(parts: list[Part], model: nn.Module) -> None:
    """Runtime files describe every block with one set of widths (the config's)."""
    first: dict[str, tuple[int, int]] = {}
    for p in parts:
        if p.kind != "linear" or p.block is None:
            continue
        w = getattr(p.module, "weight", None)
        if p.conv1d and isinstance(w, Tensor):
            shape = (int(w.shape[1]), int(w.shape[0]))
        else:
            shape = (int(p.module.out_features), int(p.module.in_features))  # type: ignore[arg-type]
        if first.setdefault(p.role, shape) != shape:
            raise ExportError(
                f"{p.module_name} is {shape[0]}x{shape[1]} but block 0's is {first[p.role][0]}x{first[p.role][1]} "
                "(structured with uniform: false); runtime files need the same widths in every block: "
                "prune with uniform: true"
            )
    if needs_structure_record(model) is not None:  # one set of widths, but not the config's (Phi-3's heads)
        raise ExportError(
            f"{getattr(model.config, 'model_type', 'this')} blocks have {block_structure(model)[0]}, which its config "
            "cannot state; runtime files read the widths from the config: prune with attention: false"
        )


def model_parts(model: nn.Module, densify: bool = False) -> list[Part]:
    """Every tensor-holding part of a supported model, in the order a runtime file lists them."""
    adapter = Adapter(model)
    adapter.require_roles("export", "layer and norm roles", "keep the lmpress directory", ExportError)
    if adapter.spec.gguf is None and adapter.spec.onnx is None:
        raise ExportError(
            f"{adapter.model_type} models are not exported yet; lmpress exports "
            + ", ".join(sorted(set(supporting("gguf")) | set(supporting("onnx"))))
        )
    return _family_parts(model, adapter, densify)


def count_types(types: dict[str, str]) -> dict[str, int]:
    """How many modules (or tensors) an export wrote as each type: {type: count}."""
    return dict(Counter(types.values()))
