"""Cutting a decoder block down to fewer attention units and MLP neurons, in place, per family.

An attention *unit* is one key/value head with the query heads that share it (grouped-query
attention), or one head where every head has its own keys and values. Removing a unit removes its
rows from the query/key/value projections (separate, fused as [q | k | v], or fused per key/value
group as [q… | k | v]) and its columns from the output projection; removing a neuron removes its
row from every MLP input projection (gate, up / fc1; both halves of a fused gate/up) and its column
from the output projection. The result is a smaller *dense* block that runs through the family's own
forward (the attention modules read the head count from the weights, or from the attributes
updated here).

`block_structure` describes each block's widths; `apply_structure` rebuilds those widths on a
freshly constructed model, so a model with per-block widths (which no Hugging Face config can
express) reloads through lmpress.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from lmpress.arch import Adapter, is_conv1d, is_supported, linear_weight, spec_for, text_model_type


def slice_linear(m: nn.Module, rows: Tensor | None = None, cols: Tensor | None = None) -> None:
    """Keep output ``rows`` and input ``cols`` of a linear layer (``nn.Linear`` or GPT-2 ``Conv1D``)."""
    w = linear_weight(m).detach()
    if rows is not None:
        w = w[rows]
    if cols is not None:
        w = w[:, cols]
    bias = getattr(m, "bias", None)
    if bias is not None and rows is not None:
        m.bias = nn.Parameter(bias.detach()[rows].clone())
    if is_conv1d(m):
        m.weight = nn.Parameter(w.T.contiguous())
        m.nf, m.nx = w.shape  # type: ignore[assignment]
    else:
        m.weight = nn.Parameter(w.contiguous())
        m.out_features, m.in_features = w.shape  # type: ignore[assignment]


def linear_shape(m: nn.Module) -> tuple[int, int]:
    """(out, in) of any linear-like layer, dense, compressed or GPT-2 ``Conv1D``."""
    if is_conv1d(m):
        return int(m.nf), int(m.nx)  # type: ignore[arg-type]
    return int(m.out_features), int(m.in_features)  # type: ignore[arg-type]


def _attention_module(adapter: Adapter, i: int) -> nn.Module:
    return adapter.model.get_submodule(f"{adapter.block_name(i)}.{adapter.spec.attention_module}")


def head_dim(adapter: Adapter, i: int) -> int:
    attn = _attention_module(adapter, i)
    hd = getattr(attn, "head_dim", None) or getattr(attn, "head_size", None)
    assert isinstance(hd, int)
    return hd


def attention_counts(adapter: Adapter, i: int) -> tuple[int, int]:
    """(query heads, key/value heads) of block i, read from the weights."""
    hd = head_dim(adapter, i)
    lin = list(adapter.attention_linears(i).values())
    n_q = linear_shape(lin[-1])[1] // hd  # the output projection's input
    if adapter.spec.fused_qkv:  # n_q + 2 n_kv heads of rows, in either layout
        return n_q, (linear_shape(lin[0])[0] // hd - n_q) // 2
    return n_q, linear_shape(lin[1])[0] // hd  # k_proj


def mlp_width(adapter: Adapter, i: int) -> int:
    return linear_shape(list(adapter.mlp_linears(i).values())[-1])[1]


def unit_heads(adapter: Adapter, i: int) -> list[list[int]]:
    """The query heads of each attention unit of block i."""
    n_q, n_kv = attention_counts(adapter, i)
    per = n_q // n_kv
    return [list(range(g * per, (g + 1) * per)) for g in range(n_kv)]


def _span(idx: list[int], width: int, offset: int = 0) -> Tensor:
    return torch.cat([torch.arange(offset + h * width, offset + (h + 1) * width) for h in idx])


def keep_attention_units(adapter: Adapter, i: int, keep: list[int]) -> None:
    """Keep only the attention units ``keep`` (indices into `unit_heads`) of block i."""
    keep = sorted(keep)
    hd = head_dim(adapter, i)
    n_q, n_kv = attention_counts(adapter, i)
    per = n_q // n_kv
    q_heads = [h for g in keep for h in range(g * per, (g + 1) * per)]
    lin = list(adapter.attention_linears(i).values())
    attn = _attention_module(adapter, i)
    if adapter.spec.qkv == "concat":  # one projection: [q | k | v], n_q, n_kv and n_kv heads wide
        k0, v0 = n_q * hd, (n_q + n_kv) * hd
        slice_linear(lin[0], rows=torch.cat([_span(q_heads, hd), _span(keep, hd, k0), _span(keep, hd, v0)]))
        if hasattr(attn, "split_size"):  # GPT-2 splits by it
            attn.split_size = len(q_heads) * hd  # type: ignore[assignment]
    elif adapter.spec.qkv == "per_head":  # one projection: per key/value group [q × per | k | v]
        slice_linear(lin[0], rows=_span(keep, (per + 2) * hd))
    else:  # separate q, k, v
        slice_linear(lin[0], rows=_span(q_heads, hd))
        slice_linear(lin[1], rows=_span(keep, hd))
        slice_linear(lin[2], rows=_span(keep, hd))
        if adapter.spec.qk_norm == "projection":  # norms over the whole q / k outputs lose the same rows
            for role, rows in (("attn_q_norm", _span(q_heads, hd)), ("attn_k_norm", _span(keep, hd))):
                if adapter.has_role(i, role):
                    norm = adapter.role(i, role)
                    weight: Tensor = norm.weight  # type: ignore[assignment]
                    norm.weight = nn.Parameter(weight.detach()[rows].clone())
        for role, heads in (("attn_q_norm", q_heads), ("attn_k_norm", keep)):  # a weight row per head (Cohere)
            head_norm = adapter.role(i, role) if adapter.has_role(i, role) else None
            per_head = getattr(head_norm, "weight", None)
            if head_norm is not None and isinstance(per_head, Tensor) and per_head.dim() == 2:
                head_norm.weight = nn.Parameter(per_head.detach()[heads].clone())
    slice_linear(lin[-1], cols=_span(q_heads, hd))
    for attr in ("num_heads", "num_attention_heads"):
        if isinstance(getattr(attn, attr, None), int):
            setattr(attn, attr, len(q_heads))
    for attr in ("num_key_value_heads", "num_kv_heads"):  # the second: Falcon's
        if isinstance(getattr(attn, attr, None), int):
            setattr(attn, attr, len(keep))
    if adapter.spec.heads_from_config and getattr(attn.config, "num_attention_heads", None) != len(q_heads):
        config: Any = copy.copy(attn.config)  # this block's own, the model's config unchanged
        config.num_attention_heads = len(q_heads)
        attn.config = config


def keep_neurons(adapter: Adapter, i: int, keep: Tensor) -> None:
    """Keep only MLP neurons ``keep`` of block i."""
    keep = keep.sort().values
    rows = torch.cat([keep, keep + mlp_width(adapter, i)]) if adapter.spec.gate_up else keep  # [gate | up]
    lin = list(adapter.mlp_linears(i).values())
    for m in lin[:-1]:
        slice_linear(m, rows=rows)
    slice_linear(lin[-1], cols=keep)


def block_structure(model: nn.Module) -> list[dict[str, int]]:
    """Each block's widths: query heads, key/value heads, MLP neurons."""
    adapter = Adapter(model)
    out = []
    for i in range(adapter.num_blocks):
        n_q, n_kv = attention_counts(adapter, i)
        out.append({"heads": n_q, "kv_heads": n_kv, "mlp": mlp_width(adapter, i)})
    return out


