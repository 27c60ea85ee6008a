"""Cohere 2 (Command R7B): Cohere's parallel block (one bias-free LayerNorm feeding attention and
the SwiGLU MLP), tied head and ``logit_scale``, with local and global layers (``layer_types``,
three sliding-window layers then a full one by default) where only the sliding layers apply rotary
embeddings; no q/k norms. llama.cpp's ``cohere2`` reads the window and its period from the file and
applies rotary on exactly its sliding layers."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from lmpress.arch.families.cohere import COHERE, cohere_keys
from lmpress.arch.families.gemma2 import swa_period
from lmpress.arch.spec import GGUF, Norm
from lmpress.errors import ExportError
from lmpress.formats.gguf_file import U32


def gguf_metadata(config: Any, n_vocab: int) -> dict[str, Any]:
    if getattr(config, "sliding_window", None) is None:  # transformers then applies rotary nowhere
        raise ExportError("Cohere 2 without a sliding_window: llama.cpp's cohere2 applies rotary on its sliding layers")
    return {
        **cohere_keys(config, n_vocab, "cohere2", "Cohere 2"),
        "cohere2.attention.sliding_window": U32(config.sliding_window),
        "cohere2.attention.sliding_window_pattern": U32(swa_period(config, "Cohere 2", 4)),
    }


COHERE2 = replace(
    COHERE,
    model_types=("cohere2",),
    norms=(Norm("input_layernorm", "attn_norm", "layernorm"),),
    gguf=GGUF("cohere2", gguf_metadata),
)

SPECS = (COHERE2,)
