"""``QuantExperts``: a mixture of experts' expert weights stored as packed integer codes, one grid
per expert, run as transformers' experts module runs them.

It replaces an experts module that holds its experts as fused 3-D parameters (`lmpress.arch.spec.
Experts`: Qwen3-MoE, Mixtral, OLMoE, Qwen2-MoE): ``gate_up`` (E, 2·I, H) with rows [gate | up] and
``down`` (E, H, I). Storage (what ``state_dict`` and the saved file hold), for each of ``gate_up``
and ``down`` (``P``), with ``out``/``in`` its matrix's rows and columns:

- ``P_qweight`` (E, out, packed_width(in, bits)) uint8: codes packed as `QuantLinear` packs them.
- ``P_scales`` (E, out, groups) float16 (or bfloat16).
- ``P_qzeros`` (E, out, packed_width(groups, bits)) uint8 integer zero points (asymmetric), or
  ``P_fzeros`` (E, out, groups) fractional ones (HQQ); symmetric grids store neither.

Forward ``(hidden (T, H), top_k_index (T, k), top_k_weights (T, k)) -> (T, H)``: the eager loop of
transformers' experts modules, op for op: for each expert some token is routed to, its two matrices
are dequantized (only that expert's) and ``down(act(gate x) * up x)`` weighted by the router is
added into the tokens' rows. It is exact: the same numbers as the dense module holding
``dense_tensors()``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers.activations import ACT2FN

from lmpress.formats.grid import Quantized, dequantize, n_groups
from lmpress.formats.packing import decode_codes, decode_zeros, encode_codes, pack, packed_width
from lmpress.nn.base import CompressedLayer, dtype_name, layer_record

PROJECTIONS = ("gate_up", "down")


class QuantExperts(CompressedLayer):
    """Experts (E gated MLPs of width I over hidden H) with packed per-expert codes and scales."""

    FORMAT = "quant_experts"

    def __init__(
        self,
        num_experts: int,
        hidden: int,
        intermediate: int,
        bits: int,
        group_size: int | None,
        symmetric: bool,
        act: str,
        scale_dtype: torch.dtype = torch.float16,
        float_zeros: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.num_experts, self.hidden, self.intermediate = num_experts, hidden, intermediate
        self.bits, self.group_size, self.symmetric, self.act = bits, group_size, symmetric, act
        self.float_zeros = float_zeros and not symmetric
        self.act_fn = ACT2FN[act]
        for p, (out_f, in_f) in self.shapes().items():
            G = n_groups(in_f, group_size)
            q = torch.zeros(num_experts, out_f, packed_width(in_f, bits), dtype=torch.uint8, device=device)
            self.register_buffer(f"{p}_qweight", q)
            self.register_buffer(f"{p}_scales", torch.ones(num_experts, out_f, G, dtype=scale_dtype, device=device))
            qzeros = fzeros = None
            if self.float_zeros:
                fzeros = torch.zeros(num_experts, out_f, G, dtype=scale_dtype, device=device)
            elif not symmetric:
                qzeros = torch.zeros(num_experts, out_f, packed_width(G, bits), dtype=torch.uint8, device=device)
            self.register_buffer(f"{p}_qzeros", qzeros)  # None buffers are not saved
            self.register_buffer(f"{p}_fzeros", fzeros)

    def shapes(self) -> dict[str, tuple[int, int]]:
        """Each projection's (out, in) matrix shape per expert."""
        return {"gate_up": (2 * self.intermediate, self.hidden), "down": (self.hidden, self.intermediate)}

    @classmethod
    def from_quantized(
        cls,
        experts: dict[str, list[Quantized]],
        symmetric: bool,
        act: str,
        scale_dtype: torch.dtype = torch.float16,
        float_zeros: bool = False,
    ) -> QuantExperts:
        """The layer of each expert's codes: ``experts["gate_up"][e]`` (2·I, H), ``experts["down"][e]`` (H, I)."""
        first = experts["gate_up"][0]
        (two_i, hidden), E = first.codes.shape, len(experts["gate_up"])
        layer = cls(
            E,
            hidden,
            two_i // 2,
            first.bits,
            first.group_size,
            symmetric,
            act,
            scale_dtype,
            float_zeros,
            first.codes.device,
        )
        for p in PROJECTIONS:
            for e, q in enumerate(experts[p]):
                layer.get_buffer(f"{p}_qweight")[e].copy_(encode_codes(q.codes, q.bits, symmetric))
                layer.get_buffer(f"{p}_scales")[e].copy_(q.scales.to(scale_dtype))
                if layer.float_zeros:
                    layer.get_buffer(f"{p}_fzeros")[e].copy_(q.zeros.to(scale_dtype))
                elif not symmetric:
                    layer.get_buffer(f"{p}_qzeros")[e].copy_(pack(q.zeros.round().to(torch.uint8), q.bits))
        return layer

    # ---- storage ------------------------------------------------------------------------------

    def expert_weight(self, p: str, e: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """Expert ``e``'s ``p`` matrix ("gate_up" or "down") decoded.  (out, in)"""
        in_f = self.shapes()[p][1]
        scales = self.get_buffer(f"{p}_scales")[e]
        qz, fz = getattr(self, f"{p}_qzeros"), getattr(self, f"{p}_fzeros")
        shape = (int(scales.shape[0]), int(scales.shape[1]))
        zeros = decode_zeros(
            None if qz is None else qz[e], None if fz is None else fz[e], self.bits, shape, scales.device
        )
        codes = decode_codes(self.get_buffer(f"{p}_qweight")[e], self.bits, in_f, self.symmetric)
        return dequantize(codes, scales, zeros, self.group_size, dtype)

    def dense_tensors(self, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """Every expert decoded, as the dense module stores them: ``gate_up`` (E, 2·I, H), ``down`` (E, H, I)."""
        return {p: torch.stack([self.expert_weight(p, e, dtype) for e in range(self.num_experts)]) for p in PROJECTIONS}

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The stacked [gate | up] matrices of every expert (the down ones: `dense_tensors`).  (E, 2·I, H)"""
        return self.dense_tensors(dtype)["gate_up"]

    def num_logical_params(self) -> int:
        return self.num_experts * 3 * self.hidden * self.intermediate

    def lmpress_format(self) -> dict[str, Any]:
        return layer_record(
            self,
            *("num_experts", "hidden", "intermediate", "bits", "group_size", "symmetric", "act"),
            scale_dtype=dtype_name(self.get_buffer("gate_up_scales").dtype),
            float_zeros=self.float_zeros,
        )

    @classmethod
    def from_format(cls, fmt: dict[str, Any], dtype: torch.dtype) -> QuantExperts:
        """An empty layer of a saved record, ready for ``load_state_dict`` (``dtype``: the model's,
        which the layer takes from its input)."""
        sizes = (fmt["num_experts"], fmt["hidden"], fmt["intermediate"])
        grid = (fmt["bits"], fmt["group_size"], fmt["symmetric"], fmt["act"])
        return cls(*sizes, *grid, getattr(torch, fmt["scale_dtype"]), fmt["float_zeros"])

    def _apply(self, fn: Any, recurse: bool = True) -> QuantExperts:
        scales = {n: b.dtype for n, b in self._buffers.items() if b is not None and b.is_floating_point()}
        out = super()._apply(fn, recurse)
        for n, dt in scales.items():  # model.to(bfloat16) must not change the stored format
            self._buffers[n] = self.get_buffer(n).to(dt)
        return out

    # ---- forward ------------------------------------------------------------------------------

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        """transformers' eager experts loop, each routed expert's weights dequantized on its turn.
        hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k).  -> (T, H)"""
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)  # (E+1, k, T)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        dtype = hidden_states.dtype
        for e in hit[:, 0].tolist():
            if e == self.num_experts:
                continue
            top_k_pos, token_idx = torch.where(mask[e])
            x = hidden_states[token_idx]  # (t, H)
            gate, up = nn.functional.linear(x, self.expert_weight("gate_up", e, dtype)).chunk(2, dim=-1)
            h = nn.functional.linear(self.act_fn(gate) * up, self.expert_weight("down", e, dtype))  # (t, H)
            h = h * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, h.to(final.dtype))
        return final

    @property
    def kind(self) -> str:
        """How a stage report counts it: ``experts w4g32``."""
        return f"experts w{self.bits}g{self.group_size or 'row'}"

    def extra_repr(self) -> str:
        sym = "sym" if self.symmetric else "asym"
        return (
            f"experts={self.num_experts}, hidden={self.hidden}, intermediate={self.intermediate}, "
            f"bits={self.bits}, group={self.group_size}, {sym}, act={self.act}"
        )
