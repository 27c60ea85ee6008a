"""OLMo 2: Llama's projections with the norms moved after the sublayers. A block reads the
residual stream unnormalized and adds ``post_attention_layernorm(attention(x))`` and then
``post_feedforward_layernorm(mlp(h))``: both are post-norms, so no norm feeds a linear and only
the linear-to-linear scale groups remain. The query and key RMSNorms span each whole projection
(all heads at once), not one head. llama.cpp's ``olmo2`` names the post-norms
``post_attention_norm`` / ``post_ffw_norm``, does not reorder q/k rows (NeoX rotary) and has no
sliding-window layers in OLMo 2."""

from __future__ import annotations

from dataclasses import replace

from lmpress.arch.families.llama import LLAMA
from lmpress.arch.gguf_keys import rms_metadata
from lmpress.arch.spec import GGUF, Norm

OLMO2 = replace(
    LLAMA,
    model_types=("olmo2",),
    norms=(
        Norm("post_attention_layernorm", "attn_post_norm", "rmsnorm"),
        Norm("post_feedforward_layernorm", "ffn_post_norm", "rmsnorm"),
        Norm("self_attn.q_norm", "attn_q_norm", "rmsnorm"),
        Norm("self_attn.k_norm", "attn_k_norm", "rmsnorm"),
    ),
    qk_norm="projection",
    scale_groups=(
        ("self_attn.v_proj", ("self_attn.o_proj",)),
        ("mlp.up_proj", ("mlp.down_proj",)),
    ),
    gguf=GGUF("olmo2", lambda config, n_vocab: rms_metadata(config, "olmo2", n_vocab), tied_output=True),
    onnx="llama",
)

SPECS = (OLMO2,)
