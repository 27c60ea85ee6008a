"""``sparsegpt``: second-order pruning with weight reconstruction (Frantar & Alistarh 2023,
arXiv:2301.00774), optionally with joint quantization.

Columns are visited left to right in blocks. In each block the mask is chosen adaptively: the
weights with the smallest w² / [H⁻¹]ₖₖ² (the output error their removal causes) across the block are
pruned; for N:M the choice is made per row within each group of M columns. Each pruned (or, with
``bits``, quantized) column's error is spread over the columns not yet visited through the inverse
input Hessian, as in GPTQ, so the layer's output on calibration data changes as little as possible.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from lmpress.arch import linear_weight
from lmpress.calib import InputStats
from lmpress.formats.grid import Quantized
from lmpress.method import Context, Method, StageReport
from lmpress.prune.base import PruneConfig, Pruned, prune_model
from lmpress.prune.masks import PruneError, mask_from_scores, parse_pattern
from lmpress.quant.damping import inverse_factor, with_damping
from lmpress.quant.grid import find_grid


class SparseGPTConfig(PruneConfig):
    """SparseGPT pruning (Frantar & Alistarh 2023), optionally quantizing the kept weights."""

    method: Literal["sparsegpt"] = "sparsegpt"
    damp: float = Field(0.01, gt=0, le=1)  # fraction of the mean Hessian diagonal added to it
    block_size: int = Field(128, ge=1)  # columns per lazy update and per adaptive mask
    bits: int | None = Field(None, ge=2, le=8)  # quantize the kept weights jointly (stored as codes)
    group_size: int | None = Field(128, gt=0)
    symmetric: bool = False


def sparsegpt_prune(
    weight: Tensor,
    H: Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    damp: float = 0.01,
    block_size: int = 128,
    bits: int | None = None,
    group_size: int | None = 128,
    symmetric: bool = False,
) -> Pruned:
    """Prune (and optionally quantize) (out, in) ``weight`` given its input Hessian ``H`` (in, in)."""
    W = weight.detach().float().clone()
    H = H.detach().float().clone()
    out_f, in_f = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv, _ = with_damping(lambda lam: inverse_factor(H, lam), damp, "SparseGPT", PruneError)
    q = None
    if bits is not None:  # one grid per group from the unpruned weights, fixed up front
        scales, zeros = find_grid(W, bits, group_size, symmetric)
        codes = torch.zeros(out_f, in_f, dtype=torch.uint8, device=W.device)
        qmax = 2**bits - 1
    keep = torch.ones(out_f, in_f, dtype=torch.bool, device=W.device)

    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        if nm is None:  # adaptive mask over the whole block
            keep1 = mask_from_scores(W1.pow(2) / d.pow(2)[None, :], sparsity, None, per_row=False)
        else:
            keep1 = torch.ones_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            col = i1 + i
            w = W1[:, i]
            if nm is not None and i % nm[1] == 0:  # choose this group's N:M mask with updated weights
                cols = slice(i, i + nm[1])
                keep1[:, cols] = mask_from_scores(W1[:, cols].pow(2) / d[cols].pow(2)[None, :], 0, nm)
            qc = torch.where(keep1[:, i], w, torch.zeros_like(w))
            if bits is not None:
                g = 0 if group_size is None else col // group_size
                s, z = scales[:, g], zeros[:, g]
                c = (qc / s + z).round().clamp(0, qmax)
                codes[:, col] = c.to(torch.uint8)
                qc = torch.where(keep1[:, i], (c - z) * s, torch.zeros_like(w))
            Q1[:, i] = qc
            err = (w - qc) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        keep[:, i1:i2] = keep1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if bits is not None:
        q = Quantized(codes, scales, zeros, bits, group_size)
    return Pruned(W, keep, q, symmetric)


def apply(model: nn.Module, config: SparseGPTConfig, ctx: Context) -> StageReport:
    nm = parse_pattern(config.pattern)

    def fn(name: str, module: nn.Module, stats: InputStats | None, sparsity: float) -> Pruned:
        w = linear_weight(module).detach().float()
        if stats is None:  # a targeted layer outside the blocks (the head): magnitude
            return Pruned(w, mask_from_scores(w.abs(), sparsity, nm, per_row=False))
        return sparsegpt_prune(
            w, stats.H, sparsity, nm, config.damp, config.block_size, config.bits, config.group_size, config.symmetric
        )

    def make_stats(m: nn.Module) -> InputStats:
        return InputStats.empty(linear_weight(m).shape[1], linear_weight(m).device)

    def min_tokens(m: nn.Module) -> int:
        return int(linear_weight(m).shape[1])

    return prune_model(model, config, ctx, fn, make_stats, min_tokens)


METHOD = Method(
    "sparsegpt", SparseGPTConfig, apply, "SparseGPT: Hessian-aware pruning with weight updates, unstructured or N:M"
)
