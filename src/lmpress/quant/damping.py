"""Damping a Hessian until it factors: the one rule every second-order solver follows.

GPTQ, SparseGPT, codebook assignment, low-rank whitening and layer sharing all solve with an input
Hessian H = (2/N) Σ x xᵀ plus λ·mean(diag H)·I. Rounding in a float32 H from few or outlier-heavy
tokens (OPT's few huge channels) can leave H + λ·mean·I not positive definite at the configured λ.
As GPTQModel does, λ is then raised step by step (×10 each time, up to `MAX_DAMP`) until the
factorization succeeds; the λ used is returned so that the stage report can say what it took.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
from torch import Tensor

from lmpress.errors import LmpressError

log = logging.getLogger(__name__)

T = TypeVar("T")
DAMP_GROWTH = 10.0  # each failed factorization multiplies λ by this
MAX_DAMP = 1.0  # the last λ tried: the mean diagonal added to every diagonal entry


def damp_steps(damp: float) -> Iterator[float]:
    """The λ to try in order: ``damp``, then ×`DAMP_GROWTH` up to `MAX_DAMP` (``damp`` alone past it)."""
    yield damp
    while damp < MAX_DAMP:
        damp = min(damp * DAMP_GROWTH, MAX_DAMP)
        yield damp


def damp_scale(H: Tensor) -> float:
    """mean(diag H), the unit λ is counted in (a tiny positive floor for an all-zero H).  H (n, n)"""
    return max(float(H.diagonal().mean()), 1e-12)


def inverse_factor(H: Tensor, lam: float) -> Tensor | None:
    """U, the upper Cholesky factor of (H + λ·mean(diag H)·I)⁻¹ = UᵀU, or None where H + λ·mean·I
    (or its inverse, in rounding) does not factor.  H (n, n) -> (n, n)"""
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    L, info = torch.linalg.cholesky_ex(H + lam * damp_scale(H) * eye)
    if int(info) != 0:
        return None
    U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    return U if int(info) == 0 else None


def with_damping(
    factor: Callable[[float], T | None], damp: float, what: str, error: type[LmpressError] = LmpressError
) -> tuple[T, float]:
    """(factor(λ), λ) for the first λ of `damp_steps` (``damp`` first) at which ``factor`` succeeds;
    ``factor`` returns None where H + λ·mean(diag H)·I is not positive definite. A raised λ is
    logged as a warning naming ``what``; past `MAX_DAMP`, ``error`` in one line."""
    for lam in damp_steps(damp):
        out = factor(lam)
        if out is not None:
            if lam != damp:
                log.warning("%s: the Hessian is not positive definite at damp %g; solved with damp %g", what, damp, lam)
            return out, lam
    raise error(
        f"{what}: the Hessian is not positive definite even with damp {max(damp, MAX_DAMP):g} "
        "(non-finite or degenerate calibration inputs); give more or different calibration text"
    )
