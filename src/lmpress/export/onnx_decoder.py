"""The rotary decoder graph (a spec's ``onnx = "llama"``): Llama and every family built like it,
written from what the model's spec, config and modules say rather than from its family's name.

- norms of the spec's kinds: RMSNorm, RMSNorm over ``1 + w`` (Gemma), LayerNorm with or without bias;
- pre-norms (``attn_norm``, ``ffn_norm``), post-norms (``attn_post_norm``, ``ffn_post_norm``: Gemma 2/3's
  sandwich, OLMo 2's post-only blocks) and the parallel residual (the spec's ``parallel_key``);
- query/key norms per head or over the whole projection (the spec's ``qk_norm``);
- the attention module's own ``scaling`` and ``attn_logit_softcapping``; sliding-window layers (the
  config's ``sliding_window`` on its ``layer_types``, or on every layer without them); one rotary
  table per layer type where the rotary module keeps one (Gemma 3); layers without rotary
  (``no_rope_layers``); partial rotary (the rotary module's width);
- the MLP gated or not, its activation read from the module (SiLU, GELU, GELU-tanh);
- scaled embeddings (the spec's ``embed_scale``; ``embedding_multiplier``), residual and logit
  multipliers (``residual_multiplier``, ``logits_scaling``), soft-capped logits
  (``final_logit_softcapping``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from lmpress.errors import ExportError
from lmpress.export.onnx_attention import AttentionPlan, Dims, Rope, attention, default_scaling, rope_tables
from lmpress.export.onnx_graph import ACTIVATIONS, Graph, causal_mask, soft_cap
from lmpress.export.onnx_layers import LayerBuilder

# the linears the rotary graph computes with: separate q, k, v, o; gate (optional), up, down
ROLES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def check_layout(b: LayerBuilder) -> None:
    """Refuse, in one line, a spec whose blocks hold what this graph does not compute."""
    spec = b.adapter.spec
    lacking = sorted(set(spec.linears.values()) - set(ROLES))
    if getattr(spec, "gate_up", False):  # one linear whose rows are [gate | up]
        lacking.append("a fused gate/up projection")
    if not spec.rotary_emb:
        lacking.append("attention without a rotary embedding module")
    if not spec.is_pre_norm(b.model.config):
        lacking.append(f"{spec.pre_norm_key} false (norms after the sublayers)")
    if lacking:
        raise ExportError(
            f"ONNX export of {b.adapter.model_type}: {', '.join(lacking)} is not in lmpress's ONNX graph; "
            "export GGUF instead"
        )


@dataclass(frozen=True)
class BlockPlan:
    """What one decoder block computes besides its attention."""

    attention: AttentionPlan
    activation: str  # a key of ACTIVATIONS
    residual: float = 1.0  # each sublayer's output times this before the residual add (Granite)
    parallel: bool = False  # the MLP reads the attention's norm; both add to the same residual


def _window(config: Any, i: int) -> int | None:
    """Layer i's sliding window: the config's ``sliding_window`` on the layers its ``layer_types``
    call sliding, or on every layer of a config without layer types (Mistral, StarCoder2)."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if window is None or (types is not None and types[i] != "sliding_attention"):
        return None
    return int(window)


def _rope_key(b: LayerBuilder, i: int) -> str | None:
    """The rotary tables layer i reads: None where ``no_rope_layers`` says it has none, the layer
    type where the rotary module keeps one ``inv_freq`` per type, else "" (one for all)."""
    config = b.model.config
    no_rope = getattr(config, "no_rope_layers", None)
    if no_rope is not None and not no_rope[i]:
        return None
    rotary = b.model.get_submodule(b.adapter.spec.rotary_emb)
    types = getattr(config, "layer_types", None)
    if types is not None and hasattr(rotary, f"{types[i]}_inv_freq"):
        return str(types[i])
    return ""


def _activation(b: LayerBuilder, i: int) -> str:
    """The activation module of block i's MLP (the parent of its down projection), by its class."""
    name = b.adapter.role_name(i, "ffn_down").rsplit(".", 1)[0]
    children = list(b.model.get_submodule(name).children())
    for m in children:
        kind = type(m).__name__
        if kind == "GELU" and getattr(m, "approximate", "none") == "tanh":
            return "GELUTanh"
        if kind in ACTIVATIONS:
            return kind
    found = ", ".join(type(m).__name__ for m in children)
    raise ExportError(
        f"{name}: no activation lmpress's ONNX graph computes among {found} (it has {', '.join(ACTIVATIONS)}); "
        "export GGUF instead"
    )


def block_plan(b: LayerBuilder, i: int, d: Dims) -> BlockPlan:
    a, config = b.adapter, b.model.config
    attn = b.model.get_submodule(f"{a.block_name(i)}.{a.spec.attention_module}")
    qk_norm, kind = None, "rmsnorm"
    if a.has_role(i, "attn_q_norm"):
        qk_norm = a.spec.qk_norm
        kind = a.norm_kind(a.role_name(i, "attn_q_norm")) or "unknown"
    softcap = getattr(attn, "attn_logit_softcapping", None)
    plan = AttentionPlan(
        scaling=float(getattr(attn, "scaling", None) or default_scaling(d)),
        window=_window(config, i),
        softcap=None if softcap is None else float(softcap),
        rope=_rope_key(b, i),
        qk_norm=qk_norm,
        qk_norm_kind=kind,
    )
    parallel = a.spec.parallel_key is not None and bool(getattr(config, a.spec.parallel_key, False))
    residual = float(getattr(config, "residual_multiplier", None) or 1.0)
    return BlockPlan(plan, _activation(b, i), residual, parallel)


