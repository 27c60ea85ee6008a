"""Integer quantization grids: the pure tensor math every weight quantizer builds on.

Asymmetric (min/max, integer zero point) and symmetric grids, 2..8 bits, per output channel or per
group of ``group_size`` input columns. A width that is not a multiple of the group size gets a
shorter last group rather than an error.
"""

from __future__ import annotations

import torch
from torch import Tensor


def group_view(w: Tensor, group_size: int | None) -> tuple[Tensor, int]:
    """Pad (out, in) with zeros to a whole number of groups; returns ((out, groups, g), in)."""
    out_f, in_f = w.shape
    g = in_f if group_size is None else min(group_size, in_f)
    n_groups = -(-in_f // g)
    pad = n_groups * g - in_f
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(out_f, n_groups, g), in_f


def fake_quantize(w: Tensor, bits: int, group_size: int | None = 128, symmetric: bool = False) -> Tensor:
    """Round-to-nearest quantize and dequantize ``w`` (out, in); returns the same shape and dtype.

    Padding columns of a short last group are excluded from its min/max.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be 2..8, got {bits}")
    wf = w.float()
    groups, in_f = group_view(wf, group_size)  # (out, G, g)
    out_f, n_groups, g = groups.shape
    valid = torch.ones(n_groups * g, dtype=torch.bool, device=w.device)
    valid[in_f:] = False
    valid = valid.view(1, n_groups, g)
    big = torch.finfo(torch.float32).max
    if symmetric:
        amax = groups.abs().masked_fill(~valid, 0).amax(-1, keepdim=True)
        qmax = 2 ** (bits - 1) - 1
        scale = (amax / qmax).clamp(min=1e-10)
        q = (groups / scale).round().clamp(-qmax - 1, qmax)
        deq = q * scale
    else:
        lo = groups.masked_fill(~valid, big).amin(-1, keepdim=True).clamp(max=0)
        hi = groups.masked_fill(~valid, -big).amax(-1, keepdim=True).clamp(min=0)
        qmax = 2**bits - 1
        scale = ((hi - lo) / qmax).clamp(min=1e-10)
        zero = (-lo / scale).round()
        q = (groups / scale + zero).round().clamp(0, qmax)
        deq = (q - zero) * scale
    return deq.reshape(out_f, n_groups * g)[:, :in_f].to(w.dtype)
