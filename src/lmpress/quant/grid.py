"""Choosing an integer grid for a weight matrix: the min/max range or an MSE-clipped one, per
group, and round-to-nearest on it. The grid's encoding (codes, scales, zero points, dequantization)
is storage math: `lmpress.formats.grid`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmpress.formats.grid import Quantized, check_bits, dequantize, n_groups, quantize_with


def grid_params(lo: Tensor, hi: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Scale and zero point of the grid that covers [lo, hi] (both contain 0).  -> (scale, zero)"""
    if symmetric:
        half = 2 ** (bits - 1)
        amax = torch.maximum(-lo, hi)
        scale = (amax / (half - 1 if bits > 1 else 1)).clamp(min=1e-10)
        return scale, torch.full_like(scale, half)
    qmax = 2**bits - 1
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = ((hi - lo) / qmax).clamp(min=1e-10)
    return scale, (-lo / scale).round().clamp(0, qmax)


def group_minmax(w: Tensor, group_size: int | None) -> tuple[Tensor, Tensor]:
    """Per-group min and max of (out, in), ignoring the padding of a short last group.  -> (out, G) x2"""
    out_f, in_f = w.shape
    g = in_f if group_size is None else group_size
    G = n_groups(in_f, group_size)
    pad = G * g - in_f
    big = torch.finfo(torch.float32).max
    lo = torch.nn.functional.pad(w, (0, pad), value=big).view(out_f, G, g).amin(-1)
    hi = torch.nn.functional.pad(w, (0, pad), value=-big).view(out_f, G, g).amax(-1)
    return lo, hi


def clip_search(
    w: Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    grid: int = 20,
    max_shrink: float = 0.5,
    col_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """MSE-optimal clipping: per group, shrink the range by the factor in [1-max_shrink, 1] that
    minimizes the squared rounding error, each column weighted by ``col_weights`` (in,) if given
    (e.g. E[x_j²], making it the output error under a diagonal input covariance).  -> (scale, zero)"""
    lo, hi = group_minmax(w, group_size)
    best_err = torch.full_like(lo, float("inf"))
    best_s, best_z = grid_params(lo, hi, bits, symmetric)
    for i in range(grid + 1):
        f = 1.0 - max_shrink * i / grid
        s, z = grid_params(lo * f, hi * f, bits, symmetric)
        deq = dequantize(quantize_with(w, s, z, bits, group_size), s, z, group_size)
        sq = (deq - w).pow(2)
        err = _group_sum(sq if col_weights is None else sq * col_weights[None, :], group_size)  # (out, G)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    return best_s, best_z


def _group_sum(x: Tensor, group_size: int | None) -> Tensor:
    out_f, in_f = x.shape
    g = in_f if group_size is None else group_size
    G = n_groups(in_f, group_size)
    return torch.nn.functional.pad(x, (0, G * g - in_f)).view(out_f, G, g).sum(-1)


def find_grid(
    w: Tensor, bits: int, group_size: int | None, symmetric: bool, mse_clip: bool = False
) -> tuple[Tensor, Tensor]:
    """Per-group scale and zero of (out, in) ``w``: min/max range, or MSE-clipped.  -> (out, G) x2"""
    if mse_clip:
        return clip_search(w, bits, group_size, symmetric)
    return grid_params(*group_minmax(w, group_size), bits, symmetric)


def quantize(
    w: Tensor, bits: int, group_size: int | None = 128, symmetric: bool = False, mse_clip: bool = False
) -> Quantized:
    """Round-to-nearest quantization of (out, in) ``w``, min/max or MSE-clipped range per group."""
    check_bits(bits)
    if group_size is not None and group_size <= 0:
        raise ValueError(f"group_size must be positive or None, got {group_size}")
    wf = w.float()
    scales, zeros = find_grid(wf, bits, group_size, symmetric, mse_clip)
    return Quantized(quantize_with(wf, scales, zeros, bits, group_size), scales, zeros, bits, group_size)


def fake_quantize(w: Tensor, bits: int, group_size: int | None = 128, symmetric: bool = False) -> Tensor:
    """Quantize and dequantize ``w`` (out, in); returns the same shape and dtype."""
    return quantize(w, bits, group_size, symmetric).dequantize(w.dtype)
