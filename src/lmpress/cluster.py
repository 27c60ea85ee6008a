"""``cluster``: k-means weight sharing, a non-uniform quantizer with 2^bits centroids.

Each targeted layer's weights are clustered into ``centroids`` values (one codebook per layer, or
one per output channel) and stored as packed indices plus the codebook (`CodebookLinear`).

- **Sensitivity-weighted k-means** (SqueezeLLM, Kim et al. 2023, arXiv:2306.07629): with
  ``weighting: hessian`` each weight w_ij counts in proportion to the diagonal of its layer's input
  Hessian, H_jj = Σ x_j², its first-order share of the output error, so centroids gather where the
  weights that matter are. In one dimension Lloyd's iterations are exact and cheap: the clusters
  are intervals between the midpoints of sorted centroids. Centroids start at weighted quantiles.
- **Error feedback** (``error_feedback``): indices are chosen one input column at a time, and each
  column's rounding error is spread over the columns not yet rounded through the inverse Hessian,
  as GPTQ does for a uniform grid (Frantar et al. 2022, arXiv:2210.17323); then the codebook is
  refit to the chosen indices by least squares on the layer's output error.

Layers outside the decoder blocks (the head) are clustered unweighted.
"""

from __future__ import annotations

import time
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from lmpress.arch import Adapter, linear_weight
from lmpress.calib import InputStats, blockwise, collect
from lmpress.method import Context, Method, MethodConfig, StageReport
from lmpress.nn.codebook_linear import CodebookLinear
from lmpress.quant.base import QuantError, check_finite, replace_module, targeted_layers
from lmpress.quant.damping import inverse_factor, with_damping
from lmpress.select import Patterns


class ClusterConfig(MethodConfig):
    """k-means weight clustering into a codebook of ``centroids`` values."""

    method: Literal["cluster"] = "cluster"
    centroids: int = 16  # a power of two, 2..256: indices of log2(centroids) bits
    per_channel: bool = False  # one codebook per output channel instead of one per layer
    row_scale: bool = True  # per-layer codebook over rows divided by their largest magnitude (+2 bytes a row)
    weighting: Literal["hessian", "none"] = "hessian"  # weight each w_ij by H_jj (needs calibration data)
    error_feedback: bool = True  # GPTQ-style column-by-column assignment, then a least-squares codebook
    iterations: int = Field(30, ge=1, le=1000)  # Lloyd iterations at most
    damp: float = Field(0.01, gt=0, le=1)
    codebook_dtype: Literal["float16", "bfloat16"] = "float16"
    targets: Patterns = ["re:.*"]
    ignore: Patterns = ["lm_head"]
    calib_batch_size: int = Field(8, ge=1)

    @field_validator("centroids")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v < 2 or v > 256 or v & (v - 1):
            raise ValueError(f"centroids must be a power of two from 2 to 256 (1 to 8 index bits), not {v}")
        return v

    @property
    def bits(self) -> int:
        return self.centroids.bit_length() - 1

    @property
    def needs_data(self) -> bool:
        return self.weighting == "hessian" or self.error_feedback


def weighted_kmeans(x: Tensor, weight: Tensor, k: int, iterations: int = 30) -> tuple[Tensor, Tensor]:
    """1-D weighted k-means per row: (G, n) values and weights -> (G, k) sorted centroids, (G, n) indices."""
    x, weight = x.double(), weight.double().clamp(min=0) + 1e-12
    order = x.argsort(dim=1)
    xs, ws = x.gather(1, order), weight.gather(1, order)
    cdf = ws.cumsum(1) / ws.sum(1, keepdim=True)  # (G, n)
    quantiles = (torch.arange(k, dtype=x.dtype, device=x.device) + 0.5) / k
    at = torch.searchsorted(cdf.contiguous(), quantiles.expand(x.shape[0], k).contiguous()).clamp(max=x.shape[1] - 1)
    centroids = xs.gather(1, at)  # (G, k)
    idx = nearest(x, centroids)
    for _ in range(iterations):
        sums = torch.zeros_like(centroids).scatter_add_(1, idx, weight * x)
        mass = torch.zeros_like(centroids).scatter_add_(1, idx, weight)
        centroids = torch.where(mass > 0, sums / mass.clamp(min=1e-30), centroids).sort(dim=1).values
        new = nearest(x, centroids)
        if torch.equal(new, idx):
            break
        idx = new
    return centroids, idx


def nearest(x: Tensor, centroids: Tensor) -> Tensor:
    """Index of the nearest of each row's sorted centroids.  x (G, n), centroids (G, k) -> (G, n) int64"""
    mids = (centroids[:, 1:] + centroids[:, :-1]) / 2
    return torch.searchsorted(mids.contiguous(), x.to(mids.dtype).contiguous())


