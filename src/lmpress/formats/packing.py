"""Dense bit packing of integer codes: ``bits`` bytes hold 8 codes, for every width 2..8.

Codes of a row are packed little-endian in runs of 8: code ``i`` of a run occupies bits
``[bits*i, bits*(i+1))`` of a ``bits``-byte word. 4-bit codes thus land two per byte (low nibble
first), 2-bit four per byte, and 3-bit codes use exactly 3 bits each, so the bytes match the format.
"""

from __future__ import annotations

import torch
from torch import Tensor


def packed_width(n: int, bits: int) -> int:
    """Bytes per row for ``n`` codes of ``bits`` bits (runs of 8 codes; 8-bit codes are not padded)."""
    return n if bits == 8 else -(-n // 8) * bits


def pack(codes: Tensor, bits: int) -> Tensor:
    """(rows, n) codes < 2**bits -> (rows, packed_width(n, bits)) uint8."""
    rows, n = codes.shape
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    if 8 % bits == 0:  # 2 and 4 bits: whole codes per byte, same layout, byte-wide arithmetic
        per = 8 // bits
        c = torch.nn.functional.pad(codes.to(torch.uint8), (0, packed_width(n, bits) * per - n))
        c = c.view(rows, -1, per)  # (rows, bytes, per)
        out = c[..., 0].clone()
        for i in range(1, per):
            out |= c[..., i] << (bits * i)
        return out
    runs = -(-n // 8)
    c = torch.nn.functional.pad(codes.to(torch.int64), (0, runs * 8 - n)).view(rows, runs, 8)
    shifts = torch.arange(8, device=codes.device) * bits  # (8,)
    word = (c << shifts).sum(-1)  # (rows, runs) int64, 8*bits <= 64 bits used
    byte_shifts = torch.arange(bits, device=codes.device) * 8  # (bits,)
    return ((word[..., None] >> byte_shifts) & 0xFF).to(torch.uint8).view(rows, runs * bits)


def unpack(packed: Tensor, bits: int, n: int) -> Tensor:
    """(rows, packed_width(n, bits)) uint8 -> (rows, n) uint8 codes."""
    rows = packed.shape[0]
    if bits == 8:
        return packed[:, :n]
    if 8 % bits == 0:  # 2 and 4 bits: shift each byte once per code it holds
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)  # (8 // bits,)
        return ((packed[..., None] >> shifts) & (2**bits - 1)).view(rows, -1)[:, :n]
    runs = packed.shape[1] // bits
    b = packed.view(rows, runs, bits).to(torch.int64)
    byte_shifts = torch.arange(bits, device=packed.device) * 8
    word = (b << byte_shifts).sum(-1)  # (rows, runs)
    shifts = torch.arange(8, device=packed.device) * bits
    codes = (word[..., None] >> shifts) & (2**bits - 1)  # (rows, runs, 8)
    return codes.view(rows, runs * 8)[:, :n].to(torch.uint8)


def unpack_float(packed: Tensor, bits: int, n: int, dtype: torch.dtype, flip: int = 0) -> Tensor:
    """`unpack` with every code XORed with ``flip``, written straight into a float tensor: one pass
    per code in a byte and no uint8 temporaries, several times faster than `unpack` + cast for 2, 4
    and 8 bits. Integer codes are exact in every float dtype.  (rows, n) ``dtype``"""
    if 8 % bits:  # 3, 5, 6, 7 bits: codes straddle bytes
        return (unpack(packed, bits, n) ^ flip).to(dtype)
    per, mask = 8 // bits, 2**bits - 1
    if flip:  # the same flip in every code of a byte
        packed = packed ^ sum(flip << (bits * i) for i in range(per))
    if bits == 8:
        return packed[:, :n].to(dtype)
    rows = packed.shape[0]
    out = torch.empty(rows, packed.shape[1], per, dtype=dtype, device=packed.device)
    for i in range(per):
        out[..., i] = (packed >> (bits * i)) & mask
    return out.view(rows, -1)[:, :n]


def encode_codes(codes: Tensor, bits: int, symmetric: bool) -> Tensor:
    """Offset-binary codes -> stored bytes; symmetric grids store two's complement ``q``.  (rows, packed)"""
    return pack(codes ^ (2 ** (bits - 1)) if symmetric else codes, bits)


def decode_codes(packed: Tensor, bits: int, n: int, symmetric: bool) -> Tensor:
    """Stored bytes -> offset-binary codes, the inverse of `encode_codes`.  (rows, n) uint8"""
    codes = unpack(packed, bits, n)
    return codes ^ (2 ** (bits - 1)) if symmetric else codes


def decode_zeros(
    qzeros: Tensor | None, fzeros: Tensor | None, bits: int, shape: tuple[int, int], device: torch.device
) -> Tensor:
    """Zero points from packed integers, float zeros, or the fixed midpoint of a symmetric grid.  (rows, G)"""
    if fzeros is not None:
        return fzeros.float()
    if qzeros is not None:
        return unpack(qzeros, bits, shape[1]).float()
    return torch.full(shape, 2.0 ** (bits - 1), device=device)
