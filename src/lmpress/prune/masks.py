"""The mask library every pruning method shares: which weights to keep, given their scores.

A mask is a bool tensor shaped like the weight, True where the weight is kept. Scores are "higher
is more important": |W| for magnitude, |W|·‖x‖ for Wanda, w²/[H⁻¹]ₖₖ² for SparseGPT.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from lmpress.errors import LmpressError


class PruneError(LmpressError):
    """A pruning step that cannot be carried out as asked."""


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> None; ``"2:4"`` -> (2, 4): keep N of every M consecutive input weights."""
    if pattern == "unstructured":
        return None
    m = re.fullmatch(r"(\d+):(\d+)", pattern)
    if not m or not 0 < int(m[1]) < int(m[2]):
        raise ValueError(f"pattern must be 'unstructured' or 'N:M' with 0 < N < M (e.g. '2:4'), got {pattern!r}")
    return int(m[1]), int(m[2])


def check_sparsity(sparsity: float) -> None:
    if not 0 <= sparsity < 1:
        raise PruneError(f"sparsity must be in [0, 1), got {sparsity}")


def check_nm(name: str, in_features: int, nm: tuple[int, int]) -> None:
    if in_features % nm[1]:
        raise PruneError(
            f"layer {name}: input width {in_features} is not a multiple of M={nm[1]} for the {nm[0]}:{nm[1]} "
            "pattern; exclude it with ignore or use another pattern"
        )


def n_pruned(n: int, sparsity: float) -> int:
    """How many of ``n`` weights a sparsity removes (rounded to nearest)."""
    return round(n * sparsity)


def topk_mask(scores: Tensor, sparsity: float, per_row: bool = True) -> Tensor:
    """Keep the highest scores: per output row (each row at ``sparsity``), or over the whole matrix."""
    if sparsity <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    flat = scores.float() if per_row else scores.float().reshape(1, -1)
    k = n_pruned(flat.shape[1], sparsity)
    mask = torch.ones_like(flat, dtype=torch.bool)
    if k:
        drop = torch.topk(flat, k, dim=1, largest=False).indices
        mask.scatter_(1, drop, False)
    return mask.view_as(scores)


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """Keep the ``n`` highest of every ``m`` consecutive scores along each row.  (out, in) bool"""
    out_f, in_f = scores.shape
    groups = scores.float().reshape(out_f, in_f // m, m)
    keep = torch.topk(groups, n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.view(out_f, in_f)


def mask_from_scores(scores: Tensor, sparsity: float, nm: tuple[int, int] | None, per_row: bool = True) -> Tensor:
    """The mask for one layer: N:M when ``nm`` is given, else unstructured at ``sparsity``."""
    return nm_mask(scores, *nm) if nm is not None else topk_mask(scores, sparsity, per_row)


def global_threshold(scores: list[Tensor], sparsity: float) -> float:
    """The score below which ``sparsity`` of all given scores fall (one threshold for the whole model)."""
    flat = torch.cat([s.float().reshape(-1) for s in scores])
    k = n_pruned(flat.numel(), sparsity)
    if k == 0:
        return float("-inf")
    return float(torch.kthvalue(flat, k).values)


def outlier_ratio(scores: Tensor, m: float) -> float:
    """Share of scores above ``m`` times their mean (OWL's layer outlier distribution)."""
    s = scores.float()
    return float((s > m * s.mean()).float().mean())


def owl_sparsities(ratios: list[float], sizes: list[int], target: float, lam: float) -> list[float]:
    """Outlier-weighted layer-wise sparsity (Yin et al. 2023, arXiv:2310.05175): layers with more
    outliers keep more weights. Sparsities span ``target ± lam`` and their size-weighted mean is
    ``target``, so the whole model loses exactly the requested share."""
    r = torch.tensor(ratios, dtype=torch.float64)
    w = torch.tensor(sizes, dtype=torch.float64)
    span = r.max() - r.min()
    norm = (r - r.min()) / span if span > 0 else torch.zeros_like(r)
    s = target + lam * (1 - 2 * norm)  # most outliers -> target - lam
    s = s - ((s * w).sum() / w.sum() - target)  # size-weighted mean exactly the target
    return [float(x) for x in s.clamp(0.0, 0.99)]
