"""Llama and the families that share its layout: Mistral, Qwen2, Qwen3.

Pre-norm RMSNorm blocks; separate q/k/v projections with grouped-query attention; a SwiGLU MLP
(gate, up, down); rotary embeddings over the whole head. Qwen3 adds RMSNorms over each query and
key head. llama.cpp names Llama and Mistral ``llama`` (reordering q/k rows for its rotary layout)
and Qwen2/3 by their own names (no reordering).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from lmpress.arch.gguf_keys import rms_metadata
from lmpress.arch.spec import GGUF, Norm, Spec


def _meta(arch: str, rope_freqs: bool = False) -> Any:
    return lambda config, n_vocab: rms_metadata(config, arch, n_vocab, rope_freqs)


LLAMA = Spec(
    model_types=("llama", "mistral"),
    blocks="model.layers",
    embeddings={"model.embed_tokens": "token_embd"},
    final_norm=Norm("model.norm", "output_norm", "rmsnorm"),
    linears={
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    },
    norms=(
        Norm("input_layernorm", "attn_norm", "rmsnorm"),
        Norm("post_attention_layernorm", "ffn_norm", "rmsnorm"),
        Norm("self_attn.q_norm", "attn_q_norm", "rmsnorm", optional=True),
        Norm("self_attn.k_norm", "attn_k_norm", "rmsnorm", optional=True),
    ),
    scale_groups=(
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("self_attn.v_proj", ("self_attn.o_proj",)),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ("mlp.up_proj", ("mlp.down_proj",)),
    ),
    head_dim_in_config=True,
    rotary_emb="model.rotary_emb",
    gguf=GGUF("llama", _meta("llama", rope_freqs=True), permute_qk=True, rope_freqs=True),
    onnx="llama",
)
QWEN2 = replace(LLAMA, model_types=("qwen2",), gguf=GGUF("qwen2", _meta("qwen2")))
QWEN3 = replace(LLAMA, model_types=("qwen3",), gguf=GGUF("qwen3", _meta("qwen3")))

SPECS = (LLAMA, QWEN2, QWEN3)
