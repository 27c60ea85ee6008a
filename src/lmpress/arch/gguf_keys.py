"""llama.cpp's hyper-parameter keys, the pieces families share: shapes, rotary settings, activations.

A family's spec names a ``metadata(config, n_vocab)`` function built from these; each refuses, with
an `ExportError`, a config llama.cpp's architecture would run differently from transformers.
"""

from __future__ import annotations

from typing import Any

from lmpress.errors import ExportError
from lmpress.formats.gguf_file import U32

GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # llama.cpp's GELU is the tanh form


def rope_settings(config: Any) -> tuple[str, dict[str, Any]]:
    """The config's rotary type and parameters (transformers >= 5 ``rope_parameters``, or the older keys)."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(rope, dict):
        rope = {}
    return str(rope.get("rope_type", rope.get("type", "default")) or "default"), rope


def rope_theta(config: Any, rope: dict[str, Any], default: float = 10000.0) -> float:
    theta = rope.get("rope_theta") or getattr(config, "rope_theta", None) or getattr(config, "rotary_emb_base", None)
    return float(theta or default)


def partial_rotary(config: Any, rope: dict[str, Any]) -> float:
    for value in (rope.get("partial_rotary_factor"), getattr(config, "partial_rotary_factor", None)):
        if value is not None:
            return float(value)
    return float(getattr(config, "rotary_pct", 1.0))


def check_gelu(config: Any, family: str, key: str = "hidden_act") -> None:
    act = getattr(config, key, "gelu_new")
    if act not in (*GELU_TANH, "gelu"):
        raise ExportError(f"{family} with activation {act!r}: llama.cpp's {family} uses GELU")


def shape_keys(config: Any, arch: str) -> dict[str, Any]:
    """The hyper-parameter keys every llama.cpp architecture but gpt2 spells the same way."""
    return {
        f"{arch}.context_length": U32(config.max_position_embeddings),
        f"{arch}.embedding_length": U32(config.hidden_size),
        f"{arch}.block_count": U32(config.num_hidden_layers),
        f"{arch}.feed_forward_length": U32(config.intermediate_size),
        f"{arch}.attention.head_count": U32(config.num_attention_heads),
    }


def rms_metadata(config: Any, arch: str, n_vocab: int, rope_freqs: bool = False) -> dict[str, Any]:
    """Keys of the RMSNorm families with full rotary embeddings (Llama, Mistral, Qwen2/3).
    ``rope_freqs``: the architecture reads llama3 rope from a ``rope_freqs.weight`` tensor."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope_type, rope = rope_settings(config)
    meta: dict[str, Any] = {
        **shape_keys(config, arch),
        f"{arch}.attention.head_count_kv": U32(getattr(config, "num_key_value_heads", None) or heads),
        f"{arch}.attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
        f"{arch}.rope.freq_base": rope_theta(config, rope),
        f"{arch}.rope.dimension_count": U32(head_dim),
        f"{arch}.vocab_size": U32(n_vocab),
    }
    if rope_type == "linear":
        meta[f"{arch}.rope.scaling.type"] = "linear"
        meta[f"{arch}.rope.scaling.factor"] = float(rope["factor"])
    elif rope_type == "llama3" and rope_freqs:
        pass  # the per-frequency factors go into the rope_freqs tensor
    elif rope_type != "default":
        raise ExportError(
            f"rope scaling {rope_type!r} is not exported to GGUF for {arch} "
            "(lmpress writes default, linear and, for Llama, llama3 rope)"
        )
    if head_dim != config.hidden_size // heads:
        meta[f"{arch}.attention.key_length"] = U32(head_dim)
        meta[f"{arch}.attention.value_length"] = U32(head_dim)
    return meta


def layernorm_metadata(config: Any, arch: str, n_vocab: int, family: str) -> dict[str, Any]:
    """Keys of the LayerNorm families with partial rotary embeddings (GPT-NeoX, Phi-1/2)."""
    check_gelu(config, family)
    rope_type, rope = rope_settings(config)
    if rope_type != "default":
        raise ExportError(f"{family} with rope scaling {rope_type!r} is not exported to GGUF; export default rope")
    head_dim = config.hidden_size // config.num_attention_heads
    return {
        **shape_keys(config, arch),
        f"{arch}.attention.layer_norm_epsilon": float(config.layer_norm_eps),
        f"{arch}.rope.dimension_count": U32(int(partial_rotary(config, rope) * head_dim)),
        f"{arch}.rope.freq_base": rope_theta(config, rope),
        f"{arch}.vocab_size": U32(n_vocab),
    }


# each role's tensor name in llama.cpp (``blk.N.`` + name + ``.weight``); a family's spec may rename one
ROLE_NAMES = {
    "token_embd": "token_embd",
    "output_norm": "output_norm",
    "output": "output",
    "attn_norm": "attn_norm",
    "ffn_norm": "ffn_norm",
    "attn_q": "attn_q",
    "attn_k": "attn_k",
    "attn_v": "attn_v",
    "attn_output": "attn_output",
    "ffn_gate": "ffn_gate",
    "ffn_up": "ffn_up",
    "ffn_down": "ffn_down",
    "attn_q_norm": "attn_q_norm",
    "attn_k_norm": "attn_k_norm",
    "position_embd": "position_embd",
    "attn_qkv": "attn_qkv",
    "attn_post_norm": "post_attention_norm",  # a post-norm: normalizes the attention's output (Gemma 2/3)
    "ffn_post_norm": "post_ffw_norm",  # normalizes the MLP's output
    "shortconv_in_proj": "shortconv.in_proj",  # LFM2's convolution blocks
    "shortconv_out_proj": "shortconv.out_proj",
    "shortconv_conv": "shortconv.conv",
}
