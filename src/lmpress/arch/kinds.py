"""Models that are not decoders lmpress compresses, told apart before any work: an encoder (BERT's
masked language models), an encoder-decoder (T5, BART), a state-space model without attention
(Mamba). Each is refused in one line that says what it is and what lmpress can do with it instead.

The first two are read from ``config.json`` (and transformers' model mappings); the last from the
model built on the meta device, by its decoder blocks (`lmpress.arch.discover`)."""

from __future__ import annotations

from typing import Any

from torch import nn

from lmpress.errors import ModelLoadError

TABLE = "docs/architectures.md"
INSTEAD = (
    f"lmpress compresses decoder-only causal language models (the families in {TABLE}); "
    "`lmpress inspect` shows what this one holds"
)


class NotADecoderError(ModelLoadError):
    """A model lmpress does not compress: an encoder, an encoder-decoder, a model without attention."""


def kind_refusal(config: dict[str, Any], trust_remote_code: bool = False) -> NotADecoderError | None:
    """The one-line refusal of an encoder or encoder-decoder ``config.json``, else None."""
    from transformers.models.auto import modeling_auto as auto  # at first use: importing it takes seconds

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or (trust_remote_code and config.get("auto_map")):
        return None
    causal = model_type in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    seq2seq = model_type in auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES
    if config.get("is_encoder_decoder") or (seq2seq and not causal):
        return NotADecoderError(f"{model_type} is an encoder-decoder (sequence-to-sequence) model: {INSTEAD}")
    if model_type in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES and not (causal and config.get("is_decoder")):
        return NotADecoderError(
            f"{model_type} is an encoder (a masked language model, attending both ways), not a decoder: {INSTEAD}"
        )
    return None


def has_attention(blocks: nn.Module) -> bool:
    """Some block holds an attention module (by its class name: every transformers attention class,
    softmax, linear or latent (``...MLA``), is named so), as a hybrid model's attention layers do."""
    names = {type(m).__name__.lower() for m in blocks.modules()}
    return any("attention" in n or "attn" in n or n.endswith("mla") for n in names)


def no_attention(model_type: object) -> NotADecoderError:
    return NotADecoderError(
        f"{model_type} has no attention layers (a state-space or recurrent model): lmpress compresses decoders with "
        f"attention (the families in {TABLE}); `lmpress inspect` shows what this one holds"
    )
