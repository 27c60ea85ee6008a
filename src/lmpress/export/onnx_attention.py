"""Attention in the ONNX decoder graph: the model's shape (`Dims`), how one layer attends
(`AttentionPlan`: its scale, window, soft-cap, rotary tables and query/key norms, read from the
model's config and attention module), the rotary tables, and the attention itself with its cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lmpress.arch import Adapter
from lmpress.export.onnx_graph import Graph, rotate, soft_cap, to_numpy
from lmpress.export.onnx_layers import LayerBuilder

# rope types whose frequencies do not depend on the length: computed in the graph
COMPUTED_ROPE = ("default", "linear", "llama3", "yarn")


@dataclass
class Dims:
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    vocab: int


def dims(model: Any) -> Dims:
    c = model.config
    heads = c.num_attention_heads
    hidden = c.hidden_size
    return Dims(
        c.num_hidden_layers,
        heads,
        getattr(c, "num_key_value_heads", None) or heads,
        getattr(c, "head_dim", None) or hidden // heads,
        hidden,
        int(model.get_input_embeddings().weight.shape[0]),
    )


@dataclass(frozen=True)
class AttentionPlan:
    """How one layer attends, as its model computes it."""

    scaling: float  # the scores' factor: 1/sqrt(head_dim), 1/sqrt(query_pre_attn_scalar), attention_multiplier
    window: int | None = None  # sliding-window attention over this many positions
    softcap: float | None = None  # tanh soft-capping of the scores (Gemma 2)
    rope: str | None = None  # the key of its rotary tables ("" when all layers share one); None: no rotary
    qk_norm: str | None = None  # "head" (Qwen3, Gemma 3), "projection" (OLMo 2) or None
    qk_norm_kind: str = "rmsnorm"


@dataclass(frozen=True)
class Rope:
    """cos and sin at ``position_ids`` (B, 1, S, rot) over the first ``rot`` channels of a head."""

    cos: str
    sin: str
    rot: int


def rope_tables(model: Any, g: Graph, layer_type: str) -> Rope:
    """The rotary tables of the layers of ``layer_type`` ("": the model's one rotary embedding).
    Rope types whose frequencies do not depend on the length (default, linear, llama3, yarn) are
    computed in the graph as transformers does (positions x the model's own ``inv_freq``, times its
    ``attention_scaling``): no table grows with the context. Others (dynamic, longrope) gather from
    tables the model's rotary module computed over ``max_position_embeddings``. Gemma 3 keeps one
    ``inv_freq`` per layer type (``sliding_attention_inv_freq`` ...)."""
    rotary = model.get_submodule(Adapter(model).spec.rotary_emb)
    prefix = f"{layer_type}_" if layer_type else ""
    kind = getattr(rotary, "rope_type", "default")
    kind = kind.get(layer_type, "default") if isinstance(kind, dict) else kind
    inv_freq = getattr(rotary, f"{prefix}inv_freq")
    rot = 2 * int(inv_freq.shape[0])
    F = g.onnx.TensorProto.FLOAT
    if kind in COMPUTED_ROPE:
        pos = g.op("Unsqueeze", [g.op("Cast", ["position_ids"], to=F), g.const([-1])])  # (B, S, 1)
        freqs = g.op("Mul", [pos, g.init(f"rope_inv_freq{prefix}", to_numpy(inv_freq.float()))])  # (B, S, rot/2)
        emb = g.op("Concat", [freqs, freqs], axis=-1)
        out = []
        for fn in ("Cos", "Sin"):
            t = g.op(fn, [emb])
            scale = float(getattr(rotary, f"{prefix}attention_scaling"))
            t = t if scale == 1.0 else g.op("Mul", [t, g.const(scale, np.float32)])
            out.append(g.op("Unsqueeze", [t, g.const([1])]))
        return Rope(out[0], out[1], rot)
    n = int(model.config.max_position_embeddings)
    probe = torch.zeros(1, 1, dtype=torch.float32)
    with torch.no_grad():
        args = (layer_type,) if layer_type else ()
        cos, sin = rotary(probe, torch.arange(n)[None], *args)
    tables = []
    for hint, t in (("rope_cos", cos[0]), ("rope_sin", sin[0])):
        gathered = g.op("Gather", [g.init(hint, to_numpy(t.float())), "position_ids"], axis=0)  # (B, S, rot)
        tables.append(g.op("Unsqueeze", [gathered, g.const([1])]))
    return Rope(tables[0], tables[1], rot)


def _qk_norm(b: LayerBuilder, i: int, q: str, k: str, kind: str) -> tuple[str, str]:
    a = b.adapter
    return (
        b.norm(q, a.role(i, "attn_q_norm"), a.role_name(i, "attn_q_norm"), kind),
        b.norm(k, a.role(i, "attn_k_norm"), a.role_name(i, "attn_k_norm"), kind),
    )


def attention(
    b: LayerBuilder, qkv: tuple[str, str, str], i: int, d: Dims, plan: AttentionPlan, mask: str, rope: Rope | None
) -> tuple[str, str, str]:
    """Query/key norms, heads, rotary, the cache and masked softmax attention.
    q, k, v: (B, S, heads*dim) -> (B, S, heads*dim), present key, present value."""
    g = b.g
    q, k, v = qkv
    if plan.qk_norm == "projection":  # over all heads at once (OLMo 2)
        q, k = _qk_norm(b, i, q, k, plan.qk_norm_kind)

    def heads(t: str, n: int) -> str:  # (B, S, n*D) -> (B, n, S, D)
        return g.op("Transpose", [g.op("Reshape", [t, g.const([0, 0, n, d.head_dim])])], perm=[0, 2, 1, 3])

    qh, kh, vh = heads(q, d.heads), heads(k, d.kv_heads), heads(v, d.kv_heads)
    if plan.qk_norm == "head":
        qh, kh = _qk_norm(b, i, qh, kh, plan.qk_norm_kind)
    if rope is not None:
        table = (rope.cos, rope.sin)
        qh, kh = rotate(g, qh, table, d.head_dim, rope.rot), rotate(g, kh, table, d.head_dim, rope.rot)
    past_k, past_v = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
    present_k = g.op("Concat", [past_k, kh], axis=2)
    present_v = g.op("Concat", [past_v, vh], axis=2)
    # grouped-query attention without copying the cache: the query heads of one kv head side by side
    rep = d.heads // d.kv_heads
    qg = g.op("Reshape", [qh, g.const([0, d.kv_heads, -1, d.head_dim])])  # (B, KV, rep*S, D)
    kT = g.op("Transpose", [present_k], perm=[0, 1, 3, 2])
    scores = g.op("MatMul", [qg, kT])  # (B, KV, rep*S, T)
    scores = g.op("Mul", [scores, g.const(plan.scaling, np.float32)])
    scores = g.op("Reshape", [scores, g.const([0, d.heads, -1, 0])])  # (B, H, S, T)
    if plan.softcap is not None:
        scores = soft_cap(g, scores, plan.softcap)
    probs = g.op("Softmax", [g.op("Add", [scores, mask])], axis=-1)
    probs = g.op("Reshape", [probs, g.const([0, d.kv_heads, -1, 0])]) if rep > 1 else probs
    out = g.op("MatMul", [probs, present_v])  # (B, KV, rep*S, D)
    out = g.op("Reshape", [out, g.const([0, d.heads, -1, d.head_dim])]) if rep > 1 else out
    out = g.op("Reshape", [g.op("Transpose", [out], perm=[0, 2, 1, 3]), g.const([0, 0, d.heads * d.head_dim])])
    return out, present_k, present_v


def default_scaling(d: Dims) -> float:
    return 1.0 / math.sqrt(d.head_dim)
