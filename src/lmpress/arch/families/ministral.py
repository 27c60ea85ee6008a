"""Ministral (8B-2410): Mistral's layout with each layer's attention full or sliding-window
(``layer_types``). llama.cpp runs it as ``llama`` (its converter names the checkpoint Mistral),
attending over its whole context: a model with sliding layers is written with the window as its
context length, within which the two attend alike. ONNX computes the window, a mask per layer type."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from lmpress.arch.families.llama import LLAMA
from lmpress.arch.gguf_keys import rms_metadata
from lmpress.arch.spec import GGUF
from lmpress.formats.gguf_file import U32


def gguf_metadata(config: Any, n_vocab: int) -> dict[str, Any]:
    meta = rms_metadata(config, "llama", n_vocab, rope_freqs=True)
    window = getattr(config, "sliding_window", None)
    sliding = "sliding_attention" in (getattr(config, "layer_types", None) or [])
    if sliding and window is not None and window < config.max_position_embeddings:
        meta["llama.context_length"] = U32(window)
    return meta


MINISTRAL = replace(
    LLAMA,
    model_types=("ministral",),
    gguf=GGUF("llama", gguf_metadata, permute_qk=True, rope_freqs=True),
    onnx="llama",
)

SPECS = (MINISTRAL,)
