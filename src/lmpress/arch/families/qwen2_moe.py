"""Qwen2-MoE: Qwen2's attention (q/k/v biases, grouped-query) with a mixture of experts beside a
shared expert: the router (``mlp.gate``, top-k of a softmax, renormalised when ``norm_topk_prob``)
sends each token to its experts (fused 3-D ``mlp.experts.gate_up_proj`` (E, 2·I, H) rows
[gate | up], ``down_proj`` (E, H, I)), and every token also goes through the shared expert
(``mlp.shared_expert``, a dense gated MLP) scaled by ``sigmoid(mlp.shared_expert_gate(x))``, a
one-output linear kept in float like the router. Layers in ``mlp_only_layers`` (or off the
``decoder_sparse_step``) keep a dense MLP. Not yet exported."""

from __future__ import annotations

from lmpress.arch.families.llama import QWEN2
from lmpress.arch.families.qwen3_moe import moe_spec
from lmpress.arch.spec import Experts

SHARED = {
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp",
}
QWEN2_MOE = moe_spec(
    QWEN2,
    ("qwen2_moe",),
    Experts("mlp.experts", "mlp.gate", shared=SHARED, shared_gate="mlp.shared_expert_gate"),
    True,
    "moe_intermediate_size",
)

SPECS = (QWEN2_MOE,)
