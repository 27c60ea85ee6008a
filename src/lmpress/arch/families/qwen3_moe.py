"""Qwen3-MoE: Qwen3's attention (per-head query/key RMSNorms, grouped-query) with a mixture of
experts in place of the MLP: a router (``mlp.gate``, top-k of a softmax, renormalised when
``norm_topk_prob``) and the experts as fused 3-D parameters (``mlp.experts.gate_up_proj``
(E, 2·I, H) rows [gate | up], ``mlp.experts.down_proj`` (E, H, I)). Layers listed in
``mlp_only_layers`` (or off the ``decoder_sparse_step``) keep a dense MLP. Not yet exported.
"""

from __future__ import annotations

from dataclasses import replace

from lmpress.arch.families.llama import QWEN3
from lmpress.arch.spec import Experts, Spec


def moe_spec(base: Spec, model_types: tuple[str, ...], experts: Experts, dense_mlp: bool, width_key: str) -> Spec:
    """``base`` (a dense family) with its MLP replaced by ``experts``; ``dense_mlp``: some blocks
    may keep the dense MLP (optional linears). The norm in front of the MoE feeds the router and
    the experts, no linear: its scale group is dropped."""
    attention = {p: r for p, r in base.linears.items() if not p.startswith("mlp.")}
    mlp = {p: r for p, r in base.linears.items() if p.startswith("mlp.")} if dense_mlp else {}
    groups = tuple(g for g in base.scale_groups if not g[1][0].startswith("mlp.") or dense_mlp)
    return replace(
        base,
        model_types=model_types,
        linears={**attention, **mlp},
        optional_linears=tuple(mlp),
        scale_groups=groups,
        experts=experts,
        mlp_width_key=width_key,
        gguf=None,
        onnx=None,
    )


QWEN3_MOE = moe_spec(QWEN3, ("qwen3_moe",), Experts("mlp.experts", "mlp.gate"), True, "moe_intermediate_size")

SPECS = (QWEN3_MOE,)
