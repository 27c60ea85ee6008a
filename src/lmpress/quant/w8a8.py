"""``w8a8``: int8 weights and dynamic per-token int8 activations, with SmoothQuant smoothing.

Activations of LLMs have a few outlier channels that make per-token int8 rounding coarse.
SmoothQuant (Xiao et al. 2022, arXiv:2211.10438) moves that difficulty into the weights: per input
channel j, s_j = max|X_j|^α / max|W_j|^(1-α); the previous op's outputs are divided by s and the
weights' columns multiplied by it (folded exactly, as AWQ does), then weights are rounded to int8
per output channel and, at run time, each token's activations to int8. The product runs in int32
on ``torch._int_mm``, so prefill is faster than a 16-bit matmul.
"""

from __future__ import annotations

import time
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from lmpress.arch import Adapter, linear_weight
from lmpress.calib import SquareNorm, blockwise, collect
from lmpress.method import Context, Method, MethodConfig, StageReport
from lmpress.quant.awq import fold_scales
from lmpress.quant.base import QuantError, replace_module, targeted_layers, to_quant_linear, units_of
from lmpress.quant.grid import quantize
from lmpress.select import Patterns
from lmpress.streaming import each_block, resident


class W8A8Config(MethodConfig):
    """int8 weights (per channel, symmetric) x int8 activations (per token, dynamic)."""

    method: Literal["w8a8"] = "w8a8"
    smooth_alpha: float | None = Field(0.5, ge=0, le=1)  # None: no smoothing
    targets: Patterns = ["re:.*"]
    ignore: Patterns = ["lm_head"]
    calib_batch_size: int = Field(8, ge=1)


def smooth_scales(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^α / max|W_j|^(1-α) (SmoothQuant eq. 4).  (in,)"""
    return (act_max.clamp(min=1e-5).pow(alpha) / weight_max.clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)


ROLES = ("w8a8 with smooth_alpha", "norms and the layers they feed", "set smooth_alpha: null")


def apply(model: nn.Module, config: W8A8Config, ctx: Context) -> StageReport:
    t0 = time.perf_counter()
    targets = list(targeted_layers(model, config))  # names only: replaced layers are freed
    smoothed: list[str] = []
    if config.smooth_alpha is not None:
        adapter = Adapter(model)
        adapter.require_roles(*ROLES, QuantError)
        calib = ctx.calib_data()
        for i, block, inputs in blockwise(model, calib.windows, config.calib_batch_size, ctx.progress):
            # smooth a group if any of its readers is quantized; fold into all of them
            groups = [g for g in adapter.scale_groups(i) if any(n in targets for n in g[2])]
            if not groups:
                continue
            firsts = {next(iter(g)): next(iter(g.values())) for _, _, g in groups}
            stats = collect(
                block, inputs, firsts, lambda m: SquareNorm.empty(linear_weight(m).shape[1], linear_weight(m).device)
            )
            for prev_name, prev, group in groups:
                st = stats[next(iter(group))]
                if st.n_tokens == 0:
                    raise QuantError(f"layers after {prev_name} received no calibration tokens")
                w_max = torch.stack([linear_weight(m).detach().abs().amax(0).float() for m in group.values()]).amax(0)
                fold_scales(
                    prev, group, smooth_scales(st.abs_max, w_max, config.smooth_alpha), adapter.norm_kind(prev_name)
                )
                smoothed.append(prev_name)

    def store(names: list[str]) -> None:
        for name in names:
            module = model.get_submodule(name)
            w = linear_weight(module).detach()
            if not torch.isfinite(w).all():
                raise QuantError(f"layer {name}: weight has non-finite values after smoothing; lower smooth_alpha")
            q = quantize(w, 8, None, symmetric=True)
            replace_module(model, name, to_quant_linear(name, module, q, True, "float16", act_bits=8))

    adapter = Adapter(model)
    in_blocks: set[str] = set()
    for i, _ in each_block(model):  # a streamed model: one block in memory at a time
        in_blocks.update(adapter.block_linears(i))
        store([n for n in adapter.block_linears(i) if n in targets])
    rest = [n for n in targets if n not in in_blocks]
    if rest:
        with resident(model, units_of(model, rest), changed=True):
            store(rest)
    return {"layers": {"w8a8": len(targets)}, "smoothed": smoothed, "quantize_seconds": time.perf_counter() - t0}


METHOD = Method(
    "w8a8",
    W8A8Config,
    apply,
    "int8 weights x dynamic int8 activations (SmoothQuant), int8 matmul",
    streams=True,
    needs_roles=lambda config: ROLES if config.smooth_alpha is not None else None,
)
