"""Lattice codes of llama.cpp's IQ3_S: groups of 4 weight magnitudes on a 512-point codebook.

IQ3_S stores each group of 4 weights as one index into ``iq3s_grid`` (`lmpress.formats.iquant_grids`:
points whose coordinates are odd values 1..15) plus a free sign bit per weight, under a per-32-weight
scale. lmpress keeps one code per weight, ``k | sign << 3`` with the magnitude 2k+1, so a block's
codes have the same (rows, n) shape as every other GGML type's; a valid block's 4-magnitude groups
are codebook points, and `grid_indices` finds their indices when the bytes are written.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmpress.formats.iquant_grids import iq3s_grid

GROUP = 4  # weights per codebook point
CHUNK = 1 << 16  # groups per nearest-point search (a (CHUNK, 512) distance table)


def lattice_values(codes: Tensor) -> tuple[Tensor, Tensor]:
    """Float magnitudes 2k+1 and signs ±1 of per-weight codes ``k | sign << 3``.  -> same shape x2"""
    mag = (2 * (codes & 7).float()) + 1
    sgn = 1 - 2 * ((codes >> 3) & 1).float()
    return mag, sgn


def _keys(k: Tensor) -> Tensor:
    """(..., 4) magnitude indices 0..7 -> (...,) key in 0..4095."""
    weights = torch.tensor([512, 64, 8, 1], device=k.device, dtype=torch.int64)
    return (k.long() * weights).sum(-1)


def grid_indices(codes: Tensor) -> Tensor:
    """Codebook index of each group of 4 codes; a group off the codebook is an error.  (N, 4g) -> (N, g) int64"""
    grid = iq3s_grid().to(codes.device)
    lookup = torch.full((4096,), -1, dtype=torch.int64, device=codes.device)
    lookup[_keys(grid)] = torch.arange(grid.shape[0], device=codes.device)
    idx = lookup[_keys((codes & 7).reshape(codes.shape[0], -1, GROUP))]
    if bool((idx < 0).any()):
        raise ValueError("iq3_s codes hold a group of 4 magnitudes that is no point of iq3s_grid")
    return idx


def codes_from_indices(idx: Tensor, sign_bits: Tensor) -> Tensor:
    """Per-weight codes from codebook indices (N, g) and sign bits (N, 4g) in {0, 1}.  -> (N, 4g) uint8"""
    k = iq3s_grid().to(idx.device)[idx].reshape(idx.shape[0], -1)  # (N, 4g)
    return k | (sign_bits.to(torch.uint8) << 3)


def cell_points() -> Tensor:
    """For each of the 8^4 points with odd coordinates 1..15 (key of its k's), the index of the
    nearest codebook point: the quick assignment a scale search scores candidates with.  -> (4096,) int64"""
    k = torch.cartesian_prod(*[torch.arange(8)] * GROUP)  # (4096, 4) in key order
    grid = iq3s_grid().float()
    return torch.cdist(2 * k.float() + 1, 2 * grid + 1).argmin(-1)


def quick_codes(x: Tensor, s: Tensor, cells: Tensor) -> Tensor:
    """Codes of (N, g) ``x`` under scales s (N,): each magnitude rounded to the nearest odd value,
    each group of 4 moved to the codebook point nearest that (``cells``, `cell_points`).  -> (N, g) uint8"""
    safe = torch.where(s > 0, s, torch.ones_like(s))[:, None]
    k = ((x.abs() / safe - 1) / 2).round().clamp(0, 7).to(torch.uint8)  # (N, g)
    idx = cells.to(x.device)[_keys(k.view(x.shape[0], -1, GROUP))]
    return codes_from_indices(idx, x < 0)


def lattice_codes(x: Tensor, S: Tensor, weights: Tensor | None = None, sub: int = 32) -> Tensor:
    """Nearest codes for (rows, n) ``x`` under per-``sub``-weight scales S (rows, n/sub) >= 0: each
    weight's sign, and for each group of 4 magnitudes the codebook point p minimizing
    Σ w (|x| - S p)² (``weights`` (rows, n), default 1).  -> (rows, n) uint8"""
    rows, n = x.shape
    ax = x.abs().reshape(-1, GROUP)  # (G, 4)
    w = torch.ones_like(ax) if weights is None else weights.reshape(-1, GROUP).float()
    s = S.float().repeat_interleave(sub // GROUP, dim=1).reshape(-1)  # (G,) the group's scale
    grid = 2 * iq3s_grid().to(x.device).float() + 1  # (512, 4)
    points = torch.cat([grid * grid, -2 * grid], dim=1).T  # (8, 512)
    idx = torch.empty(ax.shape[0], dtype=torch.int64, device=x.device)
    for lo in range(0, ax.shape[0], CHUNK):
        a, ww, ss = ax[lo : lo + CHUNK], w[lo : lo + CHUNK], s[lo : lo + CHUNK, None]
        # Σ w (a - s p)² = Σ w a² + s (s Σ w p² - 2 Σ (w a) p): for s > 0 the bracket ranks the points
        idx[lo : lo + CHUNK] = (torch.cat([ww * ss, ww * a], dim=1) @ points).argmin(-1)  # (chunk, 512) -> (chunk,)
    return codes_from_indices(idx.view(rows, -1), (x < 0).view(rows, n))
