"""Cohere (Command-R): one LayerNorm without a bias (``input_layernorm``: mean and variance, times
the weight) feeds attention and the MLP in parallel; separate q/k/v projections with grouped-query
attention and ``o_proj``; a SwiGLU MLP; rotary embeddings over the whole head pairing neighbouring
dimensions; the logits times ``logit_scale``; tied embeddings. Optional (``use_qk_norm``): a
LayerNorm over each query and key head with its own weight row per head, (heads, head_dim).

llama.cpp's ``command-r`` pairs rotary dimensions the same way (no reordering), reads the head from
the token embeddings and ``logit_scale`` from the file, and the per-head q/k norms only in models
of 64 layers or more (Command R+), so a config where ``use_qk_norm`` and that count disagree is
refused."""

from __future__ import annotations

from typing import Any

from lmpress.arch.families.llama import LLAMA
from lmpress.arch.gguf_keys import rope_settings, rope_theta, shape_keys
from lmpress.arch.spec import GGUF, Norm, Spec
from lmpress.errors import ExportError
from lmpress.formats.gguf_file import U32

QK_NORM_LAYERS = 64  # llama.cpp's command-r reads attn_q_norm / attn_k_norm from this many layers on


def cohere_keys(config: Any, n_vocab: int, arch: str, family: str) -> dict[str, Any]:
    """The keys Cohere and Cohere 2 share, refusing what llama.cpp's architectures do not compute."""
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ExportError(f"{family} with activation {config.hidden_act!r}: llama.cpp's {arch} uses SiLU")
    if not getattr(config, "tie_word_embeddings", True):
        raise ExportError(f"{family} with an untied head: llama.cpp's {arch} reads its head from token_embd")
    if getattr(config, "attention_bias", False):
        raise ExportError(f"{family} with attention biases: llama.cpp's {arch} has no output projection bias")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if head_dim * heads != config.hidden_size:
        raise ExportError(f"{family} with {heads} heads of {head_dim}: llama.cpp's {arch} needs heads x width = hidden")
    rope_type, rope = rope_settings(config)
    if rope_type != "default":
        raise ExportError(f"{family} with rope scaling {rope_type!r} is not exported to GGUF; export default rope")
    return {
        **shape_keys(config, arch),
        f"{arch}.attention.head_count_kv": U32(getattr(config, "num_key_value_heads", None) or heads),
        f"{arch}.attention.layer_norm_epsilon": float(config.layer_norm_eps),
        f"{arch}.rope.dimension_count": U32(head_dim),
        f"{arch}.rope.freq_base": rope_theta(config, rope),
        f"{arch}.logit_scale": float(config.logit_scale),
        f"{arch}.vocab_size": U32(n_vocab),
    }


def gguf_metadata(config: Any, n_vocab: int) -> dict[str, Any]:
    qk_norm = bool(getattr(config, "use_qk_norm", False))
    if qk_norm != (config.num_hidden_layers >= QK_NORM_LAYERS):
        has = "with" if qk_norm else "without"
        raise ExportError(
            f"Cohere {has} q/k norms in {config.num_hidden_layers} layers: llama.cpp's command-r reads q/k norms "
            f"exactly in models of {QK_NORM_LAYERS} layers or more"
        )
    return cohere_keys(config, n_vocab, "command-r", "Cohere")


# one norm feeds both sublayers: its scale group takes every linear that reads the block's input
PARALLEL_SCALE_GROUPS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")),
    ("self_attn.v_proj", ("self_attn.o_proj",)),
    ("mlp.up_proj", ("mlp.down_proj",)),
)

COHERE = Spec(
    model_types=("cohere",),
    blocks="model.layers",
    embeddings={"model.embed_tokens": "token_embd"},
    final_norm=Norm("model.norm", "output_norm", "layernorm"),
    linears=LLAMA.linears,  # the same projections and roles
    norms=(
        Norm("input_layernorm", "attn_norm", "layernorm"),
        Norm("self_attn.q_norm", "attn_q_norm", "layernorm", optional=True),
        Norm("self_attn.k_norm", "attn_k_norm", "layernorm", optional=True),
    ),
    scale_groups=PARALLEL_SCALE_GROUPS,
    tied_by_default=True,
    rotary_emb="model.rotary_emb",
    logits_after_head=lambda config, logits: logits * config.logit_scale,
    gguf=GGUF("command-r", gguf_metadata),
)

SPECS = (COHERE,)
