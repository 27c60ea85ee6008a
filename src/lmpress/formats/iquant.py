"""Lattice codes of llama.cpp's IQ3_S, IQ3_XXS and IQ2 types: weight magnitudes on a codebook.

IQ3_S stores each group of 4 weights as one index into ``iq3s_grid`` (points whose coordinates are
odd values 1..15) plus a free sign bit per weight; IQ2_XXS and IQ2_XS each group of 8 as an index
into ``iq2xxs_grid`` / ``iq2xs_grid`` (coordinates 8, 25, 43) plus 7 sign bits, the 8th sign
making the number of minus signs even (llama.cpp's ``ksigns_iq2xs``); IQ2_S into ``iq2s_grid``
with 8 free sign bits; IQ3_XXS each group of 4 into ``iq3xxs_grid`` with the IQ2 signs. The
codebooks are `lmpress.formats.iquant_grids`.

lmpress keeps one code per weight, ``k | sign << 3`` with the magnitude ``values[k]``, so a block's
codes have the same (rows, n) shape as every other GGML type's; a valid block's groups are
codebook points (`grid_indices` finds their indices when the bytes are written).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lmpress.formats.iquant_grids import iq2s_grid, iq2xs_grid, iq2xxs_grid, iq3s_grid, iq3xxs_grid

CHUNK = 1 << 15  # groups per nearest-point search (a (CHUNK, points) distance table)


@dataclass(frozen=True)
class Lattice:
    """One i-quant codebook: ``group`` weights per point, magnitudes ``values[k]``."""

    name: str
    group: int
    values: tuple[float, ...]
    even_signs: bool  # IQ2_XXS/XS, IQ3_XXS: each 8 weights' minus signs are even in number (7 stored bits)
    scale_mul: float  # S = d * (scale_mul * sc + scale_add), sc in 0..15
    scale_add: float
    step: float  # scale search: the largest magnitude on values[-1] * (1 + step * i)
    steps: int

    def grid(self) -> Tensor:
        """(points, group) uint8 magnitude indices."""
        grids = {"iq3_s": iq3s_grid, "iq3_xxs": iq3xxs_grid, "iq2_xxs": iq2xxs_grid, "iq2_xs": iq2xs_grid}
        grids["iq2_s"] = iq2s_grid
        return grids[self.name]()

    def scale(self, d: Tensor, sc: Tensor) -> Tensor:
        """Sub-block scales from float32 d and integer sc, in llama.cpp's float order."""
        if self.name == "iq3_s":
            return d * (1 + 2 * sc).float()
        return d * (0.5 + sc.float()) * self.scale_mul  # 0.25 (IQ2) or 0.5 (IQ3_XXS)


LATTICES = {
    "iq3_s": Lattice("iq3_s", 4, tuple(float(2 * k + 1) for k in range(8)), False, 2.0, 1.0, 0.2 / 15, 9),
    "iq2_xxs": Lattice("iq2_xxs", 8, (8.0, 25.0, 43.0), True, 0.25, 0.125, 0.04, 10),
    "iq2_xs": Lattice("iq2_xs", 8, (8.0, 25.0, 43.0), True, 0.25, 0.125, 0.04, 10),
    "iq2_s": Lattice("iq2_s", 8, (8.0, 25.0, 43.0), False, 0.25, 0.125, 0.04, 10),
    "iq3_xxs": Lattice("iq3_xxs", 4, (4.0, 12.0, 20.0, 28.0, 36.0, 44.0, 52.0, 62.0), True, 0.5, 0.25, 0.02, 10),
}


def lattice_values(codes: Tensor, lat: Lattice) -> tuple[Tensor, Tensor]:
    """Float magnitudes and signs ±1 of per-weight codes ``k | sign << 3``.  -> same shape x2"""
    values = torch.tensor(lat.values, device=codes.device)
    return values[(codes & 7).long()], 1 - 2 * ((codes >> 3) & 1).float()


def _keys(k: Tensor, base: int) -> Tensor:
    """(..., group) magnitude indices -> (...,) key in 0..base**group - 1."""
    weights = base ** torch.arange(k.shape[-1] - 1, -1, -1, device=k.device, dtype=torch.int64)
    return (k.long() * weights).sum(-1)


def grid_indices(codes: Tensor, lat: Lattice) -> Tensor:
    """Codebook index of each group of codes; a group off the codebook is an error.  (N, m) -> (N, m/group) int64"""
    grid, base = lat.grid().to(codes.device), len(lat.values)
    lookup = torch.full((base**lat.group,), -1, dtype=torch.int64, device=codes.device)
    lookup[_keys(grid, base)] = torch.arange(grid.shape[0], device=codes.device)
    idx = lookup[_keys((codes & 7).reshape(codes.shape[0], -1, lat.group), base)]
    if bool((idx < 0).any()):
        raise ValueError(f"{lat.name} codes hold a group of magnitudes that is no point of its codebook")
    return idx


