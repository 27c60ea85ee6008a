"""Phi-3, Phi-3.5 and Phi-4-mini: pre-norm RMSNorm blocks, one fused ``qkv_proj`` whose rows are
[q | k | v] with grouped-query attention, an ``o_proj``, one fused ``gate_up_proj`` whose rows are
[gate | up] (SwiGLU), rotary embeddings over part of each head (Phi-4-mini: 0.75) and, in the long
context models, LongRoPE: one set of per-frequency factors for sequences up to the original context,
another beyond it, and the cos/sin scaled by an attention factor.

llama.cpp's ``phi3`` reads the fused projections as they are (``attn_qkv``; ``ffn_up`` of twice
the MLP width, split gate first), the rope factors as ``rope_factors_long``/``rope_factors_short``
tensors and the attention factor as a key. It chooses the long factors by its context size where
transformers chooses them by the sequence's length: the two agree on a sequence longer than the
original context in a context longer than it, and on a shorter one in a context no longer than it.

Phi-3's attention splits its qkv rows by the config's head count, so a block with fewer heads gets
a config of its own (`Spec.heads_from_config`); the config has no ``head_dim`` transformers' rope
checks read, so fewer heads are recorded per block, and hidden channels are not removed.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lmpress.arch.gguf_keys import partial_rotary, rope_settings, rope_theta, shape_keys
from lmpress.arch.spec import GGUF, Norm, Spec
from lmpress.errors import ExportError
from lmpress.formats.gguf_file import U32


def _long_rope(config: Any) -> dict[str, Any] | None:
    """The LongRoPE parameters of a config, None for default rope; refuses any other rope."""
    rope_type, rope = rope_settings(config)
    if rope_type == "default":
        return None
    if rope_type != "longrope":
        raise ExportError(f"Phi-3 with rope scaling {rope_type!r} is not exported to GGUF; export default or longrope")
    original = rope.get("original_max_position_embeddings") or config.original_max_position_embeddings
    factor = rope.get("factor") or config.max_position_embeddings / original
    attention = rope.get("attention_factor")  # transformers' default, as its longrope computes it
    if attention is None:
        attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    return {**rope, "original_max_position_embeddings": original, "attention_factor": float(attention)}


def gguf_metadata(config: Any, n_vocab: int) -> dict[str, Any]:
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ExportError(f"Phi-3 with activation {config.hidden_act!r}: llama.cpp's phi3 uses SiLU")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if heads * head_dim != config.hidden_size:
        raise ExportError(
            f"Phi-3 with {heads} heads of {head_dim}: llama.cpp's phi3 needs heads x head_dim = hidden_size "
            f"({config.hidden_size})"
        )
    _, rope = rope_settings(config)
    meta: dict[str, Any] = {
        **shape_keys(config, "phi3"),
        "phi3.attention.head_count_kv": U32(getattr(config, "num_key_value_heads", None) or heads),
        "phi3.attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
        "phi3.rope.dimension_count": U32(int(head_dim * partial_rotary(config, rope))),
        "phi3.rope.freq_base": rope_theta(config, rope),
        "phi3.vocab_size": U32(n_vocab),
    }
    window = getattr(config, "sliding_window", None)  # llama.cpp's phi3 attends over its whole context
    if window is not None and window < config.max_position_embeddings:
        meta["phi3.context_length"] = U32(window)
    long_rope = _long_rope(config)
    if long_rope is not None:
        meta["phi3.rope.scaling.original_context_length"] = U32(long_rope["original_max_position_embeddings"])
        meta["phi3.rope.scaling.attn_factor"] = long_rope["attention_factor"]
    return meta


def rope_factor_tensors(config: Any) -> dict[str, Tensor]:
    """LongRoPE's per-frequency factors, which llama.cpp divides each rotary frequency by."""
    long_rope = _long_rope(config)
    if long_rope is None:
        return {}
    return {
        "rope_factors_long.weight": torch.tensor(long_rope["long_factor"], dtype=torch.float32),
        "rope_factors_short.weight": torch.tensor(long_rope["short_factor"], dtype=torch.float32),
    }


SPECS = (
    Spec(
        model_types=("phi3",),
        blocks="model.layers",
        embeddings={"model.embed_tokens": "token_embd"},
        final_norm=Norm("model.norm", "output_norm", "rmsnorm"),
        linears={
            "self_attn.qkv_proj": "attn_qkv",
            "self_attn.o_proj": "attn_output",
            "mlp.gate_up_proj": "ffn_up",  # [gate | up], as llama.cpp's phi3 reads ffn_up
            "mlp.down_proj": "ffn_down",
        },
        norms=(
            Norm("input_layernorm", "attn_norm", "rmsnorm"),
            Norm("post_attention_layernorm", "ffn_norm", "rmsnorm"),
        ),
        qkv="concat",
        gate_up=True,
        heads_from_config=True,
        scale_groups=(
            ("input_layernorm", ("self_attn.qkv_proj",)),
            ("self_attn.qkv_proj", ("self_attn.o_proj",)),  # its v rows, where every head has its own
            ("post_attention_layernorm", ("mlp.gate_up_proj",)),
            ("mlp.gate_up_proj", ("mlp.down_proj",)),  # its up half (`Spec.read_rows`)
        ),
        rotary_emb="model.rotary_emb",
        gguf=GGUF("phi3", gguf_metadata, config_tensors=rope_factor_tensors),
    ),
)
