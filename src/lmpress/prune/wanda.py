"""``wanda``: prune by |W|·‖x‖, weight magnitude times the input's norm, with no weight update
(Sun et al. 2023, arXiv:2306.11695).

A weight matters as much as it moves the output: |W_ij| scaled by the root mean square of input
feature j over the calibration tokens. Weights compete within their output row (the paper's
choice), or within groups of M for N:M.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from lmpress.arch import linear_weight
from lmpress.calib import SquareNorm
from lmpress.method import Context, Method, StageReport
from lmpress.prune.base import PruneConfig, Pruned, prune_model
from lmpress.prune.masks import mask_from_scores, parse_pattern


class WandaConfig(PruneConfig):
    """Wanda pruning (Sun et al. 2023)."""

    method: Literal["wanda"] = "wanda"


def apply(model: nn.Module, config: WandaConfig, ctx: Context) -> StageReport:
    nm = parse_pattern(config.pattern)

    def fn(name: str, module: nn.Module, stats: SquareNorm | None, sparsity: float) -> Pruned:
        w = linear_weight(module).detach().float()
        # a targeted layer outside the blocks (the head) has no block inputs: magnitude
        scores = w.abs() if stats is None else w.abs() * stats.mean_sq.sqrt()[None, :]
        return Pruned(w, mask_from_scores(scores, sparsity, nm, per_row=True))

    def make_stats(m: nn.Module) -> SquareNorm:
        return SquareNorm.empty(linear_weight(m).shape[1], linear_weight(m).device)

    return prune_model(model, config, ctx, fn, make_stats)


METHOD = Method("wanda", WandaConfig, apply, "Wanda: prune by |weight| x input norm, unstructured or N:M")
