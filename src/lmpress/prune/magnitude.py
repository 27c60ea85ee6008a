"""``magnitude``: remove the weights of smallest absolute value, the calibration-free baseline.

Unstructured masks compare all weights of a layer (or, with ``allocation: global``, of the whole
model); N:M masks keep the N largest of every M consecutive input weights of a row.
"""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from lmpress.arch import linear_weight
from lmpress.method import Context, Method, StageReport
from lmpress.prune.base import PruneConfig, Pruned, prune_model
from lmpress.prune.masks import mask_from_scores, parse_pattern


class MagnitudeConfig(PruneConfig):
    """Magnitude pruning."""

    method: Literal["magnitude"] = "magnitude"


def apply(model: nn.Module, config: MagnitudeConfig, ctx: Context) -> StageReport:
    nm = parse_pattern(config.pattern)

    def fn(name: str, module: nn.Module, stats: Any, sparsity: float) -> Pruned:
        w = linear_weight(module).detach().float()
        return Pruned(w, mask_from_scores(w.abs(), sparsity, nm, per_row=False))

    if config.allocation == "owl":  # OWL measures outliers on calibration data first
        ctx.calib_data()
    return prune_model(model, config, ctx, fn)


METHOD = Method("magnitude", MagnitudeConfig, apply, "magnitude pruning: unstructured or N:M, no data")