def _norm(b: LayerBuilder, x: str, i: int, role: str) -> str:
    """Block i's norm of ``role`` over x, or x where the block has none (OLMo 2's missing pre-norms,
    StableLM's parallel residual)."""
    a = b.adapter
    if not a.has_role(i, role):
        return x
    name = a.role_name(i, role)
    return b.norm(x, a.role(i, role), name, a.norm_kind(name) or "unknown")


def _scaled(g: Graph, x: str, factor: float) -> str:
    return x if factor == 1.0 else g.op("Mul", [x, g.const(factor, np.float32)])


def _mlp(b: LayerBuilder, h: str, i: int, plan: BlockPlan) -> str:
    a, g = b.adapter, b.g
    act = ACTIVATIONS[plan.activation]
    if "ffn_gate" in a.spec.linears.values():
        gate, up = b.linear(h, a.role_name(i, "ffn_gate")), b.linear(h, a.role_name(i, "ffn_up"))
        inner = g.op("Mul", [act(g, gate), up])
    else:
        inner = act(g, b.linear(h, a.role_name(i, "ffn_up")))
    out = _norm(b, b.linear(inner, a.role_name(i, "ffn_down")), i, "ffn_post_norm")
    return _scaled(g, out, plan.residual)


def block(
    b: LayerBuilder, x: str, i: int, d: Dims, masks: dict[int | None, str], ropes: dict[str, Rope]
) -> tuple[str, str, str]:
    """One decoder block over the residual stream x: (x after it, present key, present value)."""
    a, g = b.adapter, b.g
    plan = block_plan(b, i, d)
    h = _norm(b, x, i, "attn_norm")
    q, k, v = (b.linear(h, a.role_name(i, r)) for r in ("attn_q", "attn_k", "attn_v"))
    p = plan.attention
    if p.window not in masks:
        masks[p.window] = causal_mask(g, p.window)
    rope = None
    if p.rope is not None:
        if p.rope not in ropes:
            ropes[p.rope] = rope_tables(b.model, g, p.rope)
        rope = ropes[p.rope]
    out, pk, pv = attention(b, (q, k, v), i, d, p, masks[p.window], rope)
    out = _norm(b, b.linear(out, a.role_name(i, "attn_output")), i, "attn_post_norm")
    out = _scaled(g, out, plan.residual)
    if plan.parallel:
        return g.op("Add", [g.op("Add", [x, out]), _mlp(b, h, i, plan)]), pk, pv
    x = g.op("Add", [x, out])
    return g.op("Add", [x, _mlp(b, _norm(b, x, i, "ffn_norm"), i, plan)]), pk, pv


def tied_head(g: Graph, x: str, table: str, d: Dims) -> str:
    """logits against the embedding table itself (no second copy): Gemm with the table transposed."""
    flat = g.op("Reshape", [x, g.const([-1, d.hidden])])
    logits = g.op("Gemm", [flat, table], transB=1)
    lead = g.op("Slice", [g.op("Shape", [x]), g.const([0]), g.const([2])])
    return g.op("Reshape", [logits, g.op("Concat", [lead, g.const([d.vocab])], axis=0)])


def _embed_scale(b: LayerBuilder) -> float:
    """What the model multiplies its token embeddings by: sqrt(hidden) (the spec's ``embed_scale``:
    Gemma; in float32, as the model computes in float32), or the config's ``embedding_multiplier``
    (Granite), else 1."""
    config = b.model.config
    if b.adapter.spec.embed_scale:
        return math.sqrt(config.hidden_size)
    return float(getattr(config, "embedding_multiplier", None) or 1.0)


def _logits(b: LayerBuilder, x: str, d: Dims, embed: nn.Embedding, table: str) -> str:
    """The final norm, the head (tied or its own), the logits divided by ``logits_scaling`` and
    soft-capped by ``final_logit_softcapping`` where the config has them."""
    a, g, config = b.adapter, b.g, b.model.config
    norm_name, norm = a.final_norm()
    x = b.norm(x, norm, norm_name, a.norm_kind(norm_name) or "unknown")
    head_name, head = a.head()
    tied = getattr(head, "weight", None) is embed.weight
    logits = tied_head(g, x, g.to_float(table, embed.weight), d) if tied else b.linear(x, head_name)
    divisor = float(getattr(config, "logits_scaling", None) or 1.0)
    logits = logits if divisor == 1.0 else g.op("Div", [logits, g.const(divisor, np.float32)])
    cap = getattr(config, "final_logit_softcapping", None)
    return logits if cap is None else soft_cap(g, logits, float(cap))


def rotary_decoder(b: LayerBuilder, d: Dims) -> tuple[str, list[str]]:
    """The whole graph: embeddings, the blocks with their cache, the logits."""
    check_layout(b)
    g, a = b.g, b.adapter
    embed_name, embed = next(iter(a.embeddings().items()))
    if not isinstance(embed, nn.Embedding):
        raise ExportError(
            f"{embed_name}: {type(embed).__name__} embeddings have no ONNX form here; keep the embeddings"
        )
    table = g.stored(f"{embed_name}.weight", embed.weight)
    x = g.to_float(g.op("Gather", [table, "input_ids"], axis=0), embed.weight)
    x = _scaled(g, x, _embed_scale(b))
    masks: dict[int | None, str] = {}
    ropes: dict[str, Rope] = {}
    presents = []
    for i in range(d.layers):
        x, pk, pv = block(b, x, i, d, masks, ropes)
        presents += [pk, pv]
    return _logits(b, x, d, embed, table), presents
