"""GPT-J: one LayerNorm (``ln_1``) feeds attention and the MLP in parallel; separate q/k/v and
``out_proj`` without biases; a GELU MLP (``fc_in``, ``fc_out``) with biases; rotary embeddings on
the first ``rotary_dim`` dimensions of each head, pairing neighbouring dimensions ("rotate every
two"); an untied head with a bias.

llama.cpp names a ``gptj`` architecture but has no graph for it, so GPT-J is written as ``phi2``,
which computes the same block (one LayerNorm, parallel attention and GELU MLP, partial rotary, a
head with a bias) with NeoX rotary, which pairs dimension i with i + rotary_dim/2: each head's
query and key rows are regrouped from neighbouring pairs into those halves (the same permutation
of q and k leaves every attention score as it was), and ``out_proj``, which has no bias, gets the
zero bias ``phi2`` requires."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lmpress.arch.gguf_keys import check_gelu
from lmpress.arch.spec import GGUF, Norm, Spec
from lmpress.errors import ExportError
from lmpress.formats.gguf_file import U32

ROTARY_BASE = 10000.0  # GPT-J's sinusoidal positions are fixed to this base


def gguf_metadata(config: Any, n_vocab: int) -> dict[str, Any]:
    check_gelu(config, "GPT-J", "activation_function")
    heads, width = config.n_head, config.n_embd
    rotary = getattr(config, "rotary_dim", None)
    if not rotary or rotary % 2 or rotary > width // heads:
        raise ExportError(f"GPT-J with rotary_dim {rotary}: llama.cpp needs an even rotary width within a head")
    return {
        "phi2.context_length": U32(config.n_positions),
        "phi2.embedding_length": U32(width),
        "phi2.block_count": U32(config.n_layer),
        "phi2.feed_forward_length": U32(config.n_inner or 4 * width),
        "phi2.attention.head_count": U32(heads),
        "phi2.attention.head_count_kv": U32(heads),
        "phi2.attention.layer_norm_epsilon": float(config.layer_norm_epsilon),
        "phi2.rope.dimension_count": U32(rotary),
        "phi2.rope.freq_base": ROTARY_BASE,
        "phi2.vocab_size": U32(n_vocab),
    }


def rotary_halves(rows: int, head_dim: int, rotary: int) -> Tensor:
    """Row order that turns each head's neighbouring rotary pairs (2j, 2j+1) into NeoX's halves
    (j, j + rotary/2); the dimensions past ``rotary`` stay.  -> (rows,) indices"""
    within = torch.cat([torch.arange(0, rotary, 2), torch.arange(1, rotary, 2), torch.arange(rotary, head_dim)])
    return (torch.arange(rows // head_dim)[:, None] * head_dim + within).reshape(-1)  # (heads * head_dim,)


def row_order(role: str, rows: int, config: Any) -> Tensor | None:
    if role not in ("attn_q", "attn_k"):
        return None
    return rotary_halves(rows, config.n_embd // config.n_head, config.rotary_dim)


SPECS = (
    Spec(
        model_types=("gptj",),
        blocks="transformer.h",
        embeddings={"transformer.wte": "token_embd"},
        final_norm=Norm("transformer.ln_f", "output_norm", "layernorm"),
        linears={
            "attn.q_proj": "attn_q",
            "attn.k_proj": "attn_k",
            "attn.v_proj": "attn_v",
            "attn.out_proj": "attn_output",
            "mlp.fc_in": "ffn_up",
            "mlp.fc_out": "ffn_down",
        },
        norms=(Norm("ln_1", "attn_norm", "layernorm"),),  # feeds both sublayers: no second norm
        scale_groups=(
            ("ln_1", ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.fc_in")),
            ("attn.v_proj", ("attn.out_proj",)),
        ),
        mlp_width_key="n_inner",  # None: 4 * n_embd
        rotary_emb="transformer.rotary_emb",
        gguf=GGUF("phi2", gguf_metadata, row_order=row_order, zero_biases=("attn_output",), tied_output=True),
    ),
)
