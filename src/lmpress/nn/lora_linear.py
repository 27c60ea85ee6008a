"""``LoRALinear``: a compressed layer plus a low-rank update it cannot absorb without changing.

Recovery training may learn a LoRA update B·A (Hu et al. 2021, arXiv:2106.09685) on top of a
quantized layer. Folding it into the weights would re-round them and change the codes; kept beside
them, the codes stay exactly as the quantizer left them and the update costs r·(in + out) numbers.

Storage: the base layer's own tensors under ``base.``, then ``lora_a`` (r, in) and ``lora_b``
(out, r) in the model's dtype. Forward: base(x) + (x Aᵀ) Bᵀ.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lmpress.nn.base import LAYER_FORMATS, CompressedLayer, dtype_name


def tensor_device(module: nn.Module) -> torch.device:
    """Where a layer's tensors are: the first one that holds data (a quantized layer whose codes
    live only in its kernel layout keeps a meta placeholder as its first buffer)."""
    tensors = (*module.parameters(), *module.buffers())
    return next((t.device for t in tensors if not t.is_meta), torch.device("cpu"))


class LoRALinear(CompressedLayer):
    """A (compressed) linear layer with a separate low-rank update."""

    FORMAT = "lora"
    lora_a: Tensor
    lora_b: Tensor

    def __init__(self, base: nn.Module, rank: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = int(base.in_features), int(base.out_features)  # type: ignore[arg-type]
        device = tensor_device(base)
        self.register_buffer("lora_a", torch.zeros(rank, self.in_features, dtype=dtype, device=device))
        self.register_buffer("lora_b", torch.zeros(self.out_features, rank, dtype=dtype, device=device))

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[0])

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + (x @ self.lora_a.T.to(x.dtype)) @ self.lora_b.T.to(x.dtype)

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The base layer's weight plus B·A, computed in float32.  (out, in)"""
        if not isinstance(self.base, CompressedLayer):
            raise TypeError(f"LoRALinear base {type(self.base).__name__} is not a compressed layer")
        return (self.base.dense_weight() + self.lora_b.float() @ self.lora_a.float()).to(dtype)

    def num_logical_params(self) -> int:
        """The update's own numbers; the base layer counts itself."""
        return self.rank * (self.in_features + self.out_features)

    def lmpress_format(self) -> dict[str, Any]:
        if not isinstance(self.base, CompressedLayer):
            raise TypeError(f"LoRALinear base {type(self.base).__name__} has no saved format")
        return {
            "format": self.FORMAT,
            "rank": self.rank,
            "dtype": dtype_name(self.lora_a.dtype),
            "base": self.base.lmpress_format(),
        }

    @classmethod
    def from_format(cls, fmt: dict[str, Any], dtype: torch.dtype) -> LoRALinear:
        """An empty layer of a saved format, ready for ``load_state_dict``."""
        base_fmt = fmt["base"]
        base = LAYER_FORMATS[base_fmt["format"]].from_format(base_fmt, dtype)
        return cls(base, int(fmt["rank"]), getattr(torch, fmt.get("dtype") or "float32"))

    def forget_kernel(self) -> None:
        if isinstance(self.base, CompressedLayer):
            self.base.forget_kernel()

    def materialize(self) -> None:
        if isinstance(self.base, CompressedLayer):
            self.base.materialize()

    def extra_repr(self) -> str:
        return f"rank={self.rank}"
