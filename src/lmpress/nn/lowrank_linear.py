"""``LowRankLinear``: a linear layer stored as two thin factors, y = U (V x) + b.

Storage: ``u`` (out, rank) and ``v`` (rank, in) in the model's dtype, plus the bias; a layer is
only factorized where rank·(in + out) < in·out, so the file really shrinks. Both factors are
ordinary parameters: recovery training moves them like any dense weight.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lmpress.nn.base import CompressedLayer, layer_record, with_bias


class LowRankLinear(CompressedLayer):
    """Linear layer W ≈ U·V of rank ``rank``."""

    FORMAT = "lowrank"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.u = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))
        self.v = nn.Parameter(torch.zeros(rank, in_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_factors(cls, u: Tensor, v: Tensor, bias: Tensor | None, dtype: torch.dtype) -> LowRankLinear:
        """From (out, r) and (r, in) factors."""
        layer = cls(v.shape[1], u.shape[0], u.shape[1], bias is not None, dtype, u.device)
        layer.u.data.copy_(u)
        layer.v.data.copy_(v)
        return with_bias(layer, bias)

    @property
    def rank(self) -> int:
        return int(self.v.shape[0])

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(nn.functional.linear(x, self.v), self.u, self.bias)

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """U·V, computed in float32.  (out, in)"""
        return (self.u.float() @ self.v.float()).to(dtype)

    def num_logical_params(self) -> int:
        return self.rank * (self.in_features + self.out_features) + (self.out_features if self.bias is not None else 0)

    def lmpress_format(self) -> dict[str, Any]:
        return layer_record(self, "in_features", "out_features", "rank", bias=self.bias is not None)

    @classmethod
    def from_format(cls, fmt: dict[str, Any], dtype: torch.dtype) -> LowRankLinear:
        """An empty layer of a saved format, ready for ``load_state_dict``."""
        return cls(int(fmt["in_features"]), int(fmt["out_features"]), int(fmt["rank"]), bool(fmt["bias"]), dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
