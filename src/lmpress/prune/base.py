"""What the unstructured / N:M pruners share: the config, sparsity allocation and the layer loop.

A method supplies one function that, given a layer's (out, in) weight, its calibration statistics
(if it uses any) and its sparsity, returns the new weight and the keep-mask (and, for SparseGPT
with joint quantization, the codes). This module picks the targeted layers, allocates sparsity
(uniform, one global magnitude threshold, or outlier-weighted per block), runs the calibration
driver block by block so each block is pruned on the outputs of the already-pruned blocks, and
finally stores each layer as a `SparseLinear` holding only the kept weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from lmpress.arch import Adapter, linear_weight
from lmpress.calib import SquareNorm, blockwise, collect
from lmpress.formats.grid import Quantized
from lmpress.method import Context, MethodConfig, StageReport
from lmpress.nn.sparse_linear import SparseLinear
from lmpress.prune.masks import (
    PruneError,
    check_nm,
    global_threshold,
    outlier_ratio,
    owl_sparsities,
    parse_pattern,
)
from lmpress.quant.base import check_finite, replace_module, targeted_layers
from lmpress.select import Patterns


class PruneConfig(MethodConfig):
    """Fields shared by the weight pruners."""

    sparsity: float = Field(0.5, ge=0, lt=1)  # share of the targeted weights removed (unstructured)
    pattern: str = "unstructured"  # or "N:M": keep N of every M consecutive input weights ("2:4")
    # uniform: every layer at `sparsity`; owl: outlier-weighted per block (more outliers, fewer
    # pruned; same total); global: one magnitude threshold over all targeted layers (magnitude only)
    allocation: Literal["uniform", "owl", "global"] = "uniform"
    owl_lambda: float = Field(0.08, ge=0, lt=1)  # OWL: sparsities span sparsity ± owl_lambda
    owl_m: float = Field(5.0, gt=0)  # OWL: a score is an outlier above owl_m × the layer's mean
    targets: Patterns = ["re:.*"]
    ignore: Patterns = ["lm_head"]
    storage: Literal["sparse", "dense"] = "sparse"  # dense: keep zeros in ordinary layers
    # calibrate each layer on the outputs of the already-pruned layers before it in the block
    # (q/k/v, then the attention output, the MLP inputs, the MLP output), not on dense ones
    sequential: bool = True
    calib_batch_size: int = Field(8, ge=1)

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        parse_pattern(v)
        return v


@dataclass
class Pruned:
    """One layer's result: the new (out, in) weight, its keep-mask, and codes if quantized too."""

    weight: Tensor
    mask: Tensor
    q: Quantized | None = None
    symmetric: bool = False


# (name, module, stats or None, sparsity) -> Pruned
PruneFn = Callable[[str, nn.Module, Any, float], Pruned]


def block_of(name: str, adapter: Adapter) -> int | None:
    prefix = adapter.spec.blocks + "."
    if not name.startswith(prefix):
        return None
    return int(name[len(prefix) :].split(".", 1)[0])


def allocate(model: nn.Module, config: PruneConfig, layers: dict[str, nn.Module], ctx: Context) -> dict[str, float]:
    """Each targeted layer's sparsity. N:M patterns fix it at 1 - N/M."""
    nm = parse_pattern(config.pattern)
    if nm is not None:
        if config.allocation != "uniform":
            raise PruneError(f"allocation {config.allocation} needs an unstructured pattern, not {config.pattern}")
        for name, m in layers.items():
            check_nm(name, linear_weight(m).shape[1], nm)
        return dict.fromkeys(layers, 1 - nm[0] / nm[1])
    if config.allocation == "uniform":
        return dict.fromkeys(layers, config.sparsity)
    if config.allocation == "global":
        if config.method != "magnitude":
            raise PruneError(
                f"allocation global compares magnitudes across layers; use it with magnitude, not {config.method}"
            )
        t = global_threshold([linear_weight(m).detach().abs() for m in layers.values()], config.sparsity)
        return {n: float((linear_weight(m).detach().abs() <= t).float().mean()) for n, m in layers.items()}
    return _owl(model, config, layers, ctx)


@torch.no_grad()
def _owl(model: nn.Module, config: PruneConfig, layers: dict[str, nn.Module], ctx: Context) -> dict[str, float]:
    """OWL: one pass of the dense model over the calibration data measures each block's share of
    outlier Wanda scores; blocks with more outliers are pruned less."""
    adapter = Adapter(model)
    ratios: dict[int, float] = {}
    sizes: dict[int, int] = {}
    for i, block, inputs in blockwise(model, ctx.calib_data().windows, config.calib_batch_size, ctx.progress):
        mine = {n: m for n, m in adapter.block_linears(i).items() if n in layers}
        if not mine:
            continue
        stats = collect(
            block, inputs, mine, lambda m: SquareNorm.empty(linear_weight(m).shape[1], linear_weight(m).device)
        )
        scores = [
            (linear_weight(m).detach().float().abs() * stats[n].mean_sq.sqrt()[None, :]).reshape(-1)
            for n, m in mine.items()
        ]
        ratios[i] = outlier_ratio(torch.cat(scores), config.owl_m)
        sizes[i] = sum(s.numel() for s in scores)
    blocks = sorted(ratios)
    per_block = dict(
        zip(
            blocks,
            owl_sparsities([ratios[b] for b in blocks], [sizes[b] for b in blocks], config.sparsity, config.owl_lambda),
            strict=True,
        )
    )
    return {n: per_block.get(block_of(n, adapter), config.sparsity) for n in layers}  # type: ignore[arg-type]


