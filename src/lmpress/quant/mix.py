"""llama.cpp's per-tensor type mixes (its Q2_K, Q3_K_M, Q4_0, Q4_K_M, Q5_K_M, Q8_0 files) as overrides.

A "_M" file is not one type: llama.cpp gives the output head Q6_K and some attention-value and
MLP-down layers more bits than the rest (``llama_tensor_get_type`` in its ``llama-quant.cpp``;
the rules below are its rules for dense, non-Falcon models). ``mix: q4_k_m`` in a weight
quantizer's config turns those rules into per-layer ``overrides`` for the model at hand, after the
recipe's own overrides (which therefore still win).
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from lmpress.arch import Adapter, linear_weight

MixName = Literal["q2_k", "q3_k_m", "q4_0", "q4_k_m", "q5_k_m", "q8_0"]
MIX_BASE = {"q2_k": "q2_k", "q3_k_m": "q3_k", "q4_0": "q4_0", "q4_k_m": "q4_k", "q5_k_m": "q5_k", "q8_0": "q8_0"}


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of layers that get more bits: the first and last eighth, and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def mix_type(mix: str, role: str, i: int, n: int, gqa: int = 1) -> str | None:
    """The type llama.cpp's ``mix`` gives block ``i`` of ``n``'s ``role`` layer (``gqa``: query heads
    per key/value head); None: the base type."""
    if mix == "q2_k":
        if role == "attn_v":
            return "q4_k" if gqa >= 4 else "q3_k"
        return "q3_k" if role in ("ffn_down", "attn_output") else None
    if mix in ("q4_k_m", "q5_k_m"):
        if role in ("attn_v", "ffn_down") and use_more_bits(i, n):
            return "q6_k"
        if role == "attn_qkv":
            return "q5_k" if mix == "q4_k_m" else "q6_k"
        return None
    if mix == "q3_k_m":
        if role == "attn_v":
            return "q5_k" if i < 2 else "q4_k"
        if role == "ffn_down":
            return "q5_k" if i < n // 16 else "q4_k"
        if role in ("attn_output", "attn_qkv"):
            return "q4_k"
    return None


def mix_roles(mix: str) -> tuple[str, str, str]:
    """What ``mix`` needs a family spec for (`lmpress.arch.roles_refusal`)."""
    return f"mix: {mix}", "layer roles (attn_v, ffn_down ...)", "give one grid without mix"


def mix_layer_types(model: nn.Module, mix: str) -> dict[str, str]:
    """Module name -> GGUF type for the layers ``mix`` does not leave at its base type."""
    adapter = Adapter(model)
    adapter.require_roles(*mix_roles(mix))
    n = adapter.num_blocks
    config = model.config  # type: ignore[union-attr]
    heads = int(getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None) or 1)
    gqa = heads // int(getattr(config, "num_key_value_heads", None) or heads)
    out: dict[str, str] = {}
    for i in range(n):
        for name, role in adapter.linear_roles(i).items():
            t = mix_type(mix, role, i, n, gqa)
            if t is not None:
                out[name] = t
    head_name, head = adapter.head()
    width = linear_weight(head).shape[1] if hasattr(head, "weight") else 0
    if mix != "q8_0":  # llama.cpp: the output head Q6_K (Q8_0 where its rows do not fit 256-blocks)
        out[head_name] = "q6_k" if width % 256 == 0 else "q8_0"
    return out


def tied_head(model: nn.Module) -> str | None:
    """The head's module name where it is the token embedding table itself (a tied head); else None."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()  # type: ignore[operator]
    weight = getattr(embed, "weight", None)
    if weight is None or head is None or getattr(head, "weight", None) is not weight:
        return None
    return next(n for n, m in model.named_modules() if m is head)


def table_fields(model: nn.Module, mix: str | None, base: str, embedding: bool) -> dict[str, object]:
    """Config fields for a tied head's one table: quantized once, with the embeddings (``embedding``:
    the stage quantizes them), so the head leaves the targets; in a ``mix`` the table takes the head's
    type, as llama.cpp does for a file with no ``output.weight`` (Q6_K in Q4_K_M)."""
    head = tied_head(model) if embedding else None
    if head is None:
        return {}
    fields: dict[str, object] = {"head": head}
    if mix is not None:
        fields["embedding_grid"] = mix_layer_types(model, mix).get(head, base)
    return fields
