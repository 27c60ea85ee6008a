"""Falcon: LayerNorm blocks, one fused ``query_key_value`` projection, rotary embeddings over the
whole head (NeoX halves), a GELU MLP (``dense_h_to_4h``, ``dense_4h_to_h``), linears without
biases by default, a tied head. Its configs lay the block out three ways:

- Falcon-7B (``multi_query``, ``parallel_attn``): one key/value head, query rows [q: every head | k | v];
  one LayerNorm (``input_layernorm``) feeds attention and the MLP in parallel.
- Falcon-40B/180B (``new_decoder_architecture``): ``num_kv_heads`` groups, rows per group
  [q × heads per group | k | v]; a norm for each sublayer (``ln_attn``, ``ln_mlp``), still in
  parallel (Falcon 2 11B: one, ``num_ln_in_parallel_attn`` 1).
- Multi-head (neither): per-head [q_h | k_h | v_h] triples, attention then MLP in sequence
  (``post_attention_layernorm``) unless ``parallel_attn``.

The three are one layout, per key/value group [q… | k | v] (`Spec.qkv` ``per_head``, one group
for multi-query), so structured pruning removes whole groups (none of a multi-query model's heads,
and none where ALiBi gives each of the config's heads a slope: `Spec.heads_refuse`). AWQ and
SmoothQuant fold into the norms in front of qkv and the MLP (one norm feeding both in parallel).

llama.cpp's ``falcon`` reads ``attn_qkv`` as [all q | all k | all v] (its converter regroups the
rows), computes the parallel block only, and calls ``ln_mlp`` ``attn_norm`` (the norm the MLP
reads, and attention too where there is no ``attn_norm_2``) and ``ln_attn`` ``attn_norm_2``. It has
no linear biases, no ALiBi (Falcon-RW) and no sequential block: those are refused for GGUF.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lmpress.arch.gguf_keys import check_gelu, rope_settings, rope_theta
from lmpress.arch.spec import GGUF, Norm, Spec, group_order
from lmpress.errors import ExportError
from lmpress.formats.gguf_file import U32

QKV = "self_attention.query_key_value"
UP = "mlp.dense_h_to_4h"


def _check_gguf(config: Any) -> None:
    """One line for what llama.cpp's falcon computes differently."""
    if getattr(config, "alibi", False):
        raise ExportError("Falcon with ALiBi positions (alibi: true): llama.cpp's falcon has rotary positions only")
    if not (config.parallel_attn or config.new_decoder_architecture):
        raise ExportError("Falcon with attention, then the MLP (parallel_attn: false): llama.cpp's falcon is parallel")
    if getattr(config, "bias", False):
        raise ExportError("Falcon with linear biases (bias: true): llama.cpp's falcon reads none")
    check_gelu(config, "Falcon", "activation")
    rope_type, _ = rope_settings(config)
    if rope_type != "default":
        raise ExportError(f"Falcon with rope scaling {rope_type!r} is not exported to GGUF; export default rope")


def gguf_metadata(config: Any, n_vocab: int) -> dict[str, Any]:
    _check_gguf(config)
    _, rope = rope_settings(config)
    return {
        "falcon.context_length": U32(config.max_position_embeddings),
        "falcon.embedding_length": U32(config.hidden_size),
        "falcon.feed_forward_length": U32(config.ffn_hidden_size),
        "falcon.block_count": U32(config.num_hidden_layers),
        "falcon.attention.head_count": U32(config.num_attention_heads),
        "falcon.attention.head_count_kv": U32(config.num_key_value_heads),
        "falcon.attention.layer_norm_epsilon": float(config.layer_norm_epsilon),
        "falcon.rope.freq_base": rope_theta(config, rope),
        "falcon.vocab_size": U32(n_vocab),
    }


def row_order(role: str, rows: int, config: Any) -> Tensor | None:
    """Each key/value group's [q… | k | v] regrouped as [all q | all k | all v], as llama.cpp's
    converter writes them (a multi-query projection, one group, is already in that order)."""
    kv = config.num_key_value_heads
    if role != "attn_qkv" or kv == 1:
        return None
    return group_order(rows, config.num_attention_heads, kv)


def heads_refuse(config: Any) -> str | None:
    if getattr(config, "alibi", False):
        return "Falcon with ALiBi positions builds a slope for each of the config's heads: its heads are kept"
    return None


SPECS = (
    Spec(
        model_types=("falcon",),
        blocks="transformer.h",
        embeddings={"transformer.word_embeddings": "token_embd"},
        final_norm=Norm("transformer.ln_f", "output_norm", "layernorm"),
        linears={QKV: "attn_qkv", "self_attention.dense": "attn_output", UP: "ffn_up", "mlp.dense_4h_to_h": "ffn_down"},
        norms=(  # each config has one or two of these
            Norm("input_layernorm", "attn_norm", "layernorm", optional=True),
            Norm("post_attention_layernorm", "ffn_norm", "layernorm", optional=True),  # in sequence
            Norm("ln_attn", "attn_norm_2", "layernorm", optional=True),  # new_decoder_architecture
            Norm("ln_mlp", "ffn_norm_parallel", "layernorm", optional=True),
        ),
        qkv="per_head",
        # dense reads v through the query heads of its group: no v -> dense group
        scale_groups=(
            ("input_layernorm", (QKV,)),
            ("post_attention_layernorm", (UP,)),  # merged into the first where parallel_attn
            ("ln_attn", (QKV,)),
            ("ln_mlp", (UP,)),
        ),
        mlp_width_key="ffn_hidden_size",
        tied_by_default=True,
        rotary_emb="transformer.rotary_emb",
        parallel_key="parallel_attn",
        heads_refuse=heads_refuse,
        gguf=GGUF(
            "falcon",
            gguf_metadata,
            row_order=row_order,
            names={"attn_norm_2": "attn_norm_2", "ffn_norm_parallel": "attn_norm"},
        ),
    ),
)
