"""``QuantLinear``: a linear layer stored as packed integer codes with per-group scales and zeros.

Storage (what ``state_dict`` and the saved file hold):

- ``qweight`` (out, packed_width(in, bits)) uint8: codes packed densely (`lmpress.formats.packing`).
  Symmetric codes are stored as two's complement ``q`` in ``bits`` bits, so an 8-bit symmetric
  layer's bytes are exactly an int8 matrix; asymmetric codes are offset binary.
- ``scales`` (out, groups) float16 (or bfloat16).
- ``qzeros`` (out, packed_width(groups, bits)) uint8: packed integer zero points (asymmetric), or
  ``fzeros`` (out, groups) in the scales' dtype for optimizers that find fractional zero points
  (half-quadratic); symmetric layers store neither.
- ``bias`` (out,) in the model's dtype, if the original layer had one.

Forward, chosen once per device and dtype:

- 8-bit symmetric per-channel on CPU: ``torch._weight_int8pack_mm`` on the stored int8 bytes.
- 4-bit with a group size of 32/64/128/256 dividing ``in`` on CPU:
  ``torch.ops.aten._weight_int4pack_mm_for_cpu`` on a kernel layout prepared on first use. That
  layout then is the only copy of the codes in memory: ``qweight`` is dropped (a meta tensor) and
  derived from it again when it is read, saved, or the layer moves (`int4_codes` inverts the
  layout, whose row blocking is probed once per machine).
- 8-bit weights with int8 activations (W8A8): each token's activations are quantized to int8 on
  the fly and multiplied in int32 by ``torch._int_mm``.
- anything else: dequantize to the input's dtype, then matmul.

The kernels compute in bfloat16 (fp32 inputs are cast), as PyTorch's CPU kernels are only fast
there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lmpress.formats.grid import Quantized, dequantize, n_groups
from lmpress.formats.packing import decode_codes, decode_zeros, encode_codes, pack, packed_width, unpack_float
from lmpress.heap import trim_heap
from lmpress.nn.base import CompressedLayer, dense_params, dtype_name, keep_scale_dtype, layer_record, with_bias

INT4_GROUPS = (32, 64, 128, 256)
# PyTorch's weight-only CPU kernels are matrix-vector kernels whose time grows with the rows; from
# these many rows (tokens) on, dequantizing to bf16 and one bf16 GEMM is faster (measured on
# TinyLlama-1.1B shapes, 2 threads: benchmarks/quant_speed.py).
INT8_KERNEL_ROWS = 16
INT4_KERNEL_ROWS = 256


class QuantLinear(CompressedLayer):
    """Linear layer holding packed integer codes with per-group scales and zero points."""

    FORMAT = "quant"
    qweight: Tensor
    scales: Tensor
    qzeros: Tensor | None
    fzeros: Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int | None,
        symmetric: bool,
        bias: bool,
        dtype: torch.dtype = torch.float32,
        scale_dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
        float_zeros: bool = False,
        act_bits: int | None = None,
    ) -> None:
        super().__init__()
        if act_bits is not None and not (act_bits == 8 and bits == 8 and symmetric and group_size is None):
            raise ValueError("int8 activations need 8-bit symmetric per-channel weights")
        self.act_bits = act_bits
        self.tied_to: str | None = None  # a head that shares its weights with this embedding
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.float_zeros = float_zeros and not symmetric
        G = n_groups(in_features, group_size)
        qweight = torch.zeros(out_features, packed_width(in_features, bits), dtype=torch.uint8, device=device)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", torch.ones(out_features, G, dtype=scale_dtype, device=device))
        qzeros = fzeros = None
        if self.float_zeros:
            fzeros = torch.zeros(out_features, G, dtype=scale_dtype, device=device)
        elif not symmetric:
            qzeros = torch.zeros(out_features, packed_width(G, bits), dtype=torch.uint8, device=device)
        self.register_buffer("qzeros", qzeros)  # None buffers are not saved
        self.register_buffer("fzeros", fzeros)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self._kernel: tuple[str, Any] | None = None  # (path, prepared tensors); never saved
        self._dropped = False  # qweight lives only in the int4 kernel layout (see `materialize`)

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_quantized(
        cls,
        q: Quantized,
        bias: Tensor | None,
        symmetric: bool,
        scale_dtype: torch.dtype = torch.float16,
        float_zeros: bool = False,
        act_bits: int | None = None,
    ) -> QuantLinear:
        out_f, in_f = q.codes.shape
        dtype = bias.dtype if bias is not None else torch.float32
        layer = cls(
            in_f,
            out_f,
            q.bits,
            q.group_size,
            symmetric,
            bias is not None,
            dtype,
            scale_dtype,
            q.codes.device,
            float_zeros,
            act_bits,
        )
        layer.qweight.copy_(encode_codes(q.codes, q.bits, symmetric))
        layer.scales.copy_(q.scales.to(scale_dtype))
        if layer.fzeros is not None:
            layer.fzeros.copy_(q.zeros.to(scale_dtype))
        elif layer.qzeros is not None:
            layer.qzeros.copy_(pack(q.zeros.round().to(torch.uint8), q.bits))
        return with_bias(layer, bias)

    # ---- storage ------------------------------------------------------------------------------

    def codes(self) -> Tensor:
        """Unsigned (offset binary) codes.  (out, in) uint8"""
        if self._dropped:
            assert self._kernel is not None and INT4_BLOCK_N is not None
            return int4_codes(self._kernel[1][0], self.out_features, self.in_features, INT4_BLOCK_N)
        return decode_codes(self.qweight, self.bits, self.in_features, self.symmetric)

    def packed_codes(self) -> Tensor:
        """``qweight`` as stored, derived from the kernel layout if that is the only copy."""
        if self._dropped:
            return encode_codes(self.codes(), self.bits, self.symmetric)
        return self.qweight

    def materialize(self) -> None:
        """Bring ``qweight`` back into memory beside the kernel layout (before the layer moves)."""
        if self._dropped:
            self._buffers["qweight"] = self.packed_codes()
            self._dropped = False

    def _drop_codes(self) -> None:
        """The int4 kernel layout now holds the codes: free ``qweight`` (derived again when read)."""
        if INT4_BLOCK_N is not None and not self._dropped:
            self._buffers["qweight"] = torch.empty_like(self.qweight, device="meta")
            self._dropped = True
            trim_heap()  # the codes and the preparation's temporaries go back to the system

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._dropped:
            destination[prefix + "qweight"] = self.packed_codes()

    def zeros(self) -> Tensor:
        """Zero points.  (out, groups) float32"""
        return decode_zeros(
            self.qzeros, self.fzeros, self.bits, (self.out_features, self.scales.shape[1]), self.scales.device
        )

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight this layer represents.  (out, in)

        In float16/bfloat16 (whole groups) the codes are unpacked straight into ``dtype`` and
        scaled in place, several times faster than through float32; the scales round to ``dtype``
        as the CPU kernels' do."""
        g = self.group_size or self.in_features
        if dtype not in (torch.float16, torch.bfloat16) or self.in_features % g:
            return dequantize(self.codes(), self.scales, self.zeros(), self.group_size, dtype)
        if self._dropped:
            w = self.codes().to(dtype)
        else:
            flip = 2 ** (self.bits - 1) if self.symmetric else 0
            w = unpack_float(self.qweight, self.bits, self.in_features, dtype, flip).contiguous()
        w = w.view(self.out_features, -1, g)
        s = self.scales.to(dtype)[..., None]
        if self.fzeros is not None:  # fractional zeros: w = u*s - z*s
            w.mul_(s).sub_((self.fzeros.float() * self.scales.float()).to(dtype)[..., None])
        else:  # integer zeros: u - z is exact
            w.sub_(self.zeros().to(dtype)[..., None]).mul_(s)
        return w.view(self.out_features, self.in_features)

    dense_weight = dequantize_weight

    def num_logical_params(self) -> int:
        """Weights this layer represents; a head tied to the embeddings adds none of its own."""
        return dense_params(self.in_features, self.out_features, self.bias is not None, bool(self.tied_to))

    def lmpress_format(self) -> dict[str, Any]:
        return layer_record(
            self,
            *("bits", "group_size", "symmetric", "in_features", "out_features"),
            bias=self.bias is not None,
            scale_dtype=dtype_name(self.scales.dtype),
            float_zeros=self.float_zeros,
            act_bits=self.act_bits,
            tied_to=self.tied_to,
        )

    @classmethod
    def from_format(cls, fmt: dict[str, Any], dtype: torch.dtype) -> QuantLinear:
        """An empty layer of a saved format, ready for ``load_state_dict``."""
        layer = cls(
            fmt["in_features"],
            fmt["out_features"],
            fmt["bits"],
            fmt["group_size"],
            fmt["symmetric"],
            fmt["bias"],
            dtype,
            getattr(torch, fmt["scale_dtype"]),
            float_zeros=fmt.get("float_zeros", False),
            act_bits=fmt.get("act_bits"),
        )
        layer.tied_to = fmt.get("tied_to")
        return layer

    def forget_kernel(self) -> None:
        """Drop the prepared kernel layout; where it held the only copy of the codes, ``qweight``
        (a meta tensor then) stays as it is and must be assigned again (a load, a stream's next
        visit) before the layer runs."""
        self._kernel, self._dropped = None, False

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.forget_kernel()  # a dropped qweight is a meta tensor: the load replaces it
        if self.qweight.is_meta:
            self._buffers["qweight"] = torch.empty_like(self.qweight, device=self.scales.device)
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn: Any, recurse: bool = True) -> QuantLinear:
        return keep_scale_dtype(self, lambda: super(QuantLinear, self)._apply(fn, recurse))

    # ---- forward ------------------------------------------------------------------------------

    def kernel_path(self) -> str:
        """Which forward this layer uses on its current device: w8a8, int8, int4 or dequant."""
        if self.act_bits == 8:
            return "w8a8"
        if self.scales.device.type != "cpu":
            return "dequant"
        if self.bits == 8 and self.symmetric and self.group_size is None:
            return "int8"
        if (
            self.bits == 4
            and self.group_size in INT4_GROUPS
            and self.in_features % self.group_size == 0
            and self.out_features % 16 == 0
        ):
            return "int4"
        return "dequant"

    def _prepare(self) -> tuple[str, Any]:
        path = self.kernel_path()
        if path == "int8":
            return path, (self.qweight.view(torch.int8), self.scales.to(torch.bfloat16).view(-1))
        if path == "w8a8":
            return path, (self.qweight.view(torch.int8).T, self.scales.float().view(1, -1))  # (in, out), (1, out)
        if path == "int4":
            s = self.scales.float()
            return path, int4_layout(self.codes(), s, (8.0 - self.zeros()) * s)
        return path, None

    def forward(self, x: Tensor) -> Tensor:
        if self._kernel is None:
            self._kernel = self._prepare()
            if self._kernel[0] == "int4":
                self._drop_codes()
        path, prepared = self._kernel
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if path == "int8" and x2.shape[0] < INT8_KERNEL_ROWS:
            w, s = prepared
            y = torch._weight_int8pack_mm(x2.to(torch.bfloat16), w, s)
        elif path == "int8":  # prefill: the int8 bytes cast exactly to bf16, the scales applied to the output
            w, s = prepared
            y = nn.functional.linear(x2.to(torch.bfloat16), w.to(torch.bfloat16)).mul_(s)
        elif path == "w8a8":
            wT, s_w = prepared
            y = int8_matmul(x2, wT, s_w)
        elif path == "int4":
            y = int4_matmul(x2, prepared, self.group_size, self.dequantize_weight)
        else:
            y = nn.functional.linear(x2, self.dequantize_weight(x.dtype))
        y = y.to(x.dtype).view(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        sym = ("sym" if self.symmetric else "asym") + (f", act_bits={self.act_bits}" if self.act_bits else "")
        return (
            f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={self.group_size}, {sym}, "
            f"bias={self.bias is not None}"
        )


def int4_layout(codes: Tensor, scale: Tensor, zf: Tensor) -> tuple[Tensor, Tensor]:
    """PyTorch's int4 CPU kernel layout of unsigned 4-bit ``codes`` (out, in) on the grid
    w = (q - 8) * scale + zf, per group: ``scale``, ``zf`` (out, G).  -> (packed, (G, out, 2) bf16)"""
    rows = 1024  # row blocks pack independently: convert a slice at a time (int32 is 8x the packed size)
    if INT4_BLOCK_N is None or codes.shape[0] <= rows:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    else:
        packed = torch.cat(
            [
                torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes[i : i + rows].to(torch.int32), 1)
                for i in range(0, codes.shape[0], rows)
            ]
        )
    sz = torch.stack([scale, zf], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)  # (G, out, 2)
    return packed, sz


