"""LFM2 (Liquid AI): a hybrid of attention layers and gated short-convolution layers, listed per
layer in ``config.layer_types`` ("full_attention" / "conv"). Every block has an RMSNorm in front of
its token mixer (``operator_norm``), an RMSNorm in front of its SwiGLU MLP (``ffn_norm``;
``w1`` gate, ``w3`` up, ``w2`` down) and the two residual adds. An attention block has q/k/v/out
projections with per-head q/k RMSNorms and NeoX rotary; a convolution block has ``conv.in_proj``
(3 x hidden rows: B, C, x), a depthwise causal ``Conv1d`` of ``conv_L_cache`` taps over B * x (its
cache keeps the last ``conv_L_cache - 1`` inputs) and ``conv.out_proj`` over C * conv. Each block
has only its kind's linears (`Spec.optional_linears`); the convolution kernels are not linears,
and stay in float through every method (`Spec.tensors`). The final norm is ``embedding_norm``.

llama.cpp's ``lfm2`` tells the kinds apart by a per-layer ``head_count_kv`` array (0: convolution),
names the kernel ``shortconv.conv`` (written (hidden, taps)), the projections
``shortconv.in_proj`` / ``shortconv.out_proj`` and the final norm ``token_embd_norm``; it has no
convolution or projection biases and reads no rope scaling."""

from __future__ import annotations

from typing import Any

from lmpress.arch.gguf_keys import rope_settings, rope_theta, shape_keys
from lmpress.arch.spec import GGUF, Norm, Spec
from lmpress.errors import ExportError
from lmpress.formats.gguf_file import U32

ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")
CONV = ("conv.in_proj", "conv.out_proj")


def ffn_width(config: Any) -> int:
    """The MLP width transformers builds from an LFM2 config: with ``block_auto_adjust_ff_dim``,
    2/3 of ``intermediate_size``, times ``block_ffn_dim_multiplier`` rounded up to a multiple of
    ``block_multiple_of`` where a multiplier is given."""
    width = int(config.intermediate_size)
    if getattr(config, "block_auto_adjust_ff_dim", False):
        width = int(2 * width / 3)
        multiplier = getattr(config, "block_ffn_dim_multiplier", None)
        if multiplier is not None:
            step = int(config.block_multiple_of)
            width = step * ((int(multiplier * width) + step - 1) // step)
    return width


def gguf_metadata(config: Any, n_vocab: int) -> dict[str, Any]:
    if getattr(config, "conv_bias", False):
        raise ExportError("LFM2 with conv_bias: llama.cpp's lfm2 has no convolution or projection biases")
    rope_type, rope = rope_settings(config)
    if rope_type != "default":
        raise ExportError(f"LFM2 with rope scaling {rope_type!r}: llama.cpp's lfm2 reads none")
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    return {
        **shape_keys(config, "lfm2"),
        "lfm2.feed_forward_length": U32(ffn_width(config)),
        "lfm2.attention.head_count_kv": [0 if t == "conv" else kv for t in config.layer_types],
        "lfm2.attention.layer_norm_rms_epsilon": float(config.norm_eps),
        "lfm2.rope.freq_base": rope_theta(config, rope, 1_000_000.0),
        "lfm2.shortconv.l_cache": U32(config.conv_L_cache),
        "lfm2.vocab_size": U32(n_vocab),
    }


LFM2 = Spec(
    model_types=("lfm2",),
    blocks="model.layers",
    embeddings={"model.embed_tokens": "token_embd"},
    final_norm=Norm("model.embedding_norm", "output_norm", "rmsnorm"),
    linears={
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.out_proj": "attn_output",
        "conv.in_proj": "shortconv_in_proj",
        "conv.out_proj": "shortconv_out_proj",
        "feed_forward.w1": "ffn_gate",
        "feed_forward.w3": "ffn_up",
        "feed_forward.w2": "ffn_down",
    },
    optional_linears=ATTENTION + CONV,
    tensors={"conv.conv.weight": "shortconv_conv"},
    norms=(
        Norm("operator_norm", "attn_norm", "rmsnorm"),
        Norm("ffn_norm", "ffn_norm", "rmsnorm"),
        Norm("self_attn.q_layernorm", "attn_q_norm", "rmsnorm", optional=True),
        Norm("self_attn.k_layernorm", "attn_k_norm", "rmsnorm", optional=True),
    ),
    # B, C and x all read the operator norm; out_proj reads C * conv(B * x), whose scale could go into
    # C's rows alone, not into all of in_proj's: it takes none
    scale_groups=(
        ("operator_norm", (*ATTENTION[:3], CONV[0])),
        ("self_attn.v_proj", ("self_attn.out_proj",)),
        ("ffn_norm", ("feed_forward.w1", "feed_forward.w3")),
        ("feed_forward.w3", ("feed_forward.w2",)),
    ),
    tied_by_default=True,
    rotary_emb="model.rotary_emb",
    gguf=GGUF("lfm2", gguf_metadata, names={"output_norm": "token_embd_norm"}),
)

SPECS = (LFM2,)
