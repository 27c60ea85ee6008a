"""OPT: LayerNorm blocks (post-norm when ``do_layer_norm_before`` is false, as OPT-350m), separate
q/k/v/out projections, a ReLU MLP (fc1, fc2) at block level, learned positions."""

from __future__ import annotations

from lmpress.arch.spec import Norm, Spec

SPECS = (
    Spec(
        model_types=("opt",),
        blocks="model.decoder.layers",
        embeddings={"model.decoder.embed_tokens": "token_embd", "model.decoder.embed_positions": "position_embd"},
        final_norm=Norm("model.decoder.final_layer_norm", "output_norm", "layernorm"),
        linears={
            "self_attn.q_proj": "attn_q",
            "self_attn.k_proj": "attn_k",
            "self_attn.v_proj": "attn_v",
            "self_attn.out_proj": "attn_output",
            "fc1": "ffn_up",
            "fc2": "ffn_down",
        },
        norms=(
            Norm("self_attn_layer_norm", "attn_norm", "layernorm"),
            Norm("final_layer_norm", "ffn_norm", "layernorm"),
        ),
        scale_groups=(
            ("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ("self_attn.v_proj", ("self_attn.out_proj",)),
            ("final_layer_norm", ("fc1",)),
            ("fc1", ("fc2",)),  # ReLU is positively homogeneous
        ),
        mlp_width_key="ffn_dim",
        pre_norm_key="do_layer_norm_before",
    ),
)
