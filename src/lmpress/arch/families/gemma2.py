"""Gemma 2: Gemma's ``1 + w`` RMSNorms as a sandwich (each sublayer's input normalized and its
output normalized again before the residual add: ``post_attention_layernorm`` and
``post_feedforward_layernorm`` are post-norms, which no scale folds into), tanh soft-capping of the
attention scores and of the final logits, attention scaled by ``query_pre_attn_scalar``, and
sliding-window attention on alternate layers. llama.cpp's ``gemma2`` names the post-norms
``post_attention_norm`` and ``post_ffw_norm``, stores every norm as ``1 + w`` and takes the
soft-capping and the window from the file; it scales queries by ``1/sqrt(head_dim)`` except in its
27B (46 layers: ``1/sqrt(hidden/heads)``), so a config whose ``query_pre_attn_scalar`` differs is
refused."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from lmpress.arch.families.gemma import GEMMA
from lmpress.arch.gguf_keys import check_gelu, rms_metadata
from lmpress.arch.spec import GGUF, Norm
from lmpress.errors import ExportError
from lmpress.formats.gguf_file import U32


def head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def check_query_scale(config: Any, family: str, layers_27b: int) -> None:
    """llama.cpp's Gemma 2/3 scale queries by 1/sqrt(head_dim), or by 1/sqrt(hidden/heads) in a
    model with the 27B's layer count; it reads no ``query_pre_attn_scalar``."""
    scalar = float(getattr(config, "query_pre_attn_scalar", None) or head_dim(config))
    runtime = config.hidden_size / config.num_attention_heads
    if config.num_hidden_layers != layers_27b:
        runtime = head_dim(config)
    if scalar != runtime:
        raise ExportError(
            f"{family} with query_pre_attn_scalar {scalar:g}: llama.cpp scales its queries by "
            f"1/sqrt({runtime:g}) for this shape"
        )


def swa_period(config: Any, family: str, default: int) -> int:
    """The period llama.cpp's sliding-window pattern needs to give each layer the attention
    transformers gives it (layer i slides when ``i % period < period - 1``; 1: none slides)."""
    types = list(getattr(config, "layer_types", None) or [])
    if getattr(config, "sliding_window", None) is None:
        types = ["full_attention"] * config.num_hidden_layers
    for period in (default, *range(1, len(types) + 2)):
        if types == [("sliding_attention" if i % period < period - 1 else "full_attention") for i in range(len(types))]:
            return period
    raise ExportError(f"{family} with layer types {types}: llama.cpp's sliding-window layers come in a fixed period")


def gemma_attention_keys(config: Any, arch: str, family: str, default_period: int) -> dict[str, Any]:
    """The keys Gemma 2 and 3 share: q/k/v widths, the window and its period, the activation."""
    check_gelu(config, family, "hidden_activation")
    width = head_dim(config)
    meta = {
        f"{arch}.attention.key_length": U32(width),
        f"{arch}.attention.value_length": U32(width),
        f"{arch}.attention.sliding_window_pattern": U32(swa_period(config, family, default_period)),
    }
    if getattr(config, "sliding_window", None) is not None:
        meta[f"{arch}.attention.sliding_window"] = U32(config.sliding_window)
    return meta


def gguf_metadata(config: Any, n_vocab: int) -> dict[str, Any]:
    check_query_scale(config, "Gemma 2", layers_27b=46)
    meta = rms_metadata(config, "gemma2", n_vocab)
    meta.update(gemma_attention_keys(config, "gemma2", "Gemma 2", 2))
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        cap = getattr(config, key, None)
        if cap is None:  # llama.cpp's gemma2 always soft-caps
            raise ExportError(f"Gemma 2 without {key}: llama.cpp's gemma2 always soft-caps")
        meta[f"gemma2.{key}"] = float(cap)
    return meta


# the sandwich: a pre-norm and a post-norm around each sublayer; only the pre-norms feed linears
SANDWICH = (
    Norm("input_layernorm", "attn_norm", "rmsnorm_1p"),
    Norm("post_attention_layernorm", "attn_post_norm", "rmsnorm_1p"),
    Norm("pre_feedforward_layernorm", "ffn_norm", "rmsnorm_1p"),
    Norm("post_feedforward_layernorm", "ffn_post_norm", "rmsnorm_1p"),
)
SANDWICH_SCALE_GROUPS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.v_proj", ("self_attn.o_proj",)),
    ("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
)


def softcap_logits(config: Any, logits: Tensor) -> Tensor:
    """The final logits soft-capped as Gemma 2 and 3's forward does (none where the config says none)."""
    cap = getattr(config, "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap


GEMMA2 = replace(
    GEMMA,
    model_types=("gemma2",),
    norms=SANDWICH,
    scale_groups=SANDWICH_SCALE_GROUPS,
    logits_after_head=softcap_logits,
    gguf=GGUF("gemma2", gguf_metadata),
)

SPECS = (GEMMA2,)
