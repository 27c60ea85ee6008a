"""``CodebookLinear``: a linear layer stored as packed k-bit indices into a small codebook.

Storage (what ``state_dict`` and the saved file hold):

- ``qweight`` (out, packed_width(in, bits)) uint8: one ``bits``-bit index per weight, packed densely
  (`lmpress.formats.packing`), so 16 centroids cost 4 bits a weight and 256 cost 8;
- ``codebook`` (groups, 2**bits) float16: the centroid values, one row for the whole layer
  (``groups`` = 1) or one per output channel (``groups`` = out);
- ``scales`` (out,) float16, with a per-layer codebook and ``row_scale``: each row is its scale
  times codebook values, so rows of different ranges share one codebook;
- ``bias`` (out,) in the model's dtype, if the original layer had one.

This is non-uniform quantization: the centroids sit where the weights are dense, not on an even
grid. The forward looks the weights up and multiplies in the input's dtype.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lmpress.formats.packing import pack, packed_width, unpack
from lmpress.nn.base import CompressedLayer, dense_params, dtype_name, layer_record, with_bias


class CodebookLinear(CompressedLayer):
    """Linear layer whose weights are indices into ``codebook`` (per layer or per output channel)."""

    FORMAT = "codebook"
    qweight: Tensor
    codebook: Tensor
    scales: Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        per_channel: bool,
        bias: bool,
        dtype: torch.dtype = torch.float32,
        codebook_dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
        row_scale: bool = False,
    ) -> None:
        super().__init__()
        if not 1 <= bits <= 8:
            raise ValueError(f"codebook indices need 1..8 bits, not {bits}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.per_channel = bits, per_channel
        groups = out_features if per_channel else 1
        width = packed_width(in_features, bits)
        self.register_buffer("qweight", torch.zeros(out_features, width, dtype=torch.uint8, device=device))
        self.register_buffer("codebook", torch.zeros(groups, 2**bits, dtype=codebook_dtype, device=device))
        scales = torch.ones(out_features, dtype=codebook_dtype, device=device) if row_scale else None
        self.register_buffer("scales", scales)  # None buffers are not saved
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_indices(
        cls,
        indices: Tensor,
        codebook: Tensor,
        bits: int,
        bias: Tensor | None,
        codebook_dtype: torch.dtype,
        scales: Tensor | None = None,
    ) -> CodebookLinear:
        """From (out, in) indices < 2**bits, a (1 or out, 2**bits) codebook and optional (out,) row scales."""
        out_f, in_f = indices.shape
        dtype = bias.dtype if bias is not None else torch.float32
        per_channel = codebook.shape[0] == out_f and out_f > 1
        layer = cls(
            in_f, out_f, bits, per_channel, bias is not None, dtype, codebook_dtype, indices.device, scales is not None
        )
        layer.qweight.copy_(pack(indices, bits))
        layer.codebook.copy_(codebook.to(codebook_dtype))
        if scales is not None and layer.scales is not None:
            layer.scales.copy_(scales.to(codebook_dtype))
        return with_bias(layer, bias)

    def indices(self) -> Tensor:
        """(out, in) int64 indices into the codebook."""
        return unpack(self.qweight, self.bits, self.in_features).long()

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weights the indices stand for.  (out, in)

        With 1, 2, 4 or 8 bits a packed byte holds whole indices, so one lookup per byte in a
        256-entry table of value tuples (built from the codebook, ``per`` values each) decodes it:
        a single gather instead of unpacking every index first.
        """
        book = self.codebook.to(dtype)
        if 8 % self.bits:
            idx = self.indices()
            w = book[0][idx] if not self.per_channel else torch.gather(book, 1, idx)
        else:
            per = 8 // self.bits
            byte = torch.arange(256, device=book.device)
            parts = (byte[:, None] >> (self.bits * torch.arange(per, device=book.device))) & (2**self.bits - 1)
            table = book[:, parts]  # (groups, 256, per): the values of every byte
            q = self.qweight.long()
            w = table[0][q] if not self.per_channel else torch.gather(table, 1, q[:, :, None].expand(-1, -1, per))
            w = w.reshape(self.out_features, -1)[:, : self.in_features]
        return w * self.scales.to(dtype)[:, None] if self.scales is not None else w

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return nn.functional.linear(x, self.dense_weight(x.dtype), bias)

    def num_logical_params(self) -> int:
        return dense_params(self.in_features, self.out_features, self.bias is not None)

    def lmpress_format(self) -> dict[str, Any]:
        return layer_record(
            self,
            *("in_features", "out_features", "bits", "per_channel"),
            bias=self.bias is not None,
            row_scale=self.scales is not None,
            codebook_dtype=dtype_name(self.codebook.dtype),
        )

    @classmethod
    def from_format(cls, fmt: dict[str, Any], dtype: torch.dtype) -> CodebookLinear:
        """An empty layer of a saved format, ready for ``load_state_dict``."""
        return cls(
            int(fmt["in_features"]),
            int(fmt["out_features"]),
            int(fmt["bits"]),
            bool(fmt["per_channel"]),
            bool(fmt["bias"]),
            dtype,
            getattr(torch, str(fmt.get("codebook_dtype", "float16"))),
            row_scale=bool(fmt.get("row_scale", False)),
        )

    def extra_repr(self) -> str:
        scope = "channel" if self.per_channel else "layer"
        return f"in_features={self.in_features}, out_features={self.out_features}, centroids={2**self.bits}/{scope}"
