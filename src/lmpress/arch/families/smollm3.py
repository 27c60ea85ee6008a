"""SmolLM3: Llama's layout (tied head by default) with some layers that apply no rotary embedding
(``no_rope_layers``: 1 = rotary, 0 = none). llama.cpp's ``smollm3`` skips rotary on every fourth
layer (layers 3, 7, 11 ...), whatever the file says, and reorders q/k rows as for Llama; a model
whose layers without rope fall elsewhere, or with sliding-window layers, is refused for GGUF."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from lmpress.arch.families.llama import LLAMA
from lmpress.arch.gguf_keys import rms_metadata
from lmpress.arch.spec import GGUF
from lmpress.errors import ExportError

LLAMA_CPP_NO_ROPE_STEP = 4  # llama.cpp: layer il has rope unless (il + 1) % 4 == 0


def gguf_metadata(config: Any, n_vocab: int) -> dict[str, Any]:
    layers = config.num_hidden_layers
    rope = [int(x) for x in getattr(config, "no_rope_layers", None) or [1] * layers]
    expected = [int((i + 1) % LLAMA_CPP_NO_ROPE_STEP != 0) for i in range(layers)]
    if rope != expected:
        raise ExportError(
            f"SmolLM3 with no_rope_layers {rope}: llama.cpp's smollm3 skips rope on every fourth layer {expected}"
        )
    if "sliding_attention" in (getattr(config, "layer_types", None) or []):
        raise ExportError("SmolLM3 with sliding-window layers: llama.cpp's smollm3 attends over the whole context")
    return rms_metadata(config, "smollm3", n_vocab)


SMOLLM3 = replace(
    LLAMA,
    model_types=("smollm3",),
    tied_by_default=True,
    gguf=GGUF("smollm3", gguf_metadata, permute_qk=True),
    onnx="llama",
)

SPECS = (SMOLLM3,)