def assign_with_feedback(W: Tensor, H: Tensor, centroids: Tensor, damp: float, block_size: int = 128) -> Tensor:
    """Indices chosen column by column, each column's error compensated through H⁻¹ (GPTQ order:
    decreasing H_jj).  W (out, in), centroids (1 or out, k) sorted -> (out, in) int64"""
    W = W.double().clone()
    H = H.double().clone()
    out_f, in_f = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    perm = torch.argsort(torch.diag(H), descending=True)
    W, H = W[:, perm], H[perm][:, perm]
    Hinv, _ = with_damping(lambda lam: inverse_factor(H, lam), damp, "cluster", QuantError)
    book = centroids.double().expand(out_f, -1)
    idx = torch.zeros(out_f, in_f, dtype=torch.long, device=W.device)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1, Err1, Hinv1 = (
            W[:, i1:i2].clone(),
            torch.zeros(out_f, i2 - i1, dtype=W.dtype, device=W.device),
            Hinv[i1:i2, i1:i2],
        )
        for i in range(i2 - i1):
            w = W1[:, i]
            j = nearest(w[:, None], book)[:, 0]  # (out,)
            idx[:, i1 + i] = j
            err = (w - book.gather(1, j[:, None])[:, 0]) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return idx[:, torch.argsort(perm)]


