"""StableLM (2): LayerNorm blocks (with biases), separate q/k/v projections (biases optional) and an
``o_proj``, partial rotary embeddings, a SwiGLU MLP, an untied head. Optional in a config: a
LayerNorm per query and key head (``qk_layernorm``; a list of norms, one per head, that llama.cpp
reads stacked as ``attn_q_norm`` of (heads, head_dim)) and a parallel residual
(``use_parallel_residual``: the MLP reads the attention's norm and the block has no second norm,
which llama.cpp's ``stablelm`` infers from the missing ``ffn_norm``)."""

from __future__ import annotations

from typing import Any

from lmpress.arch.families.llama import LLAMA
from lmpress.arch.gguf_keys import partial_rotary, rope_settings, rope_theta, shape_keys
from lmpress.arch.spec import GGUF, Norm, Spec
from lmpress.errors import ExportError
from lmpress.formats.gguf_file import U32


def gguf_metadata(config: Any, n_vocab: int) -> dict[str, Any]:
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ExportError(f"StableLM with activation {config.hidden_act!r}: llama.cpp's stablelm uses SiLU")
    rope_type, rope = rope_settings(config)
    if rope_type != "default":
        raise ExportError(f"StableLM with rope scaling {rope_type!r} is not exported to GGUF; export default rope")
    heads = config.num_attention_heads
    return {
        **shape_keys(config, "stablelm"),
        "stablelm.attention.head_count_kv": U32(getattr(config, "num_key_value_heads", None) or heads),
        "stablelm.attention.layer_norm_epsilon": float(config.layer_norm_eps),
        "stablelm.rope.dimension_count": U32(int(partial_rotary(config, rope) * (config.hidden_size // heads))),
        "stablelm.rope.freq_base": rope_theta(config, rope),
        "stablelm.vocab_size": U32(n_vocab),
    }


SPECS = (
    Spec(
        model_types=("stablelm",),
        blocks="model.layers",
        embeddings={"model.embed_tokens": "token_embd"},
        final_norm=Norm("model.norm", "output_norm", "layernorm"),
        linears=LLAMA.linears,  # the same projections and roles
        norms=(
            Norm("input_layernorm", "attn_norm", "layernorm"),
            Norm("post_attention_layernorm", "ffn_norm", "layernorm", optional=True),
            Norm("self_attn.q_layernorm", "attn_q_norm", "layernorm", optional=True),
            Norm("self_attn.k_layernorm", "attn_k_norm", "layernorm", optional=True),
        ),
        scale_groups=LLAMA.scale_groups,
        parallel_key="use_parallel_residual",
        rotary_emb="model.rotary_emb",
        gguf=GGUF("stablelm", gguf_metadata, tied_output=True),
        onnx="llama",
    ),
)
