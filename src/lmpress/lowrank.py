"""``lowrank``: replace linear layers by two thin ones, W ≈ U·V, under one parameter budget.

Plain truncated SVD keeps the largest singular values of W, which minimizes ‖W − W'‖ but not the
error on the layer's outputs. The activation-aware, truncation-aware variant (SVD-LLM, Wang et al.
2024, arXiv:2403.07378) whitens first: with H = Σ x xᵀ over calibration inputs and its Cholesky
factor H = L Lᵀ, the SVD of W L = U Σ Vᵀ truncated to rank r gives W' = U_r Σ_r V_rᵀ L⁻¹, whose
output error on the calibration data is exactly √(Σ_{i>r} σ_i²): the discarded singular values
*are* the loss, so truncation is optimal for the data and its cost is known before it is paid.

Ranks come from one global budget (``target``: the share of the targeted layers' parameters to
remove). Each layer's cost of rank r is its relative output error e(r) = Σ_{i>r} σ_i² / Σ σ_i²;
a Lagrange multiplier λ is searched so that every layer picks the rank minimizing e(r) + λ·params(r)
(keeping the dense layer when that is cheaper) and the total meets the budget. A layer is only
factorized where r·(in + out) < in·out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from lmpress.arch import Adapter, linear_weight
from lmpress.calib import InputStats, blockwise, collect
from lmpress.method import Context, Method, MethodConfig, StageReport
from lmpress.nn.lowrank_linear import LowRankLinear
from lmpress.prune.masks import PruneError
from lmpress.quant.base import replace_module, targeted_layers
from lmpress.quant.damping import damp_scale, with_damping
from lmpress.select import Patterns


class LowRankConfig(MethodConfig):
    """Low-rank factorization of linear layers to a parameter budget."""

    method: Literal["lowrank"] = "lowrank"
    target: float = Field(0.2, gt=0, lt=1)  # share of the targeted layers' parameters to remove
    whiten: bool = True  # activation-aware (SVD-LLM); false: plain truncated SVD of the weights
    damp: float = Field(0.01, gt=0, le=1)  # added to H's diagonal, as a share of its mean (x10 up to 1 till it factors)
    targets: Patterns = ["re:.*"]
    ignore: Patterns = ["lm_head"]
    calib_batch_size: int = Field(8, ge=1)


@dataclass
class Spectrum:
    """One layer's factorization in (whitened) space: W L = U diag(s) Vᵀ, and L⁻¹ to undo it."""

    u: Tensor  # (out, k)
    s: Tensor  # (k,) descending
    vt: Tensor  # (k, in), already multiplied by L⁻¹ when whitened
    in_features: int
    out_features: int

    def error(self) -> Tensor:
        """Relative output error of keeping rank r, for r = 0..k.  (k + 1,)"""
        e = self.s.double().pow(2)
        tail = e.flip(0).cumsum(0).flip(0)  # Σ_{i>=r}
        return torch.cat([tail, tail.new_zeros(1)]) / e.sum().clamp(min=1e-30)

    def factors(self, rank: int) -> tuple[Tensor, Tensor]:
        """(out, r) and (r, in) with the singular values split evenly between them."""
        root = self.s[:rank].sqrt()
        return self.u[:, :rank] * root, root[:, None] * self.vt[:rank]


def whitening(H: Tensor, damp: float) -> Tensor:
    """Lower Cholesky factor L of H + λ·mean(diag H)·I, so that H ≈ L Lᵀ, λ = damp raised until it
    factors (`lmpress.quant.damping`).  (in, in)"""
    H = H.double()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)

    def factor(lam: float) -> Tensor | None:
        L, info = torch.linalg.cholesky_ex(H + lam * damp_scale(H) * eye)
        return L if int(info) == 0 else None

    return with_damping(factor, damp, "lowrank", PruneError)[0]


