"""``GGUFLinear`` and ``GGUFEmbedding``: layers stored as the exact bytes of a GGUF block type.

A quantizer run with ``grid: q4_k`` (or any type of `lmpress.formats.ggml`) leaves these. Their
``blocks`` buffer (rows, row_bytes) uint8 is what a GGUF file holds for the tensor, so the model's
size is what the file costs and export copies the bytes without a second rounding.

Forward: 4-bit types with 32-weight sub-blocks (Q4_0, Q4_1, Q4_K) run on PyTorch's int4 CPU
kernel (prepared on first use, like `QuantLinear`'s) for a few rows at a time; everything else
dequantizes the blocks (bit-exact with llama.cpp's reference dequantization) and multiplies.
An embedding lookup dequantizes only the rows it gathers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lmpress.formats import ggml, ggml_bytes
from lmpress.nn.base import CompressedLayer, EmbeddingTable, dense_params, dtype_name, with_bias
from lmpress.nn.quant_linear import int4_layout, int4_matmul


def _block_type(type_name: str, width: int, what: str) -> ggml.GGMLType:
    """The GGUF block type ``type_name``, whose blocks must tile a row of ``width`` (``what``)."""
    t = ggml.ggml_type(type_name)
    if width % t.block:
        raise ValueError(f"{t.name} needs {what} divisible by {t.block}, got {width}")
    return t


class GGUFLinear(CompressedLayer):
    """Linear layer holding one GGUF block type's bytes (llama.cpp's Q4_K, Q6_K, Q8_0 ...)."""

    FORMAT = "gguf"
    blocks: Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        type_name: str,
        bias: bool,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.gtype = _block_type(type_name, in_features, "in_features")
        self.in_features, self.out_features = in_features, out_features
        self.tied_to: str | None = None
        rb = self.gtype.row_bytes(in_features)
        self.register_buffer("blocks", torch.zeros(out_features, rb, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self._kernel: tuple[str, Any] | None = None

    @classmethod
    def from_blocks(cls, b: ggml.GGMLBlocks, bias: Tensor | None) -> GGUFLinear:
        out_f, in_f = b.codes.shape
        dtype = bias.dtype if bias is not None else torch.float32
        layer = cls(in_f, out_f, b.type.name, bias is not None, dtype, b.codes.device)
        layer.blocks.copy_(ggml_bytes.pack(b))
        return with_bias(layer, bias)

    @property
    def bits(self) -> int:
        return self.gtype.bits

    def ggml_blocks(self) -> ggml.GGMLBlocks:
        return ggml_bytes.unpack(self.blocks, self.gtype, self.in_features)

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight this layer represents.  (out, in)"""
        return ggml.dequantize(self.ggml_blocks()).to(dtype)

    dense_weight = dequantize_weight

    def num_logical_params(self) -> int:
        return dense_params(self.in_features, self.out_features, self.bias is not None, bool(self.tied_to))

    def lmpress_format(self) -> dict[str, Any]:
        return {
            "format": self.FORMAT,
            "type": self.gtype.name,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "tied_to": self.tied_to,
            "reads_table": self.reads_table,
        }

    @classmethod
    def from_format(cls, fmt: dict[str, Any], dtype: torch.dtype) -> GGUFLinear:
        layer = cls(fmt["in_features"], fmt["out_features"], fmt["type"], fmt["bias"], dtype)
        layer.tied_to = fmt.get("tied_to")
        if fmt.get("reads_table"):  # its blocks are the table's, linked on load (`tie`)
            layer.register_buffer("blocks", layer.blocks, persistent=False)
        return layer

    @property
    def reads_table(self) -> bool:
        """A tied head whose blocks are its embedding table's (saved once, with the table)."""
        return "blocks" in self._non_persistent_buffers_set

    def tie(self, table: GGUFEmbedding, name: str) -> GGUFLinear:
        """Read the blocks of ``table`` (the embeddings named ``name``, of this layer's type and shape)."""
        if (table.gtype, table.blocks.shape) != (self.gtype, self.blocks.shape):
            raise ValueError(f"a {self.gtype.name} head cannot read {name}'s {table.gtype.name} table")
        self.register_buffer("blocks", table.blocks, persistent=False)
        self.tied_to = name
        self.forget_kernel()
        return self

    def forget_kernel(self) -> None:
        """Drop the prepared kernel layout (prepared again on the next forward)."""
        self._kernel = None

    def kernel_path(self) -> str:
        t = self.gtype
        uniform = not t.nonuniform
        if self.blocks.device.type == "cpu" and uniform and t.bits == 4 and t.sub == 32 and self.out_features % 16 == 0:
            return "int4"
        return "dequant"

    def _prepare(self) -> tuple[str, Any]:
        path = self.kernel_path()
        if path != "int4":
            return path, None
        b = self.ggml_blocks()
        S, M = ggml.sub_scales(b)  # (out, G)
        if b.type.name == "q4_1":
            M = -b.dmin.float()  # type: ignore[union-attr]
        # kernel: w = (u - 8) * s + zf; ours: S*u - M (affine) or S*(u - 8)
        return path, int4_layout(b.codes, S, 8 * S - M if M is not None else torch.zeros_like(S))

    def forward(self, x: Tensor) -> Tensor:
        if self._kernel is None:
            self._kernel = self._prepare()
        path, prepared = self._kernel
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if path == "int4":
            y = int4_matmul(x2, prepared, self.gtype.sub, self.dequantize_weight)
        else:
            y = nn.functional.linear(x2, self.dequantize_weight(x.dtype))
        y = y.to(x.dtype).view(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, type={self.gtype.name}, bias={self.bias is not None}"


class GGUFEmbedding(EmbeddingTable, CompressedLayer):
    """Embedding table held as one GGUF block type's bytes; lookups dequantize the gathered rows."""

    FORMAT = "gguf_embedding"
    blocks: Tensor

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        type_name: str,
        dtype: torch.dtype = torch.float32,
        padding_idx: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.gtype = _block_type(type_name, embedding_dim, "a width")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_idx
        self.out_dtype = dtype
        rb = self.gtype.row_bytes(embedding_dim)
        self.register_buffer("blocks", torch.zeros(num_embeddings, rb, dtype=torch.uint8, device=device))

    @classmethod
    def from_blocks(cls, b: ggml.GGMLBlocks, dtype: torch.dtype, padding_idx: int | None = None) -> GGUFEmbedding:
        V, D = b.codes.shape
        layer = cls(V, D, b.type.name, dtype, padding_idx, b.codes.device)
        layer.blocks.copy_(ggml_bytes.pack(b))
        return layer

    @property
    def bits(self) -> int:
        return self.gtype.bits

    def _rows(self, ids: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        raw = self.blocks[ids]
        return ggml.dequantize(ggml_bytes.unpack(raw, self.gtype, self.embedding_dim)).to(dtype or self.out_dtype)

    def lmpress_format(self) -> dict[str, Any]:
        return {
            "format": self.FORMAT,
            "type": self.gtype.name,
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "padding_idx": self.padding_idx,
            "dtype": dtype_name(self.out_dtype),
        }

    @classmethod
    def from_format(cls, fmt: dict[str, Any], dtype: torch.dtype) -> GGUFEmbedding:
        return cls(fmt["num_embeddings"], fmt["embedding_dim"], fmt["type"], dtype, fmt["padding_idx"])

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, type={self.gtype.name}"
