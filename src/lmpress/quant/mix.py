"""llama.cpp's per-tensor type mixes (its Q3_K_M, Q4_K_M, Q5_K_M files) as quantizer overrides.

A "_M" file is not one type: llama.cpp gives the output head Q6_K and some attention-value and
MLP-down layers more bits than the rest (``llama_tensor_get_type`` in its ``llama-quant.cpp``;
the rules below are its rules for dense, non-Falcon models). ``mix: q4_k_m`` in a weight
quantizer's config turns those rules into per-layer ``overrides`` for the model at hand, after the
recipe's own overrides (which therefore still win).
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from lmpress.models.adapters import Adapter, linear_weight

MixName = Literal["q3_k_m", "q4_k_m", "q5_k_m"]
MIX_BASE = {"q3_k_m": "q3_k", "q4_k_m": "q4_k", "q5_k_m": "q5_k"}

# block-relative module suffix -> llama.cpp tensor category
_ROLES = {
    "self_attn.v_proj": "attn_v",
    "attention.query_key_value": "attn_qkv",
    "attn.c_attn": "attn_qkv",
    "mlp.down_proj": "ffn_down",
    "mlp.c_proj": "ffn_down",
    "mlp.dense_4h_to_h": "ffn_down",
    "mlp.fc2": "ffn_down",
    "fc2": "ffn_down",
    "self_attn.o_proj": "attn_output",
    "attn.c_proj": "attn_output",
    "attention.dense": "attn_output",
    "self_attn.dense": "attn_output",
    "self_attn.out_proj": "attn_output",
}


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of layers that get more bits: the first and last eighth, and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def mix_type(mix: str, role: str, i: int, n: int) -> str | None:
    """The type llama.cpp's ``mix`` gives block ``i`` of ``n``'s ``role`` layer; None: the base type."""
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


def mix_layer_types(model: nn.Module, mix: str) -> dict[str, str]:
    """Module name -> GGUF type for the layers ``mix`` does not leave at its base type."""
    adapter = Adapter(model)
    n = adapter.num_blocks
    out: dict[str, str] = {}
    for i in range(n):
        prefix = adapter.block_name(i) + "."
        for name in adapter.block_linears(i):
            role = _ROLES.get(name.removeprefix(prefix))
            t = mix_type(mix, role, i, n) if role else None
            if t is not None:
                out[name] = t
    head_name, head = adapter.head()
    width = linear_weight(head).shape[1] if hasattr(head, "weight") else 0
    out[head_name] = "q6_k" if width % 256 == 0 else "q8_0"  # llama.cpp: the output head
    return out