def refit_codebook(
    W: Tensor, H: Tensor, idx: Tensor, centroids: Tensor, damp: float, row_weight: Tensor | None = None
) -> Tensor:
    """Centroids minimizing Σ_rows (w - c[idx]) H (w - c[idx])ᵀ for fixed indices (per codebook row).

    W (out, in), idx (out, in), centroids (G, k) with G = 1 or out; ``row_weight`` (out,) scales each
    row's error (a row stored as scale · codebook values counts scale² times).  Returns (G, k).
    The normal equations M c = b have M[k, l] = Σ_r Σ_{i,j} [idx_ri = k] [idx_rj = l] H_ij: H is
    scattered into M by index pairs, a chunk of rows at a time (about 2^24 numbers per chunk).
    """
    W, H = W.double(), H.double()
    out_f, in_f = W.shape
    k = centroids.shape[1]
    H = H + damp * torch.diag(H).mean() * torch.eye(in_f, dtype=H.dtype, device=H.device)
    rw = row_weight.double() if row_weight is not None else torch.ones(out_f, dtype=H.dtype, device=H.device)
    shared = centroids.shape[0] == 1
    G = 1 if shared else out_f
    M = torch.zeros(G * k * k, dtype=H.dtype, device=H.device)
    step = max(1, 2**24 // (in_f * in_f))
    for r0 in range(0, out_f, step):
        r1 = min(r0 + step, out_f)
        ids = idx[r0:r1]  # (c, in)
        flat = ids[:, :, None] * k + ids[:, None, :]  # (c, in, in)
        if not shared:
            flat = flat + (torch.arange(r0, r1, device=ids.device) * k * k)[:, None, None]
        M.index_add_(0, flat.reshape(-1), (rw[r0:r1, None, None] * H).reshape(-1))
    M = M.view(G, k, k)
    WH = (W @ H) * rw[:, None]  # (out, in)
    b = torch.zeros(G * k, dtype=H.dtype, device=H.device)
    rows = torch.zeros_like(idx) if shared else torch.arange(out_f, device=idx.device)[:, None].expand_as(idx)
    b.index_add_(0, (rows * k + idx).reshape(-1), WH.reshape(-1))
    b = b.view(G, k)
    used = M.diagonal(dim1=1, dim2=2) > 0  # (G, k)
    eye = torch.diag_embed((~used).double())  # an unused centroid keeps its value
    rhs = torch.where(used, b, centroids.double())
    system = M * used[:, :, None] * used[:, None, :] + eye
    solved = torch.linalg.lstsq(system, rhs[..., None]).solution[..., 0]
    return torch.where(torch.isfinite(solved), solved, centroids.double()).to(centroids.dtype)


def output_error(W: Tensor, Wq: Tensor, H: Tensor) -> float:
    """tr((W - Wq) H (W - Wq)ᵀ) / tr(W H Wᵀ): the layer's relative output error on calibration data."""
    D = (W - Wq).double()
    H = H.double()
    return float(
        torch.einsum("ri,ij,rj->", D, H, D) / torch.einsum("ri,ij,rj->", W.double(), H, W.double()).clamp(min=1e-30)
    )


def cluster_weight(w: Tensor, H: Tensor | None, config: ClusterConfig) -> tuple[Tensor, Tensor, Tensor | None]:
    """Indices (out, in), codebook (1 or out, centroids) and row scales (out,) or None for one weight.

    With ``row_scale`` each row is divided by its largest magnitude before one codebook is fit to
    all rows, so rows of different ranges share it; errors are weighed in the original units.
    """
    W = w.detach().double()
    out_f, in_f = W.shape
    scale = W.abs().amax(1).clamp(min=1e-12) if config.row_scale and not config.per_channel else None
    Wn = W / scale[:, None] if scale is not None else W
    row_weight = scale.pow(2) if scale is not None else None
    col_weight = torch.diag(H).double().clamp(min=0) if H is not None and config.weighting == "hessian" else None
    importance = torch.ones_like(W)
    if col_weight is not None and float(col_weight.sum()) > 0:
        importance = importance * col_weight
    if row_weight is not None:
        importance = importance * row_weight[:, None]
    groups = (Wn, importance) if config.per_channel else (Wn.reshape(1, -1), importance.reshape(1, -1))
    centroids, idx = weighted_kmeans(*groups, config.centroids, config.iterations)
    idx = idx.reshape(out_f, in_f)
    if H is None or not config.error_feedback:
        return idx, centroids, scale

    def error(book: Tensor, ids: Tensor) -> float:
        Wq = _lookup(book, ids)
        return output_error(W, Wq * scale[:, None] if scale is not None else Wq, H)

    fb_idx = assign_with_feedback(Wn, H, centroids, config.damp)
    fb_book = refit_codebook(Wn, H, fb_idx, centroids, config.damp, row_weight).sort(dim=1)
    fb_idx = torch.gather(fb_book.indices.argsort(dim=1).expand(out_f, -1), 1, fb_idx)  # indices follow the sort
    if error(fb_book.values, fb_idx) < error(centroids, idx):  # feedback nearly always helps; keep the better
        return fb_idx, fb_book.values, scale
    return idx, centroids, scale


def _lookup(book: Tensor, idx: Tensor) -> Tensor:
    return book[0][idx] if book.shape[0] == 1 else torch.gather(book, 1, idx)


def check_sizes(layers: dict[str, nn.Module], config: ClusterConfig) -> None:
    """A codebook larger than the weights it would index is an error before any work."""
    for name, m in layers.items():
        out_f, in_f = linear_weight(m).shape
        values = in_f if config.per_channel else in_f * out_f
        if config.centroids > values:
            raise QuantError(
                f"cluster: {config.centroids} centroids for layer {name} with {values} weights per codebook; "
                "use fewer centroids or per_channel: false"
            )


@torch.no_grad()
def apply(model: nn.Module, config: ClusterConfig, ctx: Context) -> StageReport:
    t0 = time.perf_counter()
    layers = targeted_layers(model, config)
    check_sizes(layers, config)
    for name, m in layers.items():
        check_finite(name, linear_weight(m))
    hessians: dict[str, Tensor] = {}
    errors: dict[str, float] = {}
    book_dtype = getattr(torch, config.codebook_dtype)

    def swap(name: str, m: nn.Module, H: Tensor | None) -> None:
        w = linear_weight(m).detach()
        idx, book, scale = cluster_weight(w, H, config)
        book = book.to(book_dtype)
        scale = scale.to(book_dtype) if scale is not None else None
        if H is not None:
            Wq = _lookup(book.double(), idx)
            errors[name] = output_error(w, Wq * scale.double()[:, None] if scale is not None else Wq, H)
        bias = getattr(m, "bias", None)
        bias = bias.detach().to(w.dtype) if isinstance(bias, Tensor) else None
        replace_module(
            model, name, CodebookLinear.from_indices(idx.to(torch.uint8), book, config.bits, bias, book_dtype, scale)
        )

    if config.needs_data:
        adapter = Adapter(model)
        for i, block, inputs in blockwise(model, ctx.calib_data().windows, config.calib_batch_size, ctx.progress):
            mine = {n: m for n, m in adapter.block_linears(i).items() if n in layers}
            stats = collect(
                block, inputs, mine, lambda m: InputStats.empty(linear_weight(m).shape[1], linear_weight(m).device)
            )
            for name, m in mine.items():
                st = stats[name]
                hessians[name] = st.H
                swap(name, m, st.H if st.n_tokens else None)
    for name, m in layers.items():  # outside the blocks (the head), or no data asked for
        if name not in hessians:
            swap(name, m, None)
    return {
        "layers": len(layers),
        "centroids": config.centroids,
        "per_channel": config.per_channel,
        "output_error": errors,  # per layer: relative output error on the calibration data
        "cluster_seconds": time.perf_counter() - t0,
    }


METHOD = Method(
    "cluster", ClusterConfig, apply, "k-means weight clustering: packed indices into a small codebook (non-uniform)"
)
