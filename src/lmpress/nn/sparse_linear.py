"""``SparseLinear``: a pruned linear layer that stores only the weights it keeps.

Storage (what ``state_dict`` and the saved file hold):

- ``mask`` (out, ceil(in / 8)) uint8: one bit per weight, set where the weight is kept (row-major,
  low bit first). N:M patterns use the same bitmask: for 2:4 it costs what two 2-bit indices per
  group would, and less for 4:8.
- the kept values, in row-major order of the mask, either
  - ``values`` (nnz,) in the model's dtype, or
  - quantized (SparseGPT with joint quantization): ``qvalues`` packed ``bits``-bit codes of the
    kept weights, with ``scales`` (out, groups) and packed ``qzeros`` of the dense layer's groups.
- ``bias`` (out,), if the original layer had one.

A 50%-sparse fp32 layer thus takes 53% of its dense bytes, a bf16 one 56%, a 2:4 4-bit one 0.38
bytes per weight.

Forward: PyTorch has no CPU kernel that makes 50% or 2:4 sparsity faster than a dense GEMM, so the
layer decodes its weight once per device and dtype into a dense kernel layout (counted in the
model's memory) and runs ``F.linear``; at high sparsity (density at most ``CSR_MAX_DENSITY``) it
keeps a CSR matrix instead and multiplies with ``torch.sparse.mm`` (measured in
``benchmarks/prune.py``).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from lmpress.formats.grid import Quantized, dequantize, n_groups
from lmpress.formats.packing import decode_zeros, pack, packed_width, unpack
from lmpress.nn.base import CompressedLayer, dense_params, dtype_name, keep_scale_dtype, layer_record, with_bias

# torch.sparse CSR matmul beats dense F.linear on this CPU only when few weights are kept
CSR_MAX_DENSITY = 0.1


class SparseLinear(CompressedLayer):
    """Linear layer holding a bitmask and the kept weights (optionally quantized)."""

    FORMAT = "sparse"
    mask: Tensor
    values: Tensor | None
    qvalues: Tensor | None
    scales: Tensor | None
    qzeros: Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        nnz: int,
        bias: bool,
        dtype: torch.dtype = torch.float32,
        pattern: str = "unstructured",
        bits: int | None = None,
        group_size: int | None = None,
        symmetric: bool = False,
        scale_dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.nnz = in_features, out_features, nnz
        self.pattern, self.bits, self.group_size, self.symmetric = pattern, bits, group_size, symmetric
        self.register_buffer(
            "mask", torch.zeros(out_features, packed_width(in_features, 1), dtype=torch.uint8, device=device)
        )
        values = qvalues = scales = qzeros = None
        if bits is None:
            values = torch.zeros(nnz, dtype=dtype, device=device)
        else:
            G = n_groups(in_features, group_size)
            qvalues = torch.zeros(1, packed_width(nnz, bits), dtype=torch.uint8, device=device)
            scales = torch.ones(out_features, G, dtype=scale_dtype, device=device)
            if not symmetric:
                qzeros = torch.zeros(out_features, packed_width(G, bits), dtype=torch.uint8, device=device)
        self.register_buffer("values", values)
        self.register_buffer("qvalues", qvalues)
        self.register_buffer("scales", scales)
        self.register_buffer("qzeros", qzeros)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self._kernel: tuple[str, Any, Any] | None = None  # (path, prepared tensors); never saved

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_dense(
        cls,
        weight: Tensor,
        mask: Tensor,
        bias: Tensor | None,
        pattern: str = "unstructured",
        q: Quantized | None = None,
        symmetric: bool = False,
        scale_dtype: torch.dtype = torch.float16,
    ) -> SparseLinear:
        """From an (out, in) weight and its keep-mask; with ``q`` (the dense layer's codes and grid)
        the kept weights are stored as those codes."""
        out_f, in_f = weight.shape
        mask = mask.to(torch.bool)
        dtype = bias.dtype if bias is not None else weight.dtype
        nnz = int(mask.sum())
        layer = cls(
            in_f,
            out_f,
            nnz,
            bias is not None,
            dtype,
            pattern,
            q.bits if q is not None else None,
            q.group_size if q is not None else None,
            symmetric,
            scale_dtype,
            weight.device,
        )
        layer.mask.copy_(pack(mask.to(torch.uint8), 1))
        if q is None:
            assert layer.values is not None
            layer.values.copy_(weight.detach()[mask].to(dtype))
        else:
            assert layer.qvalues is not None and layer.scales is not None
            layer.qvalues.copy_(pack(q.codes[mask].view(1, -1), q.bits))
            layer.scales.copy_(q.scales.to(scale_dtype))
            if layer.qzeros is not None:
                layer.qzeros.copy_(pack(q.zeros.round().to(torch.uint8), q.bits))
        return with_bias(layer, bias)

    # ---- storage ------------------------------------------------------------------------------

    def keep_mask(self) -> Tensor:
        """(out, in) bool, True where a weight is kept."""
        return unpack(self.mask, 1, self.in_features).to(torch.bool)

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight this layer represents, zeros where pruned.  (out, in)"""
        mask = self.keep_mask()
        w = torch.zeros(self.out_features, self.in_features, dtype=dtype, device=self.mask.device)
        if self.values is not None:
            w[mask] = self.values.to(dtype)
            return w
        assert self.qvalues is not None and self.scales is not None and self.bits is not None
        zeros = decode_zeros(self.qzeros, None, self.bits, tuple(self.scales.shape), self.mask.device)  # type: ignore[arg-type]
        codes = torch.zeros(self.out_features, self.in_features, dtype=torch.uint8, device=self.mask.device)
        codes[mask] = unpack(self.qvalues, self.bits, self.nnz)[0]
        w = dequantize(codes, self.scales, zeros, self.group_size, dtype)
        return w.masked_fill_(~mask, 0)

    def dense_codes(self) -> tuple[Tensor, Tensor | None]:
        """A quantized sparse layer as a dense quantized one: (out, in) unsigned codes, each pruned
        weight the code of its group's zero point (which decodes to an exact 0), and the (out,
        groups) integer zero points (None when symmetric: the zero code is ``2**(bits-1)``)."""
        assert self.qvalues is not None and self.scales is not None and self.bits is not None
        mask = self.keep_mask()
        if self.symmetric:
            zeros = None
            codes = torch.full(mask.shape, 2 ** (self.bits - 1), dtype=torch.uint8, device=mask.device)
        else:
            zeros = decode_zeros(self.qzeros, None, self.bits, tuple(self.scales.shape), self.mask.device)  # type: ignore[arg-type]
            g = self.group_size or self.in_features
            codes = zeros.round().to(torch.uint8).repeat_interleave(g, dim=1)[:, : self.in_features].contiguous()
        codes[mask] = unpack(self.qvalues, self.bits, self.nnz)[0]
        return codes, zeros

    def num_logical_params(self) -> int:
        """The weights kept (and the bias): what the pruned layer still computes with."""
        return self.nnz + (self.out_features if self.bias is not None else 0)

    def num_dense_params(self) -> int:
        """The weights of the matrix the layer represents, pruned ones included (for bits per
        weight that compare with a dense layer's)."""
        return dense_params(self.in_features, self.out_features, self.bias is not None)

    @property
    def density(self) -> float:
        return self.nnz / (self.in_features * self.out_features)

    def lmpress_format(self) -> dict[str, Any]:
        return layer_record(
            self,
            "in_features",
            "out_features",
            "nnz",
            "pattern",
            bias=self.bias is not None,
            bits=self.bits,
            group_size=self.group_size,
            symmetric=self.symmetric,
            scale_dtype=dtype_name(self.scales.dtype) if self.scales is not None else None,
        )

    @classmethod
    def from_format(cls, fmt: dict[str, Any], dtype: torch.dtype) -> SparseLinear:
        """An empty layer of a saved format, ready for ``load_state_dict``."""
        return cls(
            int(fmt["in_features"]),
            int(fmt["out_features"]),
            int(fmt["nnz"]),
            bool(fmt["bias"]),
            dtype,
            str(fmt.get("pattern", "unstructured")),
            fmt.get("bits"),
            fmt.get("group_size"),
            bool(fmt.get("symmetric", False)),
            getattr(torch, fmt.get("scale_dtype") or "float16"),
        )

    def forget_kernel(self) -> None:
        """Drop the prepared kernel layout (prepared again on the next forward)."""
        self._kernel = None

    def _apply(self, fn: Any, recurse: bool = True) -> SparseLinear:
        return keep_scale_dtype(self, lambda: super(SparseLinear, self)._apply(fn, recurse))  # type: ignore[no-any-return]

    # ---- forward ------------------------------------------------------------------------------

    def kernel_path(self) -> str:
        """``csr`` (sparse matmul) at high sparsity on CPU, else ``dense`` (decoded once)."""
        return "csr" if self.mask.device.type == "cpu" and self.density <= CSR_MAX_DENSITY else "dense"

    def _prepare(self, dtype: torch.dtype) -> tuple[str, Any, Any]:
        """(path, the tensors it holds (counted as the model's memory), the operand)."""
        path = self.kernel_path()
        w = self.dense_weight(dtype)
        if path == "csr":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
                csr = w.to_sparse_csr()
            return path, (csr.crow_indices(), csr.col_indices(), csr.values()), csr
        return path, (w,), w

    def forward(self, x: Tensor) -> Tensor:
        if self._kernel is None or self._kernel[2].dtype != x.dtype:
            self._kernel = self._prepare(x.dtype)
        path, _, w = self._kernel
        if path == "csr":
            shape = x.shape
            y = torch.sparse.mm(w, x.reshape(-1, shape[-1]).T).T.reshape(*shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        return nn.functional.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        q = f", bits={self.bits}, group={self.group_size}" if self.bits else ""
        return (
            f"in={self.in_features}, out={self.out_features}, {self.pattern}, density={self.density:.3f}{q}, "
            f"bias={self.bias is not None}"
        )
