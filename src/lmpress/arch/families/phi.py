"""Phi-1/1.5/2: one LayerNorm feeds attention and the MLP in parallel; separate q/k/v projections
and ``dense`` out; partial rotary embeddings; a GELU MLP (fc1, fc2). llama.cpp calls it ``phi2``."""

from __future__ import annotations

from typing import Any

from lmpress.arch.gguf_keys import layernorm_metadata
from lmpress.arch.spec import GGUF, Norm, Spec
from lmpress.errors import ExportError
from lmpress.formats.gguf_file import U32


def gguf_metadata(config: Any, n_vocab: int) -> dict[str, Any]:
    meta = layernorm_metadata(config, "phi2", n_vocab, "Phi")
    if getattr(config, "qk_layernorm", False):
        raise ExportError("Phi with qk_layernorm: llama.cpp's phi2 has no query/key norms")
    heads = config.num_attention_heads
    meta["phi2.attention.head_count_kv"] = U32(getattr(config, "num_key_value_heads", None) or heads)
    return meta


SPECS = (
    Spec(
        model_types=("phi",),
        blocks="model.layers",
        embeddings={"model.embed_tokens": "token_embd"},
        final_norm=Norm("model.final_layernorm", "output_norm", "layernorm"),
        linears={
            "self_attn.q_proj": "attn_q",
            "self_attn.k_proj": "attn_k",
            "self_attn.v_proj": "attn_v",
            "self_attn.dense": "attn_output",
            "mlp.fc1": "ffn_up",
            "mlp.fc2": "ffn_down",
        },
        norms=(Norm("input_layernorm", "attn_norm", "layernorm"),),
        scale_groups=(
            ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.fc1")),
            ("self_attn.v_proj", ("self_attn.dense",)),
        ),
        gguf=GGUF("phi2", gguf_metadata, tied_output=True),
    ),
)