def _store(model: nn.Module, name: str, module: nn.Module, result: Pruned, config: PruneConfig) -> None:
    w = linear_weight(module)
    if not torch.isfinite(result.weight).all():
        raise PruneError(f"layer {name}: non-finite weights after pruning; raise damp or exclude the layer")
    if config.storage == "dense" or result.mask.all():
        w.data.copy_((result.weight * result.mask).to(w.dtype))
        return
    bias = getattr(module, "bias", None)
    bias = bias.detach().to(w.dtype) if isinstance(bias, Tensor) else None
    layer = SparseLinear.from_dense(
        result.weight.to(w.dtype), result.mask, bias, config.pattern, result.q, result.symmetric
    )
    replace_module(model, name, layer)


def densify_sparse(model: nn.Module) -> int:
    """Turn unquantized `SparseLinear` layers back into ``nn.Linear`` with zeros where pruned, so a
    following pruning stage (gradual pruning, or N:M on top of unstructured) can prune further;
    pruned weights score zero and stay pruned under magnitude and Wanda."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, SparseLinear) and m.bits is None]
    for name, m in found:
        assert m.values is not None
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=m.values.dtype)
        lin.weight.data.copy_(m.dense_weight(m.values.dtype))
        if m.bias is not None:
            lin.bias.data.copy_(m.bias.detach())
        replace_module(model, name, lin)
    return len(found)


def sequential_groups(adapter: Adapter, i: int) -> list[dict[str, nn.Module]]:
    """Block i's linears in the order their inputs become available: q/k/v, the attention output,
    the MLP inputs, the MLP output. A model without a spec: one group (their order is unknown)."""
    if adapter.spec.generic:
        return [adapter.block_linears(i)]
    attn, mlp = list(adapter.attention_linears(i).items()), list(adapter.mlp_linears(i).items())
    return [dict(g) for g in (attn[:-1], attn[-1:], mlp[:-1], mlp[-1:]) if g]


def prune_model(
    model: nn.Module,
    config: PruneConfig,
    ctx: Context,
    fn: PruneFn,
    make_stats: Callable[[nn.Module], Any] | None = None,
    min_tokens: Callable[[nn.Module], int] | None = None,
) -> StageReport:
    """Prune every targeted layer with ``fn``. With ``make_stats`` the layers inside the decoder
    blocks are pruned block by block on calibration data; layers outside them (a targeted head) and
    calibration-free methods get ``stats=None``. Layers are rewritten in place during the pass and
    converted to `SparseLinear` at the end."""
    t0 = time.perf_counter()
    densify_sparse(model)  # gradual pruning: a later, higher-sparsity stage re-prunes earlier output
    layers = targeted_layers(model, config)
    for name, m in layers.items():
        check_finite(name, linear_weight(m))
    sparsity = allocate(model, config, layers, ctx)
    results: dict[str, Pruned] = {}
    calib_tokens = 0
    if make_stats is not None:
        adapter = Adapter(model)
        calib = ctx.calib_data()
        calib_tokens = calib.windows.numel()
        for i, block, inputs in blockwise(model, calib.windows, config.calib_batch_size, ctx.progress):
            groups = sequential_groups(adapter, i) if config.sequential else [adapter.block_linears(i)]
            for group in groups:
                mine = {n: m for n, m in group.items() if n in layers}
                if not mine:
                    continue
                stats = collect(block, inputs, mine, make_stats)  # inputs from the already-pruned layers
                for name, m in mine.items():
                    need = min_tokens(m) if min_tokens else 1
                    if stats[name].n_tokens < need:
                        raise PruneError(
                            f"layer {name} saw {stats[name].n_tokens} calibration tokens; {config.method} needs "
                            f"at least {need}: give more calibration text"
                        )
                    r = fn(name, m, stats[name], sparsity[name])
                    linear_weight(m).data.copy_((r.weight * r.mask).to(linear_weight(m).dtype))  # later layers see it
                    results[name] = r
    for name, m in layers.items():
        if name not in results:
            results[name] = fn(name, m, None, sparsity[name])
    kept = removed = 0
    for name, r in results.items():
        _store(model, name, layers[name], r, config)
        kept += int(r.mask.sum())
        removed += int((~r.mask).sum())
    return {
        "layers": len(results),
        "pattern": config.pattern,
        "sparsity": removed / max(kept + removed, 1),
        "layer_sparsity": {n: round(1 - float(r.mask.float().mean()), 4) for n, r in results.items()},
        "calib_tokens": calib_tokens,
        "prune_seconds": time.perf_counter() - t0,
    }