def int4_matmul(
    x2: Tensor, prepared: tuple[Tensor, Tensor], group: int | None, weight: Callable[[torch.dtype], Tensor]
) -> Tensor:
    """``x2`` (rows, in) times a weight in the int4 kernel layout ``prepared`` (`int4_layout`), in
    bfloat16: PyTorch's int4 kernel under INT4_KERNEL_ROWS rows, else one GEMM of ``weight(bf16)``.
    -> (rows, out)"""
    if x2.shape[0] < INT4_KERNEL_ROWS:
        packed, sz = prepared
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16), packed, group, sz)  # type: ignore[no-any-return]
    return nn.functional.linear(x2.to(torch.bfloat16), weight(torch.bfloat16))


def int4_codes(packed: Tensor, out_features: int, in_features: int, block_n: int) -> Tensor:
    """Unsigned 4-bit codes (out, in) uint8 back from PyTorch's int4 CPU layout (`int4_layout`): rows
    in blocks of ``block_n`` (the CPU's vector width), each stored (in, block_n / 2) with row d and
    row d + block_n / 2 in one byte's low and high nibble; a last, shorter block pairs neighbouring
    rows."""
    flat = packed.reshape(-1)
    full, tail = divmod(out_features, block_n)
    n = full * block_n * in_features // 2
    b = flat[:n].view(full, in_features, block_n // 2)
    parts = [torch.cat([b & 15, b >> 4], dim=2).permute(0, 2, 1).reshape(full * block_n, in_features)]
    if tail:
        t = flat[n:].view(in_features, tail // 2)
        parts.append(torch.stack([t & 15, t >> 4], dim=2).reshape(in_features, tail).T)
    return torch.cat(parts).contiguous()


def _probe_int4_block() -> int | None:
    """The row blocking of this machine's int4 CPU layout, or None if `int4_codes` cannot invert it
    (then ``qweight`` is kept beside the layout)."""
    try:
        probe = torch.randint(0, 16, (144, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
    except (RuntimeError, AttributeError):
        return None
    for block_n in (64, 32, 16):
        try:
            if torch.equal(int4_codes(packed, 144, 64, block_n).int(), probe):
                return block_n
        except RuntimeError:
            continue
    return None


INT4_BLOCK_N = _probe_int4_block()


def int8_matmul(x: Tensor, wT: Tensor, w_scale: Tensor) -> Tensor:
    """x (M, in) float @ wT (in, out) int8 with dynamic per-token int8 activations.  -> (M, out) float32

    x_i ≈ s_i q_i with s_i = max|x_i| / 127; the product runs in int32 (``torch._int_mm``) and is
    rescaled by s_i and the per-channel weight scales.
    """
    xf = x.float()
    s_x = (xf.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-8)  # (M, 1)
    xq = (xf / s_x).round().clamp(-127, 127).to(torch.int8)
    M = xq.shape[0]
    if xq.device.type == "cuda" and M <= 16:  # cuBLAS int8 GEMM needs M > 16
        xq = torch.nn.functional.pad(xq, (0, 0, 0, 17 - M))
    acc = torch._int_mm(xq, wT)[:M]  # (M, out) int32
    return acc.float() * s_x * w_scale
