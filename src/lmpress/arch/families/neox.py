"""GPT-NeoX (Pythia): LayerNorm blocks, one fused ``query_key_value`` projection whose rows are
per-head [q_h | k_h | v_h] triples, partial rotary embeddings, attention and MLP in parallel or in
sequence (``use_parallel_residual``), a GELU MLP."""

from __future__ import annotations

from typing import Any

from lmpress.arch.gguf_keys import layernorm_metadata
from lmpress.arch.spec import GGUF, Norm, Spec
from lmpress.errors import ExportError


def gguf_metadata(config: Any, n_vocab: int) -> dict[str, Any]:
    meta = layernorm_metadata(config, "gptneox", n_vocab, "GPT-NeoX")
    if not getattr(config, "attention_bias", True):
        raise ExportError("GPT-NeoX without attention biases: llama.cpp's gptneox needs them")
    meta["gptneox.use_parallel_residual"] = bool(getattr(config, "use_parallel_residual", True))
    return meta


SPECS = (
    Spec(
        model_types=("gpt_neox",),
        blocks="gpt_neox.layers",
        embeddings={"gpt_neox.embed_in": "token_embd"},
        final_norm=Norm("gpt_neox.final_layer_norm", "output_norm", "layernorm"),
        linears={
            "attention.query_key_value": "attn_qkv",
            "attention.dense": "attn_output",
            "mlp.dense_h_to_4h": "ffn_up",
            "mlp.dense_4h_to_h": "ffn_down",
        },
        norms=(
            Norm("input_layernorm", "attn_norm", "layernorm"),
            Norm("post_attention_layernorm", "ffn_norm", "layernorm"),
        ),
        qkv="per_head",
        scale_groups=(
            ("input_layernorm", ("attention.query_key_value",)),
            ("post_attention_layernorm", ("mlp.dense_h_to_4h",)),
        ),
        gguf=GGUF("gptneox", gguf_metadata, tied_output=True),
    ),
)