def text_config_of(model: nn.Module) -> Any:
    """The config holding the decoder's widths: the model's own, or a multimodal model's text
    config where lmpress knows its family (`lmpress.arch.multimodal`)."""
    config: Any = model.config
    return config.get_text_config(decoder=True) if text_model_type(config) is not None else config


def config_structure(model: nn.Module) -> dict[str, int]:
    """The widths a freshly built model of this config has."""
    cfg: Any = text_config_of(model)
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    key = spec_for(cfg.model_type).mlp_width_key
    mlp = getattr(cfg, key, None) or 4 * cfg.hidden_size  # GPT-2's n_inner None means 4x
    return {"heads": heads, "kv_heads": kv, "mlp": mlp}


def uniform_config_update(model: nn.Module) -> bool:
    """If every block has the same widths and the config can express them, write them into the
    config (so plain transformers loads the model) and return True."""
    structure = block_structure(model)
    if any(s != structure[0] for s in structure):
        return False
    s, cfg_s = structure[0], config_structure(model)
    cfg: Any = text_config_of(model)
    if (s["heads"], s["kv_heads"]) != (cfg_s["heads"], cfg_s["kv_heads"]):
        if not spec_for(cfg.model_type).head_dim_in_config:
            return False
        cfg.head_dim = head_dim(Adapter(model), 0)
        cfg.num_attention_heads, cfg.num_key_value_heads = s["heads"], s["kv_heads"]
        if spec_for(cfg.model_type).heads_from_config:  # the blocks' own configs are the model's again
            adapter = Adapter(model)
            for i in range(adapter.num_blocks):
                _attention_module(adapter, i).config = cfg
    if s["mlp"] != cfg_s["mlp"]:
        setattr(cfg, spec_for(cfg.model_type).mlp_width_key, s["mlp"])
    return True


def needs_structure_record(model: nn.Module) -> list[dict[str, int]] | None:
    """Per-block widths to save beside the weights, or None when the config already describes them."""
    model_type = getattr(text_config_of(model), "model_type", None)
    spec = spec_for(model_type) if is_supported(model_type) else None
    if spec is None or spec.optional_linears or spec.experts:  # blocks of several kinds, experts:
        return None  # never cut (structured refuses them)
    structure = block_structure(model)
    expected = config_structure(model)
    return None if all(s == expected for s in structure) else structure


def apply_structure(model: nn.Module, structure: list[dict[str, int]]) -> None:
    """Give a freshly built model the saved per-block widths (the weights are loaded afterwards)."""
    adapter = Adapter(model)
    if len(structure) != adapter.num_blocks:
        raise ValueError(f"structure lists {len(structure)} blocks, the config has {adapter.num_blocks}")
    for i, s in enumerate(structure):
        n_q, n_kv = attention_counts(adapter, i)
        if (s["heads"], s["kv_heads"]) != (n_q, n_kv):
            if s["heads"] * n_kv != s["kv_heads"] * n_q:
                raise ValueError(f"block {i}: {s['heads']} heads over {s['kv_heads']} key/value heads")
            keep_attention_units(adapter, i, list(range(s["kv_heads"])))
        if s["mlp"] != mlp_width(adapter, i):
            keep_neurons(adapter, i, torch.arange(s["mlp"]))
