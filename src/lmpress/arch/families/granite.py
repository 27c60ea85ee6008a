"""Granite (IBM Granite 3.x dense): Llama's layout with four scalars from the config, applied inside
the model's own forward: the token embeddings times ``embedding_multiplier``, each sublayer's
output times ``residual_multiplier`` before the residual add, attention scores times
``attention_multiplier`` (instead of 1/sqrt(head_dim)), and the logits divided by
``logits_scaling``. None of them touches a norm or a linear, so folding and pruning are Llama's.
llama.cpp's ``granite`` reads them as ``embedding_scale``, ``residual_scale``, ``attention.scale``
and ``logit_scale``, and reorders q/k rows as for Llama."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from lmpress.arch.families.llama import LLAMA
from lmpress.arch.gguf_keys import rms_metadata
from lmpress.arch.spec import GGUF

MULTIPLIERS = {  # config key -> llama.cpp key (after the architecture name)
    "embedding_multiplier": "embedding_scale",
    "residual_multiplier": "residual_scale",
    "attention_multiplier": "attention.scale",
    "logits_scaling": "logit_scale",
}


def gguf_metadata(config: Any, n_vocab: int) -> dict[str, Any]:
    meta = rms_metadata(config, "granite", n_vocab)
    for key, name in MULTIPLIERS.items():
        meta[f"granite.{name}"] = float(getattr(config, key))
    return meta


GRANITE = replace(
    LLAMA,
    model_types=("granite",),
    logits_after_head=lambda config, logits: logits / config.logits_scaling,
    gguf=GGUF("granite", gguf_metadata, permute_qk=True),
    onnx="llama",
)

SPECS = (GRANITE,)
