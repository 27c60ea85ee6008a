"""``QuantEmbedding``: an embedding table stored as packed integer codes, one grid per row group.

The embeddings are about a third of a small model and most toolkits leave them in 16 bits. Rows
are quantized like a `QuantLinear` weight (each row split into groups of ``group_size`` columns);
a lookup gathers only the packed rows it needs and dequantizes them, so the full table is never
materialized in floating point.

Storage: ``qweight`` (vocab, packed_width(dim, bits)) uint8, ``scales`` (vocab, groups) float16,
``qzeros`` packed zero points (asymmetric) or none (symmetric).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lmpress.formats.grid import Quantized, dequantize, n_groups
from lmpress.formats.packing import decode_codes, decode_zeros, encode_codes, pack, packed_width
from lmpress.nn.base import CompressedLayer, EmbeddingTable, dtype_name, layer_record


class QuantEmbedding(EmbeddingTable, CompressedLayer):
    """Embedding lookup over packed integer codes with per-row-group scales and zero points."""

    FORMAT = "quant_embedding"
    qweight: Tensor
    scales: Tensor
    qzeros: Tensor | None

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        bits: int,
        group_size: int | None,
        symmetric: bool,
        dtype: torch.dtype = torch.float32,
        scale_dtype: torch.dtype = torch.float16,
        padding_idx: int | None = None,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.padding_idx = padding_idx
        self.out_dtype = dtype  # follows model.to(dtype): `EmbeddingTable._apply`
        G = n_groups(embedding_dim, group_size)
        self.register_buffer(
            "qweight", torch.zeros(num_embeddings, packed_width(embedding_dim, bits), dtype=torch.uint8)
        )
        self.register_buffer("scales", torch.ones(num_embeddings, G, dtype=scale_dtype))
        zeros = None if symmetric else torch.zeros(num_embeddings, packed_width(G, bits), dtype=torch.uint8)
        self.register_buffer("qzeros", zeros)

    @classmethod
    def from_quantized(
        cls, q: Quantized, symmetric: bool, dtype: torch.dtype, scale_dtype: torch.dtype, padding_idx: int | None = None
    ) -> QuantEmbedding:
        V, D = q.codes.shape
        layer = cls(V, D, q.bits, q.group_size, symmetric, dtype, scale_dtype, padding_idx)
        layer.to(q.codes.device)
        layer.qweight.copy_(encode_codes(q.codes, q.bits, symmetric))
        layer.scales.copy_(q.scales.to(scale_dtype))
        if layer.qzeros is not None:
            layer.qzeros.copy_(pack(q.zeros.round().to(torch.uint8), q.bits))
        return layer

    def _rows(self, ids: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """Dequantized rows for flat ``ids`` (n,), in ``dtype`` (the table's by default).  -> (n, dim)"""
        codes = decode_codes(self.qweight[ids], self.bits, self.embedding_dim, self.symmetric)
        qzeros = self.qzeros[ids] if self.qzeros is not None else None
        zeros = decode_zeros(qzeros, None, self.bits, (ids.numel(), self.scales.shape[1]), ids.device)
        return dequantize(codes, self.scales[ids], zeros, self.group_size, dtype or self.out_dtype)

    def lmpress_format(self) -> dict[str, Any]:
        names = ("bits", "group_size", "symmetric", "num_embeddings", "embedding_dim", "padding_idx")
        return layer_record(self, *names, dtype=dtype_name(self.out_dtype), scale_dtype=dtype_name(self.scales.dtype))

    @classmethod
    def from_format(cls, fmt: dict[str, Any], dtype: torch.dtype) -> QuantEmbedding:
        return cls(
            fmt["num_embeddings"],
            fmt["embedding_dim"],
            fmt["bits"],
            fmt["group_size"],
            fmt["symmetric"],
            dtype,
            getattr(torch, fmt["scale_dtype"]),
            fmt["padding_idx"],
        )

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group={self.group_size}"
