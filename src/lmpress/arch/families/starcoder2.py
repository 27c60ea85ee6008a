"""StarCoder2: pre-norm LayerNorm blocks (with biases), separate q/k/v/o projections with biases and
grouped-query attention, rotary embeddings over the whole head, a two-projection GELU MLP (``c_fc``,
``c_proj``), a tied head. llama.cpp's ``starcoder2`` needs every bias and attends over its whole
context: a model trained with a sliding window is written with that window as its context length,
within which the two attend alike."""

from __future__ import annotations

from typing import Any

from lmpress.arch.gguf_keys import check_gelu, rope_settings, rope_theta, shape_keys
from lmpress.arch.spec import GGUF, Norm, Spec
from lmpress.errors import ExportError
from lmpress.formats.gguf_file import U32


def gguf_metadata(config: Any, n_vocab: int) -> dict[str, Any]:
    check_gelu(config, "StarCoder2")
    if not getattr(config, "use_bias", True):
        raise ExportError("StarCoder2 without biases: llama.cpp's starcoder2 needs them")
    rope_type, rope = rope_settings(config)
    if rope_type != "default":
        raise ExportError(f"StarCoder2 with rope scaling {rope_type!r} is not exported to GGUF; export default rope")
    heads = config.num_attention_heads
    meta: dict[str, Any] = {
        **shape_keys(config, "starcoder2"),
        "starcoder2.attention.head_count_kv": U32(getattr(config, "num_key_value_heads", None) or heads),
        "starcoder2.attention.layer_norm_epsilon": float(config.norm_epsilon),
        "starcoder2.rope.dimension_count": U32(config.hidden_size // heads),
        "starcoder2.rope.freq_base": rope_theta(config, rope),
        "starcoder2.vocab_size": U32(n_vocab),
    }
    window = getattr(config, "sliding_window", None)
    if window is not None and window < config.max_position_embeddings:
        meta["starcoder2.context_length"] = U32(window)
    return meta


SPECS = (
    Spec(
        model_types=("starcoder2",),
        blocks="model.layers",
        embeddings={"model.embed_tokens": "token_embd"},
        final_norm=Norm("model.norm", "output_norm", "layernorm"),
        linears={
            "self_attn.q_proj": "attn_q",
            "self_attn.k_proj": "attn_k",
            "self_attn.v_proj": "attn_v",
            "self_attn.o_proj": "attn_output",
            "mlp.c_fc": "ffn_up",
            "mlp.c_proj": "ffn_down",
        },
        norms=(
            Norm("input_layernorm", "attn_norm", "layernorm"),
            Norm("post_attention_layernorm", "ffn_norm", "layernorm"),
        ),
        scale_groups=(
            ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ("self_attn.v_proj", ("self_attn.o_proj",)),
            ("post_attention_layernorm", ("mlp.c_fc",)),
        ),
        tied_by_default=True,
        rotary_emb="model.rotary_emb",
        gguf=GGUF("starcoder2", gguf_metadata),
        onnx="llama",
    ),
)
