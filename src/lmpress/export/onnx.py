"""ONNX export: an lmpress model as a decoder graph with its KV cache, for ONNX Runtime.

The graph is built node by node (no tracing), in float32, with the inputs and outputs optimum's and
ONNX Runtime GenAI's decoder classes use: ``input_ids``, ``attention_mask`` (batch, past + new),
``position_ids`` and ``past_key_values.{i}.key|value`` (batch, kv heads, past, head dim) in;
``logits`` and ``present.{i}.key|value`` out. The tokenizer files and ``config.json`` lie beside
``model.onnx``.

Every layer is written as lmpress computes with it (`lmpress.export.onnx_layers`): ``MatMulNBits``
for 4- and 8-bit codes, ``MatMulInteger`` for W8A8, ``MatMul`` for dense weights.

Two graphs: the rotary decoder (`lmpress.export.onnx_decoder`: Llama and the families built like it,
from what each spec and config say) and GPT-2's.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmpress.arch import is_supported, spec_for, supporting, text_model
from lmpress.errors import ExportError
from lmpress.evaluation import count_parameters
from lmpress.export.onnx_attention import AttentionPlan, Dims, attention, default_scaling, dims
from lmpress.export.onnx_decoder import rotary_decoder, tied_head
from lmpress.export.onnx_graph import DATA_FILE, causal_mask, gelu_tanh, onnx_package
from lmpress.export.onnx_layers import LayerBuilder
from lmpress.export.walk import count_types
from lmpress.io import atomic_dir, save_companions

OPSET = 17
# protobuf's 2 GB limit: a model that could pass 1.5 GB keeps its weights beside the graph, written
# there as the graph is built (the graph never holds them in memory)
EXTERNAL_DATA_BYTES = 1_500_000_000
GRAPH_FILE = "model.onnx"
PARAMETERS_KEY = "lmpress.parameters"  # metadata: the logical weights the graph computes with


@dataclass
class OnnxReport:
    """What an export wrote: the directory, its bytes, the op each linear layer became."""

    path: Path
    bytes: int
    formats: dict[str, str] = field(default_factory=dict)  # module -> "MatMulNBits w4 g128", "MatMul" ...
    densified: list[str] = field(default_factory=list)

    def type_counts(self) -> dict[str, int]:
        return count_types(self.formats)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "onnx",
            "path": str(self.path),
            "bytes": self.bytes,
            "unit": "linear layers",
            "types": self.type_counts(),
            "modules": self.formats,
            "densified": self.densified,
        }


# ---- the decoders ----------------------------------------------------------------------------------


def _gpt2(b: LayerBuilder, d: Dims) -> tuple[str, list[str]]:
    """LayerNorm pre-norm blocks, learned positions, fused [q | k | v], a tanh-GELU MLP (GPT-2)."""
    g, a = b.g, b.adapter
    (wte_name, wte), (wpe_name, wpe) = a.embeddings().items()
    if not isinstance(wte, nn.Embedding) or not isinstance(wpe, nn.Embedding):
        raise ExportError(f"{wte_name}: quantized embeddings have no ONNX form here; keep the embeddings")
    table = g.stored(f"{wte_name}.weight", wte.weight)
    x = g.to_float(g.op("Gather", [table, "input_ids"], axis=0), wte.weight)
    positions = g.to_float(g.op("Gather", [g.stored(f"{wpe_name}.weight", wpe.weight), "position_ids"]), wpe.weight)
    x = g.op("Add", [x, positions])
    mask = causal_mask(g)
    plan = AttentionPlan(default_scaling(d))
    presents = []
    for i in range(d.layers):
        h = b.layer_norm(x, a.role(i, "attn_norm"), a.role_name(i, "attn_norm"))
        qkv = b.linear(h, a.role_name(i, "attn_qkv"))
        q, k, v = g.ops("Split", [qkv, g.const([d.hidden] * 3)], 3, axis=-1)
        attn, pk, pv = attention(b, (q, k, v), i, d, plan, mask, None)
        presents += [pk, pv]
        x = g.op("Add", [x, b.linear(attn, a.role_name(i, "attn_output"))])
        h = b.linear(b.layer_norm(x, a.role(i, "ffn_norm"), a.role_name(i, "ffn_norm")), a.role_name(i, "ffn_up"))
        x = g.op("Add", [x, b.linear(gelu_tanh(g, h), a.role_name(i, "ffn_down"))])
    norm_name, norm = a.final_norm()
    x = b.layer_norm(x, norm, norm_name)
    head_name, head = a.head()
    tied = getattr(head, "weight", None) is wte.weight
    return (tied_head(g, x, g.to_float(table, wte.weight), d) if tied else b.linear(x, head_name)), presents


GRAPHS = {"llama": rotary_decoder, "gpt2": _gpt2}  # a spec's ``onnx`` -> the builder of its graph


def build_graph(model: nn.Module, densify: bool = False, data: Any = None) -> tuple[Any, LayerBuilder]:
    """The decoder as an ONNX ModelProto, and the builder's record of each layer; the weights
    inside it, or written to ``data`` (an open file named DATA_FILE) as they are met."""
    onnx = onnx_package()
    model_type = getattr(model.config, "model_type", None)
    spec = spec_for(model_type) if is_supported(model_type) else None
    if spec is None or spec.onnx is None:
        raise ExportError(
            f"{model_type} models have no graph in lmpress's ONNX export for ONNX Runtime; it writes "
            f"{', '.join(supporting('onnx'))}; export to compressed-tensors instead"
        )
    refusal = spec.onnx_refuse(model.config)
    if refusal is not None:
        raise ExportError(refusal)
    d = dims(model)
    b = LayerBuilder(model, densify, data)
    logits, presents = GRAPHS[spec.onnx](b, d)
    h = onnx.helper
    F, I64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    inputs = [
        h.make_tensor_value_info("input_ids", I64, ["batch", "sequence"]),
        h.make_tensor_value_info("attention_mask", I64, ["batch", "total_sequence"]),
        h.make_tensor_value_info("position_ids", I64, ["batch", "sequence"]),
    ]
    outputs = [h.make_tensor_value_info("logits", F, ["batch", "sequence", d.vocab])]
    g = b.g
    for i in range(d.layers):
        for kind, present in (("key", presents[2 * i]), ("value", presents[2 * i + 1])):
            shape = ["batch", d.kv_heads, "past_sequence", d.head_dim]
            inputs.append(h.make_tensor_value_info(f"past_key_values.{i}.{kind}", F, shape))
            g.nodes.append(h.make_node("Identity", [present], [f"present.{i}.{kind}"]))
            total = ["batch", d.kv_heads, "total_sequence", d.head_dim]
            outputs.append(h.make_tensor_value_info(f"present.{i}.{kind}", F, total))
    g.nodes.append(h.make_node("Identity", [logits], ["logits"]))
    graph = h.make_graph(g.nodes, "lmpress_decoder", inputs, outputs, g.inits)
    proto = h.make_model(
        graph,
        opset_imports=[h.make_opsetid("", OPSET), h.make_opsetid("com.microsoft", 1)],
        producer_name="lmpress",
        ir_version=9,
    )
    return proto, b


def export_onnx(
    model: nn.Module, tokenizer: Any, out: Path, *, densify: bool = False, overwrite: bool = False
) -> OnnxReport:
    """Write ``model`` as ``out/model.onnx`` (weights beside it in ``model.onnx.data`` when large),
    with its tokenizer and config (atomically). A multimodal model is written as its text part."""
    onnx = onnx_package()
    model = text_model(model)
    params = count_parameters(model)
    external = 4 * params > EXTERNAL_DATA_BYTES  # float32 bounds every tensor written
    with atomic_dir(out, overwrite) as tmp:
        with torch.no_grad(), open(tmp / DATA_FILE, "wb") if external else contextlib.nullcontext() as data:
            proto, b = build_graph(model, densify, data)
        onnx.helper.set_model_props(proto, {PARAMETERS_KEY: str(params)})
        onnx.save_model(proto, str(tmp / GRAPH_FILE))
        save_companions(model, tokenizer, tmp)
        size = sum(p.stat().st_size for p in tmp.glob("model.onnx*"))
    return OnnxReport(out, size, b.formats, b.densified)
