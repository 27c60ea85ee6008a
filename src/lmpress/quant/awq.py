"""``awq``: activation-aware weight quantization (Lin et al. 2023, arXiv:2306.00978).

A few input channels carry much larger activations than the rest, and the weights that read them
matter most. AWQ scales those weight columns up by s_j = mean|x_j|^α before rounding (so they
round more finely) and divides the previous op's matching outputs by s_j, which leaves the float
model unchanged. α is searched per group of linears sharing an input, minimizing their output error
on calibration activations; then each group's clipping range is searched with an
activation-weighted error. Scales are folded into the preceding norm, or the preceding linear
where the activation in between allows it (`Adapter.scale_groups`); linears without a foldable
predecessor get only the clipping search.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from lmpress.arch import Adapter, NormKind, is_conv1d, linear_weight
from lmpress.arch.adapter import OutputRows
from lmpress.formats import ggml
from lmpress.formats.grid import Quantized, quantize_with
from lmpress.method import Context, Method, StageReport
from lmpress.quant import ggml_fit
from lmpress.quant.base import (
    LayerSettings,
    QuantError,
    QuantizeFn,
    WeightQuantConfig,
    quantize_calibrated,
    settings_for,
)
from lmpress.quant.grid import clip_search, quantize


class AWQConfig(WeightQuantConfig):
    """AWQ: activation-aware scales (folded into the previous op) plus clipping search."""

    method: Literal["awq"] = "awq"
    alpha_grid: int = Field(20, ge=2, le=100)  # α candidates in [0, 1)

    @model_validator(mode="before")
    @classmethod
    def _integer_grid_is_alpha_grid(cls, data: Any) -> Any:
        """Recipes written before GGUF grids used ``grid: 20`` for the α candidates."""
        if isinstance(data, dict) and isinstance(data.get("grid"), int) and not isinstance(data["grid"], bool):
            data = {**data, "alpha_grid": data["grid"]}
            del data["grid"]
        return data

    clip: bool = True  # activation-weighted clipping search
    max_tokens: int = Field(4096, ge=64)  # calibration tokens kept per group for the search
    calib_batch_size: int = Field(8, ge=1)


@dataclass
class Activations:
    """A subsample of one input's activations plus its per-channel statistics."""

    max_tokens: int
    x: list[Tensor] = field(default_factory=list)
    abs_sum: Tensor | None = None
    sq_sum: Tensor | None = None
    n_tokens: int = 0

    def update(self, x: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
        self.abs_sum = x.abs().sum(0) + (self.abs_sum if self.abs_sum is not None else 0)
        self.sq_sum = x.pow(2).sum(0) + (self.sq_sum if self.sq_sum is not None else 0)
        self.n_tokens += x.shape[0]
        kept = sum(t.shape[0] for t in self.x)
        if kept < self.max_tokens:
            self.x.append(x[: self.max_tokens - kept])

    def matrix(self) -> Tensor:
        return torch.cat(self.x)  # (n, in)

    def reduce(self, dist: Any) -> None:
        """Combine processes (`lmpress.calib.all_reduce_stats`): the sums add up; the subsample is
        each process's kept tokens in rank order, cut at ``max_tokens``."""
        assert self.abs_sum is not None and self.sq_sum is not None
        for t in (self.abs_sum, self.sq_sum):
            dist.all_reduce(t)
        x = self.matrix()  # (n, in)
        n = torch.tensor([x.shape[0], self.n_tokens], dtype=torch.int64)
        counts = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
        dist.all_gather(counts, n)
        longest = max(int(c[0]) for c in counts)
        padded = torch.nn.functional.pad(x, (0, 0, 0, longest - x.shape[0]))  # (longest, in)
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded)
        self.x = [torch.cat([p[: int(c[0])] for p, c in zip(parts, counts, strict=True)])[: self.max_tokens]]
        self.n_tokens = sum(int(c[1]) for c in counts)


def awq_scales(
    x: Tensor, x_abs_mean: Tensor, weights: list[Tensor], s: LayerSettings, grid: int
) -> tuple[Tensor, float]:
    """Search α for s = mean|x|^α (normalized to geometric mean 1) minimizing the summed output
    error of ``weights`` (each (out, in)) on inputs ``x`` (n, in).  -> (scales (in,), best α)"""
    refs = [x @ w.T for w in weights]  # [(n, out)]
    best, best_err, best_alpha = torch.ones_like(x_abs_mean), float("inf"), 0.0
    for k in range(grid):
        alpha = k / grid
        sc = x_abs_mean.clamp(min=1e-4).pow(alpha)
        sc = sc / (sc.max() * sc.min()).sqrt()
        err = 0.0
        for w, ref in zip(weights, refs, strict=True):
            ws = w * sc[None, :]
            deq = (
                ggml.dequantize(ggml_fit.quantize(ws, s.grid))
                if s.grid
                else quantize(ws, s.bits, s.group_size, s.symmetric).dequantize()
            )
            q = deq / sc[None, :]
            err += float((x @ q.T - ref).pow(2).mean())
        if err < best_err:
            best, best_err, best_alpha = sc, err, alpha
    return best, best_alpha


