"""Mixtral: Mistral's attention (grouped-query, sliding window in the config) with a mixture of
experts in every block: a router (``mlp.gate``, softmax then top-k, always renormalised) and the
experts as fused 3-D parameters (``mlp.experts.gate_up_proj`` (E, 2·I, H) rows [gate | up],
``down_proj`` (E, H, I)), ``num_local_experts`` of them. Not yet exported."""

from __future__ import annotations

from lmpress.arch.families.llama import LLAMA
from lmpress.arch.families.qwen3_moe import moe_spec
from lmpress.arch.spec import Experts

MIXTRAL = moe_spec(
    LLAMA,
    ("mixtral",),
    Experts("mlp.experts", "mlp.gate", count_key="num_local_experts"),
    False,
    "intermediate_size",
)

SPECS = (MIXTRAL,)
