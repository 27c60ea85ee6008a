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

What several layers write alike is here once: a record from attributes (`layer_record`), a bias
copied in (`with_bias`), a dense matrix's count (`dense_params`), and everything an embedding
table derives from its rows (`EmbeddingTable`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, Self, TypeVar

import torch
from torch import Tensor, nn

# the ``format`` a layer writes into ``lmpress.json`` -> its class (filled as the classes are defined)
LAYER_FORMATS: dict[str, type[CompressedLayer]] = {}
M = TypeVar("M", bound=nn.Module)


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

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.forget_kernel()  # prepared from the tensors the load replaces
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn: Any, recurse: bool = True) -> Self:
        self.materialize()
        self.forget_kernel()  # device or dtype may change: prepare again
        return super()._apply(fn, recurse)


def keep_scale_dtype(layer: nn.Module, apply: Any) -> Any:
    """Run ``apply`` (a module ``_apply``) but keep scales and float zeros in their stored dtype:
    ``model.to(torch.bfloat16)`` moves them with the model but must not change the format."""
    dtypes = {n: b.dtype for n in ("scales", "fzeros") if (b := getattr(layer, n, None)) is not None}
    out = apply()
    for n, dt in dtypes.items():
        setattr(layer, n, getattr(layer, n).to(dt))
    return out


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``: a dtype as a record writes it."""
    return str(dtype).removeprefix("torch.")


def layer_record(layer: CompressedLayer, *names: str, **values: Any) -> dict[str, Any]:
    """A layer's record: ``{"format": FORMAT}``, then the attributes ``names``, then ``values``, in order."""
    return {"format": layer.FORMAT, **{n: getattr(layer, n) for n in names}, **values}


def with_bias(layer: M, bias: Tensor | None) -> M:
    """``layer`` (built with a bias exactly where ``bias`` is given) with ``bias`` copied in."""
    if bias is not None:
        layer.get_parameter("bias").data.copy_(bias.detach())
    return layer


def dense_params(in_features: int, out_features: int, bias: bool, tied: bool = False) -> int:
    """The weights and bias of a dense (out, in) linear layer; a head tied to the embeddings
    (``tied``) stands for its bias only: its weights are the embeddings'."""
    bias_params = out_features if bias else 0
    return bias_params if tied else in_features * out_features + bias_params


# an `EmbeddingTable` is mixed into a `CompressedLayer`; the type checker sees it as one
if TYPE_CHECKING:
    _Layer = CompressedLayer
else:
    _Layer = object


class EmbeddingTable(_Layer):
    """What the compressed embeddings share: a lookup, the whole table and the weights counted
    all come from the format's own ``_rows``; ``model.to(dtype)`` changes the table's dtype
    (``out_dtype``), never the stored scales'."""

    num_embeddings: int
    embedding_dim: int
    out_dtype: torch.dtype

    @abstractmethod
    def _rows(self, ids: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """Decoded rows for flat ``ids`` (n,), in ``dtype`` (the table's by default).  -> (n, dim)"""

    @property
    def weight(self) -> Tensor:
        """The whole table decoded (for code that reads ``embed.weight``).  (vocab, dim)"""
        return self.dense_weight(self.out_dtype)

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The whole table decoded, in ``dtype``.  (vocab, dim)"""
        return self._rows(torch.arange(self.num_embeddings, device=next(self.buffers()).device), dtype)

    def forward(self, ids: Tensor) -> Tensor:
        return self._rows(ids.reshape(-1)).view(*ids.shape, self.embedding_dim)

    def num_logical_params(self) -> int:
        return self.num_embeddings * self.embedding_dim

    def _apply(self, fn: Any, recurse: bool = True) -> Self:
        self.out_dtype = fn(torch.empty(0, dtype=self.out_dtype)).dtype  # what .to() does to float tensors
        return keep_scale_dtype(self, lambda: super(EmbeddingTable, self)._apply(fn, recurse))  # type: ignore[no-any-return]
