"""GPT BigCode (StarCoder 1, SantaCoder): GPT-2's block (pre-norm LayerNorms with biases, learned
positions, a tanh-GELU MLP, a tied head) in ``nn.Linear`` layers, with multi-query attention: the
fused ``c_attn`` rows are [q: every head | k: one head | v: one head] (``multi_query``, the default),
or per-head [q_h | k_h | v_h] triples without it. Both are one layout, per key/value group
[q × heads per group | k | v] (`Spec.qkv` ``per_head``), with one group or one per head, so
structured pruning removes heads only where each has its own keys and values.

llama.cpp reads it as ``starcoder``: ``attn_qkv`` as [all q | all k | all v] (a multi-query
projection as it is, per-head triples regrouped), biases on every linear and norm, learned positions.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import Tensor

from lmpress.arch.families.gpt2 import GPT2
from lmpress.arch.gguf_keys import check_gelu
from lmpress.arch.spec import GGUF, group_order
from lmpress.errors import ExportError
from lmpress.formats.gguf_file import U32


def kv_heads(config: Any) -> int:
    return 1 if getattr(config, "multi_query", True) else int(config.n_head)


def gguf_metadata(config: Any, n_vocab: int) -> dict[str, Any]:
    check_gelu(config, "GPT BigCode", "activation_function")
    if not getattr(config, "scale_attn_weights", True):
        raise ExportError("GPT BigCode without scale_attn_weights: llama.cpp's starcoder scales by 1/sqrt(head_dim)")
    return {
        "starcoder.context_length": U32(config.n_positions),
        "starcoder.embedding_length": U32(config.n_embd),
        "starcoder.feed_forward_length": U32(config.n_inner or 4 * config.n_embd),
        "starcoder.block_count": U32(config.n_layer),
        "starcoder.attention.head_count": U32(config.n_head),
        "starcoder.attention.head_count_kv": U32(kv_heads(config)),
        "starcoder.attention.layer_norm_epsilon": float(config.layer_norm_epsilon),
        "starcoder.vocab_size": U32(n_vocab),
    }


def row_order(role: str, rows: int, config: Any) -> Tensor | None:
    """Per-head [q_h | k_h | v_h] triples regrouped as llama.cpp's [all q | all k | all v]; a
    multi-query projection (one group) is already in that order."""
    if role != "attn_qkv" or kv_heads(config) == 1:
        return None
    return group_order(rows, config.n_head, kv_heads(config))


# GPT-2's blocks, names and roles, with nn.Linear projections and a fused qkv of kv-head groups
GPT_BIGCODE = replace(
    GPT2,
    model_types=("gpt_bigcode",),
    qkv="per_head",
    conv1d=False,
    # v -> c_proj is not a group: a multi-query v head is read by every query head's columns
    gguf=GGUF("starcoder", gguf_metadata, row_order=row_order),
    onnx=None,
    onnx_refuse=lambda config: None,
)

SPECS = (GPT_BIGCODE,)
