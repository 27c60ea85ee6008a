"""Gemma (1): Llama's layout with RMSNorms that multiply by ``1 + w``, a GELU-tanh gated MLP, the
token embeddings scaled by sqrt(hidden) inside the model, and a tied head. llama.cpp's ``gemma``
stores each norm as ``1 + w`` and scales the embeddings itself; it does not reorder q/k rows."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from lmpress.arch.families.llama import LLAMA
from lmpress.arch.gguf_keys import check_gelu, rms_metadata
from lmpress.arch.spec import GGUF, Norm
from lmpress.formats.gguf_file import U32


def gguf_metadata(config: Any, n_vocab: int) -> dict[str, Any]:
    check_gelu(config, "Gemma")
    meta = rms_metadata(config, "gemma", n_vocab)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    meta["gemma.attention.key_length"] = U32(head_dim)
    meta["gemma.attention.value_length"] = U32(head_dim)
    return meta


GEMMA = replace(
    LLAMA,
    model_types=("gemma",),
    final_norm=Norm("model.norm", "output_norm", "rmsnorm_1p"),
    norms=(
        Norm("input_layernorm", "attn_norm", "rmsnorm_1p"),
        Norm("post_attention_layernorm", "ffn_norm", "rmsnorm_1p"),
    ),
    embed_scale=True,
    tied_by_default=True,
    gguf=GGUF("gemma", gguf_metadata),
    onnx="llama",
)

SPECS = (GEMMA,)
