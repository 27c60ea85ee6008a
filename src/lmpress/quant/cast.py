"""``cast``: store the whole model in 16-bit (or 32-bit) floating point.

The simplest compression: halves the bytes of an fp32 model at a tiny quality cost, and the result
loads in plain ``transformers``. It casts every parameter and buffer, so the model stays one dtype;
per-layer precision belongs to the quantization methods.
"""

from __future__ import annotations

import time
from typing import Literal

import torch
from torch import nn

from lmpress.method import Context, Method, MethodConfig, StageReport

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class CastConfig(MethodConfig):
    """Cast every parameter and saved floating-point buffer to ``dtype``."""

    method: Literal["cast"] = "cast"
    dtype: Literal["float16", "bfloat16", "float32"] = "bfloat16"


def apply(model: nn.Module, config: CastConfig, ctx: Context) -> StageReport:
    t0 = time.perf_counter()
    before = {p.dtype for p in model.parameters()}
    # Non-persistent buffers (rotary inv_freq) are not saved; a reload recomputes them in float32,
    # so they keep their dtype here too and the model in memory equals the one reloaded.
    keep = [(m, n, m._buffers[n]) for m in model.modules() for n in m._non_persistent_buffers_set]
    model.to(DTYPES[config.dtype])
    for m, n, b in keep:
        m._buffers[n] = b
    if hasattr(model, "config"):
        model.config.dtype = DTYPES[config.dtype]  # type: ignore[union-attr]
    return {
        "from": sorted(str(d).removeprefix("torch.") for d in before),
        "to": config.dtype,
        "seconds": time.perf_counter() - t0,
    }


METHOD = Method("cast", CastConfig, apply, "store the whole model in float16, bfloat16 or float32", streams=True)