def spectrum(weight: Tensor, L: Tensor | None) -> Spectrum:
    """SVD of W (plain) or of W L (whitened), mapped back so that factors multiply x directly."""
    W = weight.double()
    U, s, Vt = torch.linalg.svd(W @ L if L is not None else W, full_matrices=False)
    if L is not None:  # Vᵀ L⁻¹ = (L⁻ᵀ V)ᵀ
        Vt = torch.linalg.solve_triangular(L.T, Vt.T, upper=True).T
    return Spectrum(U.float(), s.float(), Vt.float(), W.shape[1], W.shape[0])


def allocate(spectra: dict[str, Spectrum], budget: int) -> dict[str, int | None]:
    """Rank per layer (None: stay dense) removing at least ``budget`` parameters, least error first."""
    curves = {}
    for name, sp in spectra.items():
        k, dense = len(sp.s), sp.in_features * sp.out_features
        ranks = torch.arange(1, k + 1, dtype=torch.float64)  # rank 0 would remove the layer
        cost = ranks * (sp.in_features + sp.out_features)
        err = sp.error()[1:]
        useful = cost < dense
        curves[name] = (ranks[useful], cost[useful], err[useful], dense)

    def choose(lam: float) -> tuple[dict[str, int | None], float]:
        picks: dict[str, int | None] = {}
        saved = 0.0
        for name, (ranks, cost, err, dense) in curves.items():
            if len(ranks) == 0:
                picks[name] = None
                continue
            obj = err + lam * cost
            i = int(obj.argmin())
            if float(obj[i]) >= lam * dense:  # staying dense costs no error
                picks[name] = None
            else:
                picks[name] = int(ranks[i])
                saved += dense - float(cost[i])
        return picks, saved

    lo, hi = 0.0, 1.0
    while choose(hi)[1] < budget:
        hi *= 4
        if hi > 1e12:
            raise PruneError("lowrank: target removes more parameters than factorization can; lower target")
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if choose(mid)[1] < budget else (lo, mid)
    picks, _ = choose(hi)
    return picks


@torch.no_grad()
def apply(model: nn.Module, config: LowRankConfig, ctx: Context) -> StageReport:
    t0 = time.perf_counter()
    layers = targeted_layers(model, config)
    adapter = Adapter(model)
    spectra: dict[str, Spectrum] = {}
    if config.whiten:
        windows = ctx.calib_data().windows
        for i, block, inputs in blockwise(model, windows, config.calib_batch_size, ctx.progress):
            mine = {n: m for n, m in adapter.block_linears(i).items() if n in layers}
            stats = collect(
                block, inputs, mine, lambda m: InputStats.empty(linear_weight(m).shape[1], linear_weight(m).device)
            )
            factor: dict[int, Tensor] = {}  # layers fed the same tensor share H, and L
            for name, m in mine.items():
                st = stats[name]
                if st.n_tokens == 0:
                    continue
                L = factor.setdefault(id(st), whitening(st.H, config.damp))
                spectra[name] = spectrum(linear_weight(m).detach(), L)
    for name, m in layers.items():  # unwhitened: layers outside blocks, or every layer when plain
        if name not in spectra:
            spectra[name] = spectrum(linear_weight(m).detach(), None)
    total = sum(sp.in_features * sp.out_features for sp in spectra.values())
    ranks = allocate(spectra, int(config.target * total))
    kept = {}
    for name, rank in ranks.items():
        if rank is None:
            continue
        m = layers[name]
        u, v = spectra[name].factors(rank)
        w = linear_weight(m)
        bias = getattr(m, "bias", None)
        replace_module(
            model, name, LowRankLinear.from_factors(u, v, bias if isinstance(bias, Tensor) else None, w.dtype)
        )
        kept[name] = rank
    after = sum(
        r * (spectra[n].in_features + spectra[n].out_features)
        if r is not None
        else spectra[n].in_features * spectra[n].out_features
        for n, r in ranks.items()
    )
    return {
        "ranks": kept,
        "dense_layers": sorted(n for n, r in ranks.items() if r is None),
        "removed_share": 1 - after / total,
        "lowrank_seconds": time.perf_counter() - t0,
    }


METHOD = Method("lowrank", LowRankConfig, apply, "low-rank factorization (activation-aware SVD) to a parameter budget")
