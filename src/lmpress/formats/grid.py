"""Integer quantization grids: how codes, scales and zero points encode a weight matrix.

Asymmetric (integer zero point) and symmetric grids, 2..8 bits, per output channel or per group of
``group_size`` input columns. A width that is not a multiple of the group size gets a shorter last
group rather than an error. Codes are unsigned: a symmetric grid stores ``q + 2**(bits-1)`` with
the zero point fixed at ``2**(bits-1)``, so every format dequantizes as ``(code - zero) * scale``.
Choosing a grid for a weight matrix (min/max, MSE clipping) is a method: `lmpress.quant.grid`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Quantized:
    """Integer codes of one weight matrix with their per-group scales and zero points."""

    codes: Tensor  # (out, in) uint8, values < 2**bits
    scales: Tensor  # (out, groups) float32
    zeros: Tensor  # (out, groups) float32 integer-valued; 2**(bits-1) everywhere when symmetric
    bits: int
    group_size: int | None  # None: one group per row

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize(self.codes, self.scales, self.zeros, self.group_size, dtype)


def check_bits(bits: int) -> None:
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be 2..8, got {bits}")


def n_groups(in_features: int, group_size: int | None) -> int:
    return 1 if group_size is None else -(-in_features // group_size)


def expand_groups(t: Tensor, in_features: int, group_size: int | None) -> Tensor:
    """(out, groups) -> (out, in): each group's value repeated over its columns."""
    if group_size is None:
        return t.expand(t.shape[0], in_features)
    return t.repeat_interleave(group_size, dim=1)[:, :in_features]


def quantize_with(w: Tensor, scales: Tensor, zeros: Tensor, bits: int, group_size: int | None) -> Tensor:
    """Codes of (out, in) ``w`` on a given grid.  -> (out, in) uint8"""
    in_f = w.shape[1]
    s = expand_groups(scales, in_f, group_size)
    z = expand_groups(zeros, in_f, group_size)
    return (w.float() / s + z).round().clamp(0, 2**bits - 1).to(torch.uint8)


def dequantize(
    codes: Tensor, scales: Tensor, zeros: Tensor, group_size: int | None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """(code - zero) * scale, per group.  -> (out, in) ``dtype``"""
    out_f, in_f = codes.shape
    if group_size is None or in_f % group_size == 0:  # whole groups: broadcast, no expanded copies
        g = in_f if group_size is None else group_size
        c = codes.view(out_f, in_f // g, g).float()
        return ((c - zeros.float()[..., None]) * scales.float()[..., None]).view(out_f, in_f).to(dtype)
    s = expand_groups(scales.float(), in_f, group_size)
    z = expand_groups(zeros.float(), in_f, group_size)
    return ((codes.float() - z) * s).to(dtype)