def codes_from_indices(idx: Tensor, sign_bits: Tensor, lat: Lattice) -> Tensor:
    """Per-weight codes from codebook indices (N, g) and sign bits (N, g*group) in {0, 1}.  -> (N, g*group) uint8"""
    k = lat.grid().to(idx.device)[idx].reshape(idx.shape[0], -1)
    return k | (sign_bits.to(torch.uint8) << 3)


def cell_points(lat: Lattice) -> Tensor:
    """For each combination of per-weight magnitudes (by key), the index of the nearest codebook
    point: the quick assignment a scale search scores candidates with.  -> (base**group,) int64"""
    values = torch.tensor(lat.values)
    k = torch.cartesian_prod(*[torch.arange(len(lat.values))] * lat.group)  # (cells, group) in key order
    return torch.cdist(values[k], values[lat.grid().long()]).argmin(-1)


def _even(neg: Tensor, cost: Tensor, group: int = 8) -> Tensor:
    """Signs with an even number of minus per ``group`` weights: where odd, the weight whose flip
    costs least (``cost``: w |x| magnitude) changes sign.  (N, m) bool -> (N, m) bool"""
    n, m = neg.shape
    g_neg, g_cost = neg.view(n, -1, group), cost.view(n, -1, group)
    odd = g_neg.sum(-1, keepdim=True) % 2 == 1  # (n, m/group, 1)
    flip = torch.zeros_like(g_neg).scatter_(-1, g_cost.argmin(-1, keepdim=True), True) & odd
    return (g_neg ^ flip).view(n, m)


def quick_codes(x: Tensor, s: Tensor, cells: Tensor, lat: Lattice) -> Tensor:
    """Codes of (N, m) ``x`` under scales s (N,): each magnitude on its nearest value, each group
    moved to the codebook point nearest that (``cells``, `cell_points`).  -> (N, m) uint8"""
    values = torch.tensor(lat.values, device=x.device)
    safe = torch.where(s > 0, s, torch.ones_like(s))[:, None]
    k = torch.bucketize((x.abs() / safe).contiguous(), (values[1:] + values[:-1]) / 2)  # (N, m)
    idx = cells.to(x.device)[_keys(k.view(x.shape[0], -1, lat.group), len(lat.values))]
    neg = x < 0
    if lat.even_signs:
        neg = _even(neg, x.abs() * values[lat.grid().to(x.device)[idx].long()].view_as(x))
    return codes_from_indices(idx, neg, lat)


def lattice_codes(x: Tensor, S: Tensor, lat: Lattice, weights: Tensor | None = None, sub: int = 32) -> Tensor:
    """Nearest codes for (rows, n) ``x`` under per-``sub``-weight scales S (rows, n/sub) >= 0: for
    each group the codebook point p minimizing Σ w (|x| - S p)² (``weights`` (rows, n), default 1),
    each weight's own sign (IQ2_XXS: made even by flipping the cheapest).  -> (rows, n) uint8"""
    rows, n = x.shape
    g = lat.group
    ax = x.abs().reshape(-1, g)  # (G, group)
    w = torch.ones_like(ax) if weights is None else weights.reshape(-1, g).float()
    s = S.float().repeat_interleave(sub // g, dim=1).reshape(-1, 1)  # (G, 1) the group's scale
    values = torch.tensor(lat.values, device=x.device)
    p = values[lat.grid().to(x.device).long()]  # (points, group)
    points = torch.cat([p * p, -2 * p], dim=1).T  # (2 group, points)
    idx = torch.empty(ax.shape[0], dtype=torch.int64, device=x.device)
    for lo in range(0, ax.shape[0], CHUNK):
        a, ww, ss = ax[lo : lo + CHUNK], w[lo : lo + CHUNK], s[lo : lo + CHUNK]
        # Σ w (a - s p)² = Σ w a² + s (s Σ w p² - 2 Σ (w a) p): for s > 0 the bracket ranks the points
        idx[lo : lo + CHUNK] = (torch.cat([ww * ss, ww * a], dim=1) @ points).argmin(-1)
    neg = (x < 0).view(rows, n)
    if lat.even_signs:
        neg = _even(neg, (w * ax * p[idx]).view(rows, n))
    return codes_from_indices(idx.view(rows, -1), neg, lat)
