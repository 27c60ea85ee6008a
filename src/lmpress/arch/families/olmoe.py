"""OLMoE: pre-norm Llama-style blocks whose query and key RMSNorms span each whole projection
(all heads at once, as OLMo 2's), with a mixture of experts in every block: a router
(``mlp.gate``, top-k of a softmax, renormalised when ``norm_topk_prob``) and fused 3-D experts
(``mlp.experts.gate_up_proj`` (E, 2·I, H) rows [gate | up], ``down_proj`` (E, H, I)). Not yet exported."""

from __future__ import annotations

from dataclasses import replace

from lmpress.arch.families.llama import LLAMA
from lmpress.arch.families.qwen3_moe import moe_spec
from lmpress.arch.spec import Experts, Norm

OLMOE = moe_spec(
    replace(
        LLAMA,
        norms=(
            *LLAMA.norms[:2],
            Norm("self_attn.q_norm", "attn_q_norm", "rmsnorm"),
            Norm("self_attn.k_norm", "attn_k_norm", "rmsnorm"),
        ),
        qk_norm="projection",
    ),
    ("olmoe",),
    Experts("mlp.experts", "mlp.gate", count_key="num_experts"),
    False,
    "intermediate_size",
)

SPECS = (OLMOE,)
