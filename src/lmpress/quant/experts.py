"""A mixture of experts' experts for the weight quantizers: which experts modules a stage targets,
each expert's matrices as the (out, in) weights a quantizer takes, and the packed `QuantExperts`
that replaces the module.

The quantizers walk linears; an experts module holds its experts as 3-D parameters
(`lmpress.arch.spec.Experts`), so the walk asks for them apart (`targeted_experts`) and hands each
expert's matrix to the method's own per-layer function as if it were a linear (`Matrix`): RTN and
HQQ quantize experts with no other change. Methods that calibrate on a layer's inputs (GPTQ, AWQ)
need the tokens routed to each expert, which the calibration driver does not collect yet: they
refuse experts in one line (`refuse_calibrated`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lmpress.arch import Adapter, has_spec, replace_module
from lmpress.errors import LmpressError
from lmpress.formats.grid import Quantized
from lmpress.nn.quant_experts import PROJECTIONS, QuantExperts
from lmpress.select import select


class Matrix(nn.Module):
    """One expert's (out, in) matrix, shaped as a linear for a quantizer's per-layer function."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.weight = weight


def all_experts(model: nn.Module) -> dict[str, nn.Module]:
    """Full name -> experts module of every block that has one (none for a model without a spec)."""
    if not has_spec(getattr(model, "config", None)):
        return {}
    adapter = Adapter(model)
    return {n: m for i in range(adapter.num_blocks) for n, m in adapter.experts(i).items()}


def float_modules(model: nn.Module) -> set[str]:
    """Names of the modules every method keeps in float (routers: `Adapter.float_modules`)."""
    if getattr(model, "config", None) is None:
        return set()
    try:  # a model without a spec: its routers, found by structure
        return Adapter(model).float_modules()
    except LmpressError:  # no decoder blocks to read
        return set()


def targeted_experts(model: nn.Module, config: Any) -> list[str]:
    """Names of the experts modules a stage's ``targets`` minus ``ignore`` match."""
    return list(select(all_experts(model), config.targets, config.ignore))


def refuse_calibrated(model: nn.Module, config: Any, error: type[LmpressError]) -> None:
    """One line for a calibrated quantizer whose targets take in experts (issue 32: per-expert routed
    calibration is not there yet); nothing where the recipe leaves them out with ``ignore``."""
    names = targeted_experts(model, config)
    if names:
        what = config.method.upper()
        raise error(
            f"{what} on experts needs expert-aware calibration (issue 32); use rtn or hqq for the experts "
            f"({names[0]} ...), or leave them out of this stage with ignore: ['re:.*\\.experts$']"
        )


def expert_matrices(model: nn.Module, name: str) -> dict[str, list[Tensor]]:
    """Each expert's matrices of the experts module ``name``, as (out, in): ``gate_up`` (2·I, H)
    rows [gate | up] and ``down`` (H, I). A layout `QuantExperts` does not run is refused."""
    spec = Adapter(model).spec.experts
    assert spec is not None
    if not spec.fused or spec.transposed:
        raise LmpressError(
            f"{name}: experts stored {'transposed' if spec.transposed else 'with gate and up apart'} cannot be "
            "quantized yet (issue 32); leave them out with ignore: ['re:.*\\.experts$']"
        )
    module = model.get_submodule(name)
    stacks = {"gate_up": module.get_parameter(spec.gate_up), "down": module.get_parameter(spec.down)}
    return {p: [w.detach()[e] for e in range(w.shape[0])] for p, w in stacks.items()}


def quantize_experts(
    model: nn.Module,
    name: str,
    fn: Callable[[str, nn.Module, Any], Any],
    settings_for: Callable[[str, Any, int], Any],
    config: Any,
    float_zeros: bool,
) -> dict[str, int]:
    """Replace experts module ``name`` with its `QuantExperts`: each expert's matrix (``name.gate_up.3``:
    expert 3's [gate | up]) quantized by a quantizer's per-layer ``fn`` as a linear (`Matrix`) with
    the ``settings_for(matrix name, config, in_features)`` that apply to it. -> {"experts w4g32": 1}"""
    parts: dict[str, list[Quantized]] = {p: [] for p in PROJECTIONS}
    symmetric = False
    for p, weights in expert_matrices(model, name).items():
        for e, w in enumerate(weights):
            if not torch.isfinite(w).all():
                raise LmpressError(f"{name}: expert {e}'s {p} has non-finite values; fix or ignore the experts")
            s = settings_for(f"{name}.{p}.{e}", config, w.shape[1])
            q = fn(f"{name}.{p}.{e}", Matrix(w), s)
            if not isinstance(q, Quantized):
                raise LmpressError(f"{name}: experts on a GGUF grid are not supported yet (issue 32); drop grid/mix")
            if not (torch.isfinite(q.scales).all() and torch.isfinite(q.zeros).all()):
                raise LmpressError(f"{name}: non-finite scales after quantization; check the experts' weights")
            parts[p].append(q)
            symmetric = s.symmetric
    first = parts["gate_up"][0]
    if any((q.bits, q.group_size) != (first.bits, first.group_size) for qs in parts.values() for q in qs):
        raise LmpressError(f"{name}: every expert matrix of one module needs the same bits and group size")
    act = str(getattr(model.config, "hidden_act", "silu"))
    layer = QuantExperts.from_quantized(parts, symmetric, act, getattr(torch, config.scale_dtype), float_zeros)
    replace_module(model, name, layer)
    return {layer.kind: 1}
