"""Fitting a GGML block type's grid to a weight matrix: importance-weighted least squares over
candidate scales (the approach of llama.cpp's ``make_qkx2_quants``, written here from the format's
definition), then the scales stored the type's way (`lmpress.formats.ggml.from_sub_grid`).
The non-uniform types (IQ4_NL, IQ4_XS) search their block scales the way llama.cpp's
``quantize_row_iq4_nl_impl`` does: the largest weight on the table's end value and nearby
steps, each scored by the weighted least-squares fit given its nearest-value codes. IQ3_S's
and IQ2_XXS lattices the same way, after ``quantize_row_iq3_s_impl``: the largest magnitude on
the codebook's largest value and nearby, each group of magnitudes on its weighted-nearest point.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmpress.formats.ggml import (
    TABLE,
    GGMLBlocks,
    GGMLType,
    check_width,
    from_sub_grid,
    ggml_type,
    nearest_in_table,
    sub_scales,
)
from lmpress.formats.iquant import LATTICES, Lattice, cell_points, lattice_codes, lattice_values, quick_codes


def _fit_affine(
    x: Tensor, wt: Tensor, qmax: int, steps: int = 20, min_at_most_zero: bool = True
) -> tuple[Tensor, Tensor]:
    """Per row of (N, g) ``x``: scale s and min m (x ≈ s*u + m, u in [0, qmax]) minimizing the
    ``wt``-weighted squared error, over candidate scales around (max-min)/qmax, each refit by
    weighted least squares given its codes.  -> (N,) x2. ``min_at_most_zero``: m <= 0, as the
    k-quants require (Q4_1/Q5_1 store any float min)."""
    lo = x.amin(-1).clamp(max=0) if min_at_most_zero else x.amin(-1)
    hi = x.amax(-1)
    rng = (hi - lo).clamp(min=1e-20)
    best_s, best_m = rng / qmax, lo
    best_err = _affine_err(x, wt, best_s, best_m, qmax)
    sw = wt.sum(-1)
    for i in range(steps + 1):
        iscale = (qmax - 1 + 0.1 * i) / rng  # candidates around qmax / range
        u = ((x - lo[:, None]) * iscale[:, None]).round().clamp(0, qmax)
        # weighted least squares for x ≈ s*u + m
        su = (wt * u).sum(-1)
        suu = (wt * u * u).sum(-1)
        sx = (wt * x).sum(-1)
        sux = (wt * u * x).sum(-1)
        det = sw * suu - su * su
        ok = det > 0
        s = torch.where(ok, (sw * sux - su * sx) / torch.where(ok, det, 1), best_s)
        m = torch.where(ok, (suu * sx - su * sux) / torch.where(ok, det, 1), best_m)
        if min_at_most_zero:  # a min above zero: refit the scale with m = 0
            pos = m > 0
            s = torch.where(pos, sux / suu.clamp(min=1e-30), s)
            m = torch.where(pos, torch.zeros_like(m), m)
        err = _affine_err(x, wt, s, m, qmax)
        better = (err < best_err) & (s > 0)
        best_err = torch.where(better, err, best_err)
        best_s, best_m = torch.where(better, s, best_s), torch.where(better, m, best_m)
    return best_s, best_m


def _affine_err(x: Tensor, wt: Tensor, s: Tensor, m: Tensor, qmax: int) -> Tensor:
    safe = torch.where(s > 0, s, torch.ones_like(s))
    u = ((x - m[:, None]) / safe[:, None]).round().clamp(0, qmax)
    return (wt * (s[:, None] * u + m[:, None] - x).pow(2)).sum(-1)


def _fit_symmetric(x: Tensor, wt: Tensor, offset: int, steps: int = 18) -> Tensor:
    """Per row of (N, g) ``x``: signed scale s (x ≈ s*q, q in [-offset, offset-1]) minimizing the
    weighted squared error; candidates put the largest magnitude at -offset (either sign) and
    nearby levels, each refit by least squares given its codes.  -> (N,)"""
    idx = x.abs().argmax(-1, keepdim=True)
    amax = x.gather(-1, idx).squeeze(-1)  # signed value of largest magnitude
    best_s = amax / -offset
    best_err = _sym_err(x, wt, best_s, offset)
    for i in range(steps + 1):
        level = -offset + (i - steps / 2) * 0.1  # around -offset
        if abs(level) < 0.5:
            continue
        iscale = level / torch.where(amax == 0, torch.ones_like(amax), amax)
        q = (x * iscale[:, None]).round().clamp(-offset, offset - 1)
        sqq = (wt * q * q).sum(-1)
        s = (wt * q * x).sum(-1) / sqq.clamp(min=1e-30)
        err = _sym_err(x, wt, s, offset)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
    return best_s


def _sym_err(x: Tensor, wt: Tensor, s: Tensor, offset: int) -> Tensor:
    safe = torch.where(s == 0, torch.ones_like(s), s)
    q = (x / safe[:, None]).round().clamp(-offset, offset - 1)
    return (wt * (s[:, None] * q - x).pow(2)).sum(-1)


def _fit_table(x: Tensor, wt: Tensor, steps: int = 7) -> Tensor:
    """Per row of (N, g) ``x``: scale s (x ≈ s*TABLE[u]) maximizing the weighted fit
    (Σwvx)²/Σwv²; candidates map the largest-magnitude weight to TABLE[0] + k, |k| <= ``steps``,
    and each takes the least-squares scale of its codes.  -> (N,)"""
    table = TABLE.to(x.device)
    idx = x.abs().argmax(-1, keepdim=True)
    amax = x.gather(-1, idx).squeeze(-1)  # (N,) signed value of largest magnitude
    safe = torch.where(amax == 0, torch.ones_like(amax), amax)
    best_s = amax / float(table[0])
    best_score = torch.full_like(amax, -1.0)
    for k in range(-steps, steps + 1):
        s0 = safe / (float(table[0]) + k)  # candidate scale
        v = table[nearest_in_table(x, s0[:, None]).long()]  # (N, g)
        sqx, sqq = (wt * v * x).sum(-1), (wt * v * v).sum(-1)
        score = torch.where(sqq > 0, sqx * sqx / sqq.clamp(min=1e-30), torch.full_like(sqx, -1.0))
        better = score > best_score
        best_score = torch.where(better, score, best_score)
        best_s = torch.where(better, sqx / sqq.clamp(min=1e-30), best_s)
    return torch.where(amax == 0, torch.zeros_like(best_s), best_s)


def _fit_lattice(x: Tensor, wt: Tensor, lat: Lattice) -> Tensor:
    """Per row of (N, 32) ``x``: scale s >= 0 (x ≈ s * ±values[k] on ``lat``'s codebook)
    maximizing the weighted fit; candidates put the largest magnitude at values[-1] * (1 + step*i),
    |i| <= steps, each scored with its quick codes (`quick_codes`) and the least-squares scale given
    them.  -> (N,)"""
    amax = x.abs().amax(-1)
    top = lat.values[-1]
    best_s, best_score = amax / top, torch.full_like(amax, -1.0)
    cells = cell_points(lat)
    for i in range(-lat.steps, lat.steps + 1):
        mag, sgn = lattice_values(quick_codes(x, amax / (top * (1 + lat.step * i)), cells, lat), lat)
        v = mag * sgn  # (N, 32)
        sqx, sqq = (wt * v * x).sum(-1), (wt * v * v).sum(-1)
        score = sqx * sqx / sqq.clamp(min=1e-30)
        better = score > best_score
        best_score = torch.where(better, score, best_score)
        best_s = torch.where(better, sqx / sqq.clamp(min=1e-30), best_s)
    return best_s.clamp(min=0)


def _table_weights(wf: Tensor, imp: Tensor | None, block: int, lattice: bool) -> Tensor:
    """llama.cpp's i-quant error weights imp * sqrt(σ² + x²), σ² twice the mean square of the
    weight's (super-)block; without an importance vector llama.cpp's IQ4 weights x², the lattice
    types imp = 1 (x² weights cost IQ3_S 3x the squared error on Gaussian weights).  (rows, n)"""
    if imp is None and not lattice:
        return wf * wf
    rows, n = wf.shape
    imp = torch.ones(n, device=wf.device) if imp is None else imp
    sigma2 = 2 * wf.view(rows, -1, block).pow(2).mean(-1, keepdim=True)  # (rows, nb, 1)
    return (imp.view(1, -1, block) * (sigma2 + wf.view(rows, -1, block).pow(2)).sqrt()).view(rows, n)


def fit_grid(w: Tensor, t: GGMLType, importance: Tensor | None = None) -> GGMLBlocks:
    """Choose the stored scales (and mins) of type ``t`` for (rows, n) ``w``; codes are the
    nearest on that grid. ``importance`` (n,) weights each column's squared error (for example
    the input Hessian's diagonal, making it the output error under a diagonal covariance)."""
    rows, n = w.shape
    check_width(t, n)
    wf = w.detach().float()
    if t.nonuniform:
        imp_t = None if importance is None else importance.float().clamp(min=0) + 1e-12
        wt_t = _table_weights(wf, imp_t, t.block, t.lattice)  # (rows, n)
        x, wx = wf.reshape(-1, t.sub), wt_t.reshape(-1, t.sub)
        if not t.lattice:
            return from_sub_grid(wf, t, _fit_table(x, wx).view(rows, -1))
        lat = LATTICES[t.name]
        b = from_sub_grid(wf, t, _fit_lattice(x, wx, lat).view(rows, -1))
        b.codes = lattice_codes(wf, sub_scales(b)[0], lat, wt_t, t.sub)  # nearest under the error weights
        return b
    imp = torch.ones(n, device=w.device) if importance is None else importance.float().clamp(min=0) + 1e-12
    x = wf.reshape(-1, t.sub)  # (rows*n/sub, sub)
    wt = imp.view(1, -1).expand(rows, n).reshape(-1, t.sub)
    if t.affine:
        s, m = _fit_affine(x, wt, t.qmax, min_at_most_zero=t.scale_bits > 0)
        return from_sub_grid(wf, t, s.view(rows, -1), -m.view(rows, -1))
    return from_sub_grid(wf, t, _fit_symmetric(x, wt, t.offset).view(rows, -1))


def quantize(w: Tensor, t: GGMLType | str, importance: Tensor | None = None) -> GGMLBlocks:
    """Round-to-nearest on a fitted grid of type ``t``."""
    return fit_grid(w, ggml_type(t) if isinstance(t, str) else t, importance)
