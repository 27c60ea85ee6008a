"""`CompressedLayer`: the protocol every compressed layer follows, so that saving, loading, moving,
training and exporting treat them all alike.

A compressed layer is an ``nn.Module`` that owns its packed storage (its buffers and parameters
are exactly what the file holds) and its forward. Declaring ``class X(CompressedLayer)`` with a
``FORMAT`` name registers it in `LAYER_FORMATS`; a missing method is an error when the layer is
built, a missing or repeated ``FORMAT`` when the class is defined. What each part is for:

- saved: ``lmpress_format()`` is the layer's record in ``lmpress.json`` (``{"format": FORMAT,
  ...}``: shapes and options, enough to build it empty); its tensors are its ``state_dict``.
- loaded: ``from_format(record, dtype)`` builds the empty layer the record describes (on the meta
  device when `lmpress.io` loads), ready for ``load_state_dict``.
- moved: ``materialize()`` brings back stored tensors that only a kernel layout held, before the
  state is read or the layer moves; ``forget_kernel()`` drops a kernel layout prepared for one
  device and dtype (prepared again on the next forward; what only that layout held is gone unless
  materialized first, as when a streamed model's unit is freed and read again).
- trained and exported: ``dense_weight(dtype)`` is the weight the layer computes with, (out, in)
  for a linear layer, (vocab, dim) for an embedding.
- measured: ``num_logical_params()`` counts the weights the layer stands for.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Self

import torch
from torch import Tensor, nn

# the ``format`` a layer writes into ``lmpress.json`` -> its class (filled as the classes are defined)
LAYER_FORMATS: dict[str, type[CompressedLayer]] = {}


class CompressedLayer(nn.Module, ABC):
    """A layer stored in a compressed format (see the module's documentation)."""

    FORMAT: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("FORMAT")
        if not isinstance(name, str):
            raise TypeError(f"{cls.__name__} declares no FORMAT name")
        if name in LAYER_FORMATS:
            raise TypeError(f"{cls.__name__}: format {name!r} is already {LAYER_FORMATS[name].__name__}'s")
        LAYER_FORMATS[name] = cls

    @abstractmethod
    def lmpress_format(self) -> dict[str, Any]:
        """The layer's record in ``lmpress.json``: ``format`` (= ``FORMAT``), shapes and options."""

    @classmethod
    @abstractmethod
    def from_format(cls, fmt: dict[str, Any], dtype: torch.dtype) -> Self:
        """An empty layer of a saved record, ready for ``load_state_dict``."""

    @abstractmethod
    def dense_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight the layer computes with, decoded.  (out, in) or (vocab, dim)"""

    @abstractmethod
    def num_logical_params(self) -> int:
        """The weights (and biases) the layer stands for."""

    def forget_kernel(self) -> None:
        """Drop any kernel layout prepared for the current device and dtype (none by default)."""

    def materialize(self) -> None:
        """Bring back stored tensors held only in a kernel layout (all are stored by default)."""


def keep_scale_dtype(layer: nn.Module, apply: Any) -> Any:
    """Run ``apply`` (a module ``_apply``) but keep scales and float zeros in their stored dtype:
    ``model.to(torch.bfloat16)`` moves them with the model but must not change the format."""
    dtypes = {n: b.dtype for n in ("scales", "fzeros") if (b := getattr(layer, n, None)) is not None}
    out = apply()
    for n, dt in dtypes.items():
        setattr(layer, n, getattr(layer, n).to(dt))
    return out
