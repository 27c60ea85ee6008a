"""Gemma 3 (text): Gemma 2's sandwich of ``1 + w`` RMSNorms plus ``1 + w`` RMSNorms over each query
and key head, scaled embeddings, no soft-capping, and local (sliding-window) and global layers,
each kind with its own rotary base (``rope_parameters`` per layer type; linear scaling on the
global layers of the larger models). llama.cpp's ``gemma3`` reads the global base as
``rope.freq_base``, the local one as ``rope.freq_base_swa`` and the layer pattern as a period."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from lmpress.arch.families.gemma2 import GEMMA2, SANDWICH, check_query_scale, gemma_attention_keys, head_dim
from lmpress.arch.gguf_keys import shape_keys
from lmpress.arch.spec import GGUF, Norm
from lmpress.errors import ExportError
from lmpress.formats.gguf_file import U32


def _rope(config: Any, layer_type: str) -> dict[str, Any]:
    params = getattr(config, "rope_parameters", None) or {}
    rope = params.get(layer_type) or {}
    kind = rope.get("rope_type", "default")
    if kind not in ("default", "linear") or (kind == "linear" and layer_type == "sliding_attention"):
        raise ExportError(f"Gemma 3 with {kind!r} rope on its {layer_type} layers is not exported to GGUF")
    return dict(rope)


def gguf_metadata(config: Any, n_vocab: int) -> dict[str, Any]:
    check_query_scale(config, "Gemma 3", layers_27b=62)
    for key in ("attn_logit_softcapping", "final_logit_softcapping", "use_bidirectional_attention"):
        if getattr(config, key, None):
            raise ExportError(f"Gemma 3 with {key}: llama.cpp's gemma3 has none")
    local, glob = _rope(config, "sliding_attention"), _rope(config, "full_attention")
    heads = config.num_attention_heads
    meta: dict[str, Any] = {
        **shape_keys(config, "gemma3"),
        "gemma3.attention.head_count_kv": U32(getattr(config, "num_key_value_heads", None) or heads),
        "gemma3.attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
        "gemma3.rope.dimension_count": U32(head_dim(config)),
        "gemma3.rope.freq_base": float(glob.get("rope_theta", 1_000_000.0)),
        "gemma3.rope.freq_base_swa": float(local.get("rope_theta", 10_000.0)),
        "gemma3.vocab_size": U32(n_vocab),
        **gemma_attention_keys(config, "gemma3", "Gemma 3", 6),
    }
    if glob.get("rope_type") == "linear":
        meta["gemma3.rope.scaling.type"] = "linear"
        meta["gemma3.rope.scaling.factor"] = float(glob["factor"])
    return meta


def onnx_refuse(config: Any) -> str | None:
    """transformers' Gemma 3 ignores ``attn_logit_softcapping`` (ONNX would cap) and attends both
    ways with ``use_bidirectional_attention`` (ONNX attends causally)."""
    for key in ("attn_logit_softcapping", "use_bidirectional_attention"):
        if getattr(config, key, None):
            return f"ONNX export of Gemma 3 with {key} set: lmpress's ONNX graph attends causally, scores uncapped"
    return None


GEMMA3 = replace(
    GEMMA2,
    model_types=("gemma3_text",),
    norms=(
        *SANDWICH,
        Norm("self_attn.q_norm", "attn_q_norm", "rmsnorm_1p"),
        Norm("self_attn.k_norm", "attn_k_norm", "rmsnorm_1p"),
    ),
    gguf=GGUF("gemma3", gguf_metadata),
    onnx_refuse=onnx_refuse,
)

SPECS = (GEMMA3,)
