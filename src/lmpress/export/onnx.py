"""ONNX export: an lmpress model as a decoder graph with its KV cache, for ONNX Runtime.

The graph is built node by node (no tracing), in float32, with the inputs and outputs optimum's and
ONNX Runtime GenAI's decoder classes use: ``input_ids``, ``attention_mask`` (batch, past + new),
``position_ids`` and ``past_key_values.{i}.key|value`` (batch, kv heads, past, head dim) in;
``logits`` and ``present.{i}.key|value`` out. The tokenizer files and ``config.json`` lie beside
``model.onnx``.

Every layer is written as lmpress computes with it (`lmpress.export.onnx_layers`): ``MatMulNBits``
for 4- and 8-bit codes, ``MatMulInteger`` for W8A8, ``MatMul`` for dense weights.

Llama-family models (Llama, Mistral, Qwen2/3) and GPT-2.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lmpress.arch import Adapter, is_supported, spec_for, supporting
from lmpress.errors import ExportError
from lmpress.evaluation import count_parameters
from lmpress.export.onnx_graph import DATA_FILE, Graph, causal_mask, gelu_tanh, onnx_package, rotate, to_numpy
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


# ---- the decoder ----------------------------------------------------------------------------------


@dataclass
class _Dims:
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    vocab: int


def _dims(model: Any) -> _Dims:
    c = model.config
    heads = c.num_attention_heads
    hidden = c.hidden_size
    return _Dims(
        c.num_hidden_layers,
        heads,
        getattr(c, "num_key_value_heads", None) or heads,
        getattr(c, "head_dim", None) or hidden // heads,
        hidden,
        int(model.get_input_embeddings().weight.shape[0]),
    )


def _attention(
    b: LayerBuilder, q: str, k: str, v: str, i: int, d: _Dims, mask: str, rope: tuple[str, str] | None
) -> tuple[str, str, str]:
    """Heads, rotary, the cache and masked softmax attention. q, k, v: (B, S, heads*dim) -> (B, S, heads*dim)."""
    g = b.g

    def heads(t: str, n: int) -> str:  # (B, S, n*D) -> (B, n, S, D)
        return g.op("Transpose", [g.op("Reshape", [t, g.const([0, 0, n, d.head_dim])])], perm=[0, 2, 1, 3])

    qh, kh, vh = heads(q, d.heads), heads(k, d.kv_heads), heads(v, d.kv_heads)
    if b.head_norms:
        a = b.adapter
        qh = b.rms_norm(qh, a.role(i, "attn_q_norm"), a.role_name(i, "attn_q_norm"))
        kh = b.rms_norm(kh, a.role(i, "attn_k_norm"), a.role_name(i, "attn_k_norm"))
    if rope is not None:
        qh, kh = rotate(g, qh, rope, d.head_dim), rotate(g, kh, rope, d.head_dim)
    past_k, past_v = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
    present_k = g.op("Concat", [past_k, kh], axis=2)
    present_v = g.op("Concat", [past_v, vh], axis=2)
    # grouped-query attention without copying the cache: the query heads of one kv head side by side
    rep = d.heads // d.kv_heads
    qg = g.op("Reshape", [qh, g.const([0, d.kv_heads, -1, d.head_dim])])  # (B, KV, rep*S, D)
    kT = g.op("Transpose", [present_k], perm=[0, 1, 3, 2])
    scores = g.op("MatMul", [qg, kT])  # (B, KV, rep*S, T)
    scores = g.op("Mul", [scores, g.const(1.0 / math.sqrt(d.head_dim), np.float32)])
    scores = g.op("Reshape", [scores, g.const([0, d.heads, -1, 0])])  # (B, H, S, T)
    probs = g.op("Softmax", [g.op("Add", [scores, mask])], axis=-1)
    probs = g.op("Reshape", [probs, g.const([0, d.kv_heads, -1, 0])]) if rep > 1 else probs
    out = g.op("MatMul", [probs, present_v])  # (B, KV, rep*S, D)
    out = g.op("Reshape", [out, g.const([0, d.heads, -1, d.head_dim])]) if rep > 1 else out
    out = g.op("Reshape", [g.op("Transpose", [out], perm=[0, 2, 1, 3]), g.const([0, 0, d.heads * d.head_dim])])
    return out, present_k, present_v


def _rope_tables(model: Any, g: Graph) -> tuple[str, str]:
    """cos and sin at ``position_ids``: (B, 1, S, D) each. Rope types whose frequencies do not
    depend on the length (default, linear, llama3, yarn) are computed in the graph as transformers
    does (positions x the model's own ``inv_freq``, times its ``attention_scaling``): no table
    grows with the context. Others (dynamic, longrope) gather from tables the model's rotary
    module computed over ``max_position_embeddings``."""
    rotary = model.get_submodule(Adapter(model).spec.rotary_emb)
    F = g.onnx.TensorProto.FLOAT
    if getattr(rotary, "rope_type", "default") in ("default", "linear", "llama3", "yarn"):
        pos = g.op("Unsqueeze", [g.op("Cast", ["position_ids"], to=F), g.const([-1])])  # (B, S, 1)
        freqs = g.op("Mul", [pos, g.init("rope_inv_freq", to_numpy(rotary.inv_freq.float()))])  # (B, S, D/2)
        emb = g.op("Concat", [freqs, freqs], axis=-1)
        out = []
        for fn in ("Cos", "Sin"):
            t = g.op(fn, [emb])
            scale = float(rotary.attention_scaling)
            t = t if scale == 1.0 else g.op("Mul", [t, g.const(scale, np.float32)])
            out.append(g.op("Unsqueeze", [t, g.const([1])]))
        return out[0], out[1]
    n = int(model.config.max_position_embeddings)
    probe = torch.zeros(1, 1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = rotary(probe, torch.arange(n)[None])
    tables = []
    for hint, t in (("rope_cos", cos[0]), ("rope_sin", sin[0])):
        gathered = g.op("Gather", [g.init(hint, to_numpy(t.float())), "position_ids"], axis=0)  # (B, S, D)
        tables.append(g.op("Unsqueeze", [gathered, g.const([1])]))
    return tables[0], tables[1]


def _llama(b: LayerBuilder, d: _Dims) -> tuple[str, list[str]]:
    """RMSNorm pre-norm blocks, rotary attention, a SwiGLU MLP (Llama, Mistral, Qwen2/3)."""
    model, g, a = b.model, b.g, b.adapter
    embed_name, embed = next(iter(a.embeddings().items()))
    if not isinstance(embed, nn.Embedding):
        raise ExportError(
            f"{embed_name}: {type(embed).__name__} embeddings have no ONNX form here; keep the embeddings"
        )
    table = g.stored(f"{embed_name}.weight", embed.weight)
    x = g.to_float(g.op("Gather", [table, "input_ids"], axis=0), embed.weight)
    rope = _rope_tables(model, g)
    mask = causal_mask(g)
    presents = []
    for i in range(d.layers):
        h = b.rms_norm(x, a.role(i, "attn_norm"), a.role_name(i, "attn_norm"))
        q, k, v = (b.linear(h, a.role_name(i, r)) for r in ("attn_q", "attn_k", "attn_v"))
        attn, pk, pv = _attention(b, q, k, v, i, d, mask, rope)
        presents += [pk, pv]
        x = g.op("Add", [x, b.linear(attn, a.role_name(i, "attn_output"))])
        h = b.rms_norm(x, a.role(i, "ffn_norm"), a.role_name(i, "ffn_norm"))
        gate, up = b.linear(h, a.role_name(i, "ffn_gate")), b.linear(h, a.role_name(i, "ffn_up"))
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate])])  # SiLU
        x = g.op("Add", [x, b.linear(g.op("Mul", [act, up]), a.role_name(i, "ffn_down"))])
    norm_name, norm = a.final_norm()
    x = b.rms_norm(x, norm, norm_name)
    head_name, head = a.head()
    tied = getattr(head, "weight", None) is embed.weight
    return (_tied_head(g, x, g.to_float(table, embed.weight), d) if tied else b.linear(x, head_name)), presents


def _tied_head(g: Graph, x: str, table: str, d: _Dims) -> str:
    """logits against the embedding table itself (no second copy): Gemm with the table transposed."""
    flat = g.op("Reshape", [x, g.const([-1, d.hidden])])
    logits = g.op("Gemm", [flat, table], transB=1)
    lead = g.op("Slice", [g.op("Shape", [x]), g.const([0]), g.const([2])])
    return g.op("Reshape", [logits, g.op("Concat", [lead, g.const([d.vocab])], axis=0)])


def _gpt2(b: LayerBuilder, d: _Dims) -> tuple[str, list[str]]:
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
    presents = []
    for i in range(d.layers):
        h = b.layer_norm(x, a.role(i, "attn_norm"), a.role_name(i, "attn_norm"))
        qkv = b.linear(h, a.role_name(i, "attn_qkv"))
        q, k, v = g.ops("Split", [qkv, g.const([d.hidden] * 3)], 3, axis=-1)
        attn, pk, pv = _attention(b, q, k, v, i, d, mask, None)
        presents += [pk, pv]
        x = g.op("Add", [x, b.linear(attn, a.role_name(i, "attn_output"))])
        h = b.linear(b.layer_norm(x, a.role(i, "ffn_norm"), a.role_name(i, "ffn_norm")), a.role_name(i, "ffn_up"))
        x = g.op("Add", [x, b.linear(gelu_tanh(g, h), a.role_name(i, "ffn_down"))])
    norm_name, norm = a.final_norm()
    x = b.layer_norm(x, norm, norm_name)
    head_name, head = a.head()
    tied = getattr(head, "weight", None) is wte.weight
    return (_tied_head(g, x, g.to_float(table, wte.weight), d) if tied else b.linear(x, head_name)), presents


GRAPHS = {"llama": _llama, "gpt2": _gpt2}  # a spec's ``onnx`` -> the builder of its graph


def build_graph(model: nn.Module, densify: bool = False, data: Any = None) -> tuple[Any, LayerBuilder]:
    """The decoder as an ONNX ModelProto, and the builder's record of each layer; the weights
    inside it, or written to ``data`` (an open file named DATA_FILE) as they are met."""
    onnx = onnx_package()
    model_type = getattr(model.config, "model_type", None)
    spec = spec_for(model_type) if is_supported(model_type) else None
    if spec is None or spec.onnx is None:
        raise ExportError(
            f"{model_type} models are not exported to onnx yet; lmpress exports {', '.join(supporting('onnx'))}"
        )
    refusal = spec.onnx_refuse(model.config)
    if refusal is not None:
        raise ExportError(refusal)
    d = _dims(model)
    b = LayerBuilder(model, densify, data)
    b.head_norms = b.adapter.has_role(0, "attn_q_norm")
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
    with its tokenizer and config (atomically)."""
    onnx = onnx_package()
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
