"""GPT-2: pre-norm LayerNorm blocks, one fused ``c_attn`` projection whose rows are [q | k | v],
learned positions, a GELU MLP, weights stored transposed in ``Conv1D`` modules, a tied head."""

from __future__ import annotations

from typing import Any

from lmpress.arch.gguf_keys import GELU_TANH
from lmpress.arch.spec import GGUF, Norm, Spec
from lmpress.errors import ExportError
from lmpress.formats.gguf_file import U32


def gguf_metadata(config: Any, n_vocab: int) -> dict[str, Any]:
    """llama.cpp's hyper-parameter keys for a GPT-2 config."""
    if getattr(config, "activation_function", "gelu_new") not in GELU_TANH:
        raise ExportError(f"GPT-2 with activation {config.activation_function!r}: llama.cpp's gpt2 uses tanh GELU")
    return {
        "gpt2.context_length": U32(config.n_positions),
        "gpt2.embedding_length": U32(config.n_embd),
        "gpt2.feed_forward_length": U32(config.n_inner or 4 * config.n_embd),
        "gpt2.block_count": U32(config.n_layer),
        "gpt2.attention.head_count": U32(config.n_head),
        "gpt2.attention.layer_norm_epsilon": float(config.layer_norm_epsilon),
        "gpt2.vocab_size": U32(n_vocab),
    }


def _onnx_refuse(config: Any) -> str | None:
    if not getattr(config, "scale_attn_weights", True):
        return "GPT-2 without scale_attn_weights is not exported to onnx"
    return None


GPT2 = Spec(
    model_types=("gpt2",),
    blocks="transformer.h",
    embeddings={"transformer.wte": "token_embd", "transformer.wpe": "position_embd"},
    final_norm=Norm("transformer.ln_f", "output_norm", "layernorm"),
    linears={
        "attn.c_attn": "attn_qkv",
        "attn.c_proj": "attn_output",
        "mlp.c_fc": "ffn_up",
        "mlp.c_proj": "ffn_down",
    },
    norms=(Norm("ln_1", "attn_norm", "layernorm"), Norm("ln_2", "ffn_norm", "layernorm")),
    qkv="concat",
    conv1d=True,
    scale_groups=(("ln_1", ("attn.c_attn",)), ("ln_2", ("mlp.c_fc",))),
    mlp_width_key="n_inner",
    tied_by_default=True,
    gguf=GGUF("gpt2", gguf_metadata),
    onnx="gpt2",
    onnx_refuse=_onnx_refuse,
)

SPECS = (GPT2,)
