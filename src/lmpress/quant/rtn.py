"""``rtn``: round-to-nearest weight quantization, the calibration-free baseline.

Each targeted layer's weight is put on a per-group integer grid (min/max range, or the
MSE-optimal clipped range with ``mse_clip``) and stored packed in a `QuantLinear`; with ``grid``
(a GGUF block type) the scales are fitted on that type's grid and the layer stores its bytes; with
``imatrix`` (llama.cpp's importance matrix, `lmpress.quant.imatrix`) that fit weights each input
column's rounding error by its mean squared activation, as llama.cpp's quantizer does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from torch import nn

from lmpress.arch import linear_weight
from lmpress.formats import ggml
from lmpress.formats.grid import Quantized
from lmpress.method import Context, Method, StageReport
from lmpress.quant import ggml_fit
from lmpress.quant.base import LayerSettings, WeightQuantConfig, quantize_weights
from lmpress.quant.grid import quantize
from lmpress.quant.imatrix import imatrix_report, layer_importance


class RTNConfig(WeightQuantConfig):
    """Round-to-nearest weight quantization."""

    method: Literal["rtn"] = "rtn"
    mse_clip: bool = False
    imatrix: Path | None = None  # llama.cpp importance matrix (GGUF or .dat): weights the GGUF-grid fits


def apply(model: nn.Module, config: RTNConfig, ctx: Context) -> StageReport:
    importance = layer_importance(model, config.imatrix) if config.imatrix is not None else {}
    weighted: list[str] = []

    def fn(name: str, module: nn.Module, s: LayerSettings) -> Quantized | ggml.GGMLBlocks:
        if s.grid is not None:
            if name in importance:
                weighted.append(name)
            return ggml_fit.quantize(linear_weight(module).detach(), s.grid, importance.get(name))
        return quantize(linear_weight(module).detach(), s.bits, s.group_size, s.symmetric, config.mse_clip)

    report = quantize_weights(model, config, fn)
    return {**report, **imatrix_report(config.imatrix, weighted)}


METHOD = Method(
    "rtn", RTNConfig, apply, "round-to-nearest weight quantization (2-8 bits, per channel or group)", streams=True
)