def weighted_clip(w: Tensor, x_sq_mean: Tensor, s: LayerSettings, grid: int = 20) -> Quantized:
    """Clipping search per group minimizing Σ_j E[x_j²] (w_j - q_j)²: the output error under a
    diagonal approximation of the input covariance."""
    scales, zeros = clip_search(w, s.bits, s.group_size, s.symmetric, grid=grid, col_weights=x_sq_mean)
    return Quantized(quantize_with(w, scales, zeros, s.bits, s.group_size), scales, zeros, s.bits, s.group_size)


@torch.no_grad()
def fold_scales(prev: nn.Module, linears: dict[str, nn.Module], sc: Tensor, kind: NormKind | None = None) -> None:
    """Divide ``prev``'s output channels by ``sc`` and multiply the linears' input columns by it.
    ``kind``: what ``prev`` computes when it is a norm (`Adapter.norm_kind`)."""
    weight = prev.weight
    bias = getattr(prev, "bias", None)
    assert isinstance(weight, Tensor)
    sc_prev = sc.to(weight.dtype)
    if isinstance(prev, nn.Linear | OutputRows) or is_conv1d(prev):  # a linear, or rows of a fused one
        linear_weight(prev).div_(sc_prev[:, None])
    elif kind == "rmsnorm_1p":  # y = (1 + weight) * x_hat: (1 + w') = (1 + w) / s
        weight.add_(1).div_(sc_prev).sub_(1)
    else:  # a norm: y = weight * x_hat (+ bias)
        weight.div_(sc_prev)
    if isinstance(bias, Tensor):
        bias.div_(sc_prev)
    for m in linears.values():
        w = linear_weight(m)
        w.mul_(sc.to(w.dtype)[None, :])


ROLES = ("awq", "norms and the layers they feed", "use gptq, rtn or hqq")  # what a generic model lacks


def apply(model: nn.Module, config: AWQConfig, ctx: Context) -> StageReport:
    adapter = Adapter(model)
    adapter.require_roles(*ROLES, QuantError)
    alphas: dict[str, float] = {}

    def per_block(i: int, layers: dict[str, nn.Module], acts: dict[str, Activations]) -> QuantizeFn:
        for prev_name, prev, group in adapter.scale_groups(i):
            searched = {n: m for n, m in group.items() if n in layers}
            if not searched:
                continue
            first = next(iter(searched))
            a = acts[first]
            assert a.abs_sum is not None
            weights = [linear_weight(m).detach().float() for m in searched.values()]
            sc, alphas[prev_name] = awq_scales(
                a.matrix(),
                a.abs_sum / a.n_tokens,
                weights,
                settings_for(first, config, weights[0].shape[1]),
                config.alpha_grid,
            )
            fold_scales(prev, group, sc, adapter.norm_kind(prev_name))  # every reader of prev's output
            for n in searched:  # the inputs these linears now see are divided by sc
                sq = acts[n].sq_sum
                acts[n].sq_sum = sq / sc.pow(2) if sq is not None else None
                acts[n].x = [x / sc for x in acts[n].x]

        def fn(name: str, module: nn.Module, s: LayerSettings) -> Quantized | ggml.GGMLBlocks:
            w = linear_weight(module).detach().float()
            sq_sum = acts[name].sq_sum
            if s.grid is not None:  # the GGUF grid fitted with activation-weighted error
                imp = sq_sum / acts[name].n_tokens if config.clip and sq_sum is not None else None
                return ggml_fit.fit_grid(w, ggml.ggml_type(s.grid), importance=imp)
            if not config.clip or sq_sum is None:
                return quantize(w, s.bits, s.group_size, s.symmetric)
            return weighted_clip(w, sq_sum / acts[name].n_tokens, s)

        return fn

    report = quantize_calibrated(
        model, config, ctx, lambda _m: Activations(config.max_tokens), per_block, config.calib_batch_size
    )
    return {**report, "alphas": alphas}


METHOD = Method(
    "awq",
    AWQConfig,
    apply,
    "AWQ: activation-aware scaling and clipping, folded into the model",
    streams=True,
    needs_roles=lambda config: ROLES,
)
