"""The exact bytes of a GGUF tensor row for each GGML block type (`lmpress.formats.ggml`):
`pack` writes `GGMLBlocks` as llama.cpp lays them out, `unpack` reads them back.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmpress.formats.ggml import GGMLBlocks, GGMLType, ggml_type
from lmpress.formats.iquant import LATTICES, codes_from_indices, grid_indices


def _f16_bytes(x: Tensor) -> Tensor:
    """(N,) float16 -> (N, 2) uint8, little-endian."""
    return x.contiguous().view(torch.uint8).view(-1, 2)


def _bits_into(u: Tensor, shift: int, width: int, groups: int, stride: int) -> Tensor:
    """Pack ``groups`` runs of ``stride`` codes (taking ``width`` bits from ``shift``) into one
    byte per position: byte l = Σ_j ((u[j*stride + l] >> shift) & mask) << (width*j).  (N, stride)"""
    mask = 2**width - 1
    out = torch.zeros(u.shape[0], stride, dtype=torch.uint8, device=u.device)
    for j in range(groups):
        out |= ((u[:, j * stride : (j + 1) * stride] >> shift) & mask) << (width * j)
    return out


def _bits_from(b: Tensor, width: int, groups: int) -> Tensor:
    """Inverse of `_bits_into`: (N, stride) bytes -> (N, groups*stride) values of ``width`` bits."""
    mask = 2**width - 1
    return torch.cat([(b >> (width * j)) & mask for j in range(groups)], dim=1)


def pack(b: GGMLBlocks) -> Tensor:
    """The GGUF bytes of the blocks.  -> (rows, row_bytes) uint8"""
    t = b.type
    rows = b.codes.shape[0]
    u = b.codes.reshape(-1, t.block).to(torch.uint8)  # (N, block)
    N = u.shape[0]
    d = _f16_bytes(b.d.reshape(-1).half())
    parts: list[Tensor]
    if t.name == "q8_0":
        parts = [d, u ^ 0x80]
    elif t.name == "iq4_nl":
        parts = [d, _nibbles(u)]
    elif t.nonuniform:  # IQ4_XS and the lattice types: 4- or 6-bit sub-block scales
        assert b.sc is not None
        parts = [d, *_pack_iquant(t, u, b.sc.reshape(N, t.n_sub))]
    elif t.name in ("q4_0", "q4_1"):
        qs = (u[:, :16] & 15) | ((u[:, 16:] & 15) << 4)
        parts = [d, qs] if t.name == "q4_0" else [d, _f16_bytes(b.dmin.reshape(-1).half()), qs]  # type: ignore[union-attr]
    elif t.name in ("q5_0", "q5_1"):
        qs = (u[:, :16] & 15) | ((u[:, 16:] & 15) << 4)
        qh = _qh32(u)  # bit j of a little-endian uint32 = high bit of code j
        parts = [d, qh, qs] if t.name == "q5_0" else [d, _f16_bytes(b.dmin.reshape(-1).half()), qh, qs]  # type: ignore[union-attr]
    else:
        assert b.sc is not None
        sc = b.sc.reshape(N, t.n_sub)
        if t.name == "q2_k":
            assert b.mn is not None and b.dmin is not None
            scales = (sc.to(torch.uint8) & 15) | ((b.mn.reshape(N, t.n_sub).to(torch.uint8) & 15) << 4)
            qs = torch.cat([_bits_into(u[:, h * 128 :], 0, 2, 4, 32) for h in range(2)], dim=1)
            parts = [scales, qs, d, _f16_bytes(b.dmin.reshape(-1).half())]
        elif t.name == "q3_k":
            hmask = _bits_into(u, 2, 1, 8, 32)
            qs = torch.cat([_bits_into(u[:, h * 128 :], 0, 2, 4, 32) for h in range(2)], dim=1)
            parts = [hmask, qs, _pack_scales_3k((sc + 32).to(torch.uint8)), d]
        elif t.name in ("q4_k", "q5_k"):
            assert b.mn is not None and b.dmin is not None
            scales = _pack_scales_4k(sc.to(torch.uint8), b.mn.reshape(N, t.n_sub).to(torch.uint8))
            qs = torch.cat([_bits_into(u[:, c * 64 :], 0, 4, 2, 32) for c in range(4)], dim=1)
            parts = [d, _f16_bytes(b.dmin.reshape(-1).half()), scales]
            parts += [_bits_into(u, 4, 1, 8, 32), qs] if t.name == "q5_k" else [qs]
        elif t.name == "q6_k":
            ql = torch.cat([_bits_into(u[:, h * 128 :], 0, 4, 2, 64) for h in range(2)], dim=1)
            qh = torch.cat([_bits_into(u[:, h * 128 :], 4, 2, 4, 32) for h in range(2)], dim=1)
            parts = [ql, qh, sc.to(torch.int8).view(torch.uint8), d]
        else:
            raise ValueError(f"no packing for {t.name}")
    out = torch.cat(parts, dim=1)
    assert out.shape[1] == t.type_size, (t.name, out.shape)
    return out.reshape(rows, -1)


def _pack_iquant(t: GGMLType, u: Tensor, sc: Tensor) -> list[Tensor]:
    """The bytes after the block scale d of an i-quant block.  (N, 256) codes, (N, n_sub) scales"""
    N = u.shape[0]
    if t.name == "iq4_xs":
        ls = (sc + 32).to(torch.int32)  # 6 bits, 0..63
        low = ((ls[:, 0::2] & 15) | ((ls[:, 1::2] & 15) << 4)).to(torch.uint8)  # (N, 4)
        high = (((ls >> 4) & 3) << (2 * torch.arange(t.n_sub, device=u.device))).sum(-1, keepdim=True)
        scales_h = torch.cat([high & 255, high >> 8], dim=1).to(torch.uint8)  # little-endian uint16
        parts = [scales_h, low, _nibbles(u.reshape(N * t.n_sub, 32)).reshape(N, -1)]
    elif t.name == "iq3_s":
        idx = grid_indices(u, LATTICES["iq3_s"])  # (N, 64) 9-bit codebook indices
        sc = sc.to(torch.uint8)
        scales = (sc[:, 0::2] & 15) | (sc[:, 1::2] << 4)  # (N, 4)
        parts = [(idx & 255).to(torch.uint8), _bits8(idx >> 8), _bits8(u >> 3), scales]
    elif t.name == "iq2_xxs":
        parts = [_pack_iq2_xxs(u, sc)]
    elif t.name == "iq3_xxs":  # 64 index bytes, then per 32 weights a uint32 of signs and scale
        idx = grid_indices(u, LATTICES["iq3_xxs"]).to(torch.uint8)  # (N, 64)
        parts = [idx, _aux32(_sign7(u).view(N, 8, 4), sc).view(N, 32)]
    elif t.name == "iq2_xs":  # per group of 8: a little-endian uint16, 9-bit index | 7 sign bits << 9
        q16 = grid_indices(u, LATTICES["iq2_xs"]) | (_sign7(u) << 9)  # (N, 32)
        sc = sc.to(torch.uint8)
        parts = [torch.stack([q16 & 255, q16 >> 8], dim=-1).view(N, 64).to(torch.uint8)]
        parts.append((sc[:, 0::2] & 15) | (sc[:, 1::2] << 4))
    elif t.name == "iq2_s":  # low index bytes, sign bytes, 2 high index bits per group, 4-bit scales
        idx = grid_indices(u, LATTICES["iq2_s"])  # (N, 32) 10-bit
        hi = ((idx >> 8).view(N, 8, 4) << (2 * torch.arange(4, device=u.device))).sum(-1)  # (N, 8)
        sc = sc.to(torch.uint8)
        parts = [(idx & 255).to(torch.uint8), _bits8(u >> 3), hi.to(torch.uint8)]
        parts.append((sc[:, 0::2] & 15) | (sc[:, 1::2] << 4))
    else:
        raise ValueError(f"no packing for {t.name}")
    return parts


def _nibbles(u: Tensor) -> Tensor:
    """32-weight blocks as 16 bytes: byte j holds code j (low nibble) and code j+16.  (N, 32) -> (N, 16)"""
    return (u[:, :16] & 15) | ((u[:, 16:] & 15) << 4)


def _from_nibbles(qs: Tensor) -> Tensor:
    """Inverse of `_nibbles`.  (N, 16) -> (N, 32)"""
    return torch.cat([qs & 15, qs >> 4], dim=1)


def _bits8(bits: Tensor) -> Tensor:
    """Bit j of byte i = bits[8i + j] (the lowest bit of each value).  (N, 8m) -> (N, m) uint8"""
    shifts = torch.arange(8, device=bits.device)
    return ((bits.long() & 1).view(bits.shape[0], -1, 8) << shifts).sum(-1).to(torch.uint8)


def _from_bits8(b: Tensor) -> Tensor:
    """Inverse of `_bits8`.  (N, m) -> (N, 8m) in {0, 1}"""
    shifts = torch.arange(8, device=b.device, dtype=torch.uint8)
    return ((b[:, :, None] >> shifts) & 1).reshape(b.shape[0], -1)


def _pack_iq2_xxs(u: Tensor, sc: Tensor) -> Tensor:
    """IQ2_XXS: per 32 weights two little-endian uint32s, 4 codebook indices (a byte each), then
    4 x 7 sign bits (the 8th sign of each group is their parity) and the 4-bit scale on top.
    (N, 256) codes, (N, 8) scales -> (N, 64)"""
    N = u.shape[0]
    idx = grid_indices(u, LATTICES["iq2_xxs"]).view(N, 8, 4)  # (N, sub-blocks, groups)
    return torch.cat([idx.to(torch.uint8), _aux32(_sign7(u).view(N, 8, 4), sc)], dim=-1).view(N, 64)


def _aux32(sign7: Tensor, sc: Tensor) -> Tensor:
    """IQ2_XXS / IQ3_XXS: per 32 weights a little-endian uint32 of 4 x 7 sign bits and the 4-bit
    scale on top.  (N, 8, 4) sign bits, (N, 8) scales -> (N, 8, 4) bytes"""
    aux = (sign7 << (7 * torch.arange(4, device=sign7.device))).sum(-1) | (sc.long() << 28)  # (N, 8)
    return torch.stack([(aux >> (8 * j)) & 255 for j in range(4)], dim=-1).to(torch.uint8)


def _from_aux32(b: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of `_aux32`.  (N, 8, 4) bytes -> sign bits (N, 8, 4) int64, scales (N, 8) int32"""
    b = b.long()
    aux = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)  # (N, 8)
    return (aux[..., None] >> (7 * torch.arange(4, device=b.device))) & 127, (aux >> 28).to(torch.int32)


def _unpack_iq2_xxs(q: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of `_pack_iq2_xxs`.  (N, 64) -> codes (N, 256) uint8, scales (N, 8) int32"""
    N = q.shape[0]
    q = q.view(N, 8, 8)
    sign7, sc = _from_aux32(q[..., 4:])
    u = codes_from_indices(q[..., :4].reshape(N, 32).long(), _signs8(sign7.view(N, 32)), LATTICES["iq2_xxs"])
    return u, sc


def _nibble_scales(b: Tensor) -> Tensor:
    """4-bit scales, two a byte (low nibble first).  (N, m) -> (N, 2m) int32"""
    return torch.stack([b & 15, b >> 4], dim=2).reshape(b.shape[0], -1).to(torch.int32)


def _unpack_iquant(t: GGMLType, x: Tensor) -> tuple[Tensor, Tensor]:
    """An i-quant's blocks (N, type_size) -> codes (N, 256) uint8, sub-block scales (N, n_sub) int32."""
    if t.name == "iq4_xs":
        high = x[:, 2].to(torch.int32) | (x[:, 3].to(torch.int32) << 8)  # (N,) uint16
        low = torch.stack([x[:, 4:8] & 15, x[:, 4:8] >> 4], dim=2).reshape(-1, t.n_sub).to(torch.int32)
        shifts = 2 * torch.arange(t.n_sub, device=x.device)
        sc = (low | (((high[:, None] >> shifts) & 3) << 4)) - 32
        return _from_nibbles(x[:, 8:].reshape(-1, 16)).reshape(-1, t.block), sc
    if t.name == "iq3_xxs":
        sign7, sc = _from_aux32(x[:, 66:98].reshape(-1, 8, 4))
        return codes_from_indices(x[:, 2:66].long(), _signs8(sign7.reshape(-1, 32)), LATTICES["iq3_xxs"]), sc
    unpackers = {"iq3_s": _unpack_iq3_s, "iq2_xs": _unpack_iq2_xs, "iq2_s": _unpack_iq2_s}
    if t.name == "iq2_xxs":
        return _unpack_iq2_xxs(x[:, 2:])
    if t.name not in unpackers:
        raise ValueError(f"no unpacking for {t.name}")
    return unpackers[t.name](x)


def _unpack_iq3_s(x: Tensor) -> tuple[Tensor, Tensor]:
    """IQ3_S blocks (N, 110) -> codes (N, 256) uint8, scales (N, 8) int32."""
    qs, qh, signs, scales = x[:, 2:66], x[:, 66:74], x[:, 74:106], x[:, 106:110]
    idx = qs.long() | (_from_bits8(qh).long() << 8)  # (N, 64) 9-bit indices
    return codes_from_indices(idx, _from_bits8(signs), LATTICES["iq3_s"]), _nibble_scales(scales)


def _unpack_iq2_xs(x: Tensor) -> tuple[Tensor, Tensor]:
    """IQ2_XS blocks (N, 74) -> codes (N, 256) uint8, scales (N, 16) int32."""
    q16 = x[:, 2:66].reshape(-1, 32, 2).long()
    q16 = q16[..., 0] | (q16[..., 1] << 8)  # (N, 32) 9-bit index | 7 sign bits << 9
    return codes_from_indices(q16 & 511, _signs8(q16 >> 9), LATTICES["iq2_xs"]), _nibble_scales(x[:, 66:74])


def _unpack_iq2_s(x: Tensor) -> tuple[Tensor, Tensor]:
    """IQ2_S blocks (N, 82) -> codes (N, 256) uint8, scales (N, 16) int32."""
    qh = x[:, 66:74].long()  # (N, 8): 2 high index bits for each of a sub-block's 4 groups
    hi = (qh[..., None] >> (2 * torch.arange(4, device=x.device))) & 3  # (N, 8, 4)
    idx = x[:, 2:34].long() | (hi.reshape(-1, 32) << 8)  # (N, 32) 10-bit
    return codes_from_indices(idx, _from_bits8(x[:, 34:66]), LATTICES["iq2_s"]), _nibble_scales(x[:, 74:82])


def _sign7(u: Tensor) -> Tensor:
    """IQ2: the 7 stored sign bits of each group of 8 codes (the 8th is their parity).  (N, 8g) -> (N, g) int64"""
    neg = ((u >> 3) & 1).long().view(u.shape[0], -1, 8)[..., :7]
    return (neg << torch.arange(7, device=u.device)).sum(-1)


def _signs8(sign7: Tensor) -> Tensor:
    """Inverse of `_sign7`: 8 sign bits per group, the last their parity.  (N, g) -> (N, 8g)"""
    bits = (sign7[..., None] >> torch.arange(7, device=sign7.device)) & 1  # (N, g, 7)
    return torch.cat([bits, bits.sum(-1, keepdim=True) % 2], dim=-1).reshape(sign7.shape[0], -1)


def _qh32(u: Tensor) -> Tensor:
    """Q5_0/Q5_1: the 32 high bits of a block's codes as a little-endian uint32.  (N, 4)"""
    hi = ((u >> 4) & 1).view(-1, 4, 8)  # byte k holds codes 8k..8k+7
    shifts = torch.arange(8, device=u.device, dtype=torch.uint8)
    return (hi << shifts).sum(-1).to(torch.uint8)


def _pack_scales_3k(sc: Tensor) -> Tensor:
    """Q3_K: 16 unsigned 6-bit scales in 12 bytes.  (N, 16) -> (N, 12)"""
    low = (sc[:, :8] & 15) | ((sc[:, 8:] & 15) << 4)
    high = torch.zeros(sc.shape[0], 4, dtype=torch.uint8, device=sc.device)
    for j in range(4):
        high |= ((sc[:, 4 * j : 4 * j + 4] >> 4) & 3) << (2 * j)
    return torch.cat([low, high], dim=1)


def _unpack_scales_3k(b: Tensor) -> Tensor:
    low = torch.cat([b[:, :8] & 15, b[:, :8] >> 4], dim=1)  # (N, 16)
    high = torch.cat([(b[:, 8:12] >> (2 * j)) & 3 for j in range(4)], dim=1)
    return low | (high << 4)


def _pack_scales_4k(sc: Tensor, mn: Tensor) -> Tensor:
    """Q4_K/Q5_K: 8 scales and 8 mins of 6 bits in 12 bytes.  (N, 8) x2 -> (N, 12)"""
    a = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    b = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    c = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    return torch.cat([a, b, c], dim=1)


def _unpack_scales_4k(x: Tensor) -> tuple[Tensor, Tensor]:
    a, b, c = x[:, :4], x[:, 4:8], x[:, 8:12]
    sc = torch.cat([a & 63, (c & 15) | ((a >> 2) & 0x30)], dim=1)
    mn = torch.cat([b & 63, (c >> 4) | ((b >> 2) & 0x30)], dim=1)
    return sc, mn


def unpack(raw: Tensor, t: GGMLType | str, n: int) -> GGMLBlocks:
    """GGUF bytes (rows, row_bytes) of type ``t`` with ``n`` weights per row -> `GGMLBlocks`."""
    t = ggml_type(t) if isinstance(t, str) else t
    rows = raw.shape[0]
    nb = n // t.block
    x = raw.reshape(rows * nb, t.type_size)

    def f16(lo: int) -> Tensor:
        return x[:, lo : lo + 2].contiguous().view(torch.float16).view(rows, nb)

    sc = mn = dmin = None
    if t.name == "q8_0":
        d, u = f16(0), x[:, 2:] ^ 0x80
    elif t.name == "iq4_nl":
        d, u = f16(0), _from_nibbles(x[:, 2:])
    elif t.nonuniform:  # IQ4_XS and the lattice types
        d, (u, sc) = f16(0), _unpack_iquant(t, x)
    elif t.name in ("q4_0", "q4_1"):
        off = 2 if t.name == "q4_0" else 4
        d, qs = f16(0), x[:, off:]
        dmin = f16(2) if t.name == "q4_1" else None
        u = torch.cat([qs & 15, qs >> 4], dim=1)
    elif t.name in ("q5_0", "q5_1"):
        off = 2 if t.name == "q5_0" else 4
        d = f16(0)
        dmin = f16(2) if t.name == "q5_1" else None
        qh, qs = x[:, off : off + 4], x[:, off + 4 :]
        hi = torch.cat([(qh[:, k : k + 1] >> torch.arange(8, dtype=torch.uint8)) & 1 for k in range(4)], dim=1)
        u = torch.cat([qs & 15, qs >> 4], dim=1) | (hi << 4)
    elif t.name == "q2_k":
        scales, qs = x[:, :16], x[:, 16:80]
        d, dmin = f16(80), f16(82)
        sc, mn = (scales & 15).to(torch.int32), (scales >> 4).to(torch.int32)
        u = torch.cat([_bits_from(qs[:, h * 32 : (h + 1) * 32], 2, 4) for h in range(2)], dim=1)
    elif t.name == "q3_k":
        hmask, qs, scales = x[:, :32], x[:, 32:96], x[:, 96:108]
        d = f16(108)
        sc = _unpack_scales_3k(scales).to(torch.int32) - 32
        low = torch.cat([_bits_from(qs[:, h * 32 : (h + 1) * 32], 2, 4) for h in range(2)], dim=1)
        u = low | (_bits_from(hmask, 1, 8) << 2)
    elif t.name in ("q4_k", "q5_k"):
        d, dmin = f16(0), f16(2)
        s8, m8 = _unpack_scales_4k(x[:, 4:16])
        sc, mn = s8.to(torch.int32), m8.to(torch.int32)
        qs = x[:, 16:144] if t.name == "q4_k" else x[:, 48:176]
        u = torch.cat([_bits_from(qs[:, c * 32 : (c + 1) * 32], 4, 2) for c in range(4)], dim=1)
        if t.name == "q5_k":
            u = u | (_bits_from(x[:, 16:48], 1, 8) << 4)
    elif t.name == "q6_k":
        ql, qh, scales = x[:, :128], x[:, 128:192], x[:, 192:208]
        d = f16(208)
        sc = scales.contiguous().view(torch.int8).to(torch.int32)
        low = torch.cat([_bits_from(ql[:, h * 64 : (h + 1) * 64], 4, 2) for h in range(2)], dim=1)
        high = torch.cat([_bits_from(qh[:, h * 32 : (h + 1) * 32], 2, 4) for h in range(2)], dim=1)
        u = low | (high << 4)
    else:
        raise ValueError(f"no unpacking for {t.name}")
    shape = (rows, nb, t.n_sub)
    return GGMLBlocks(
        t,
        u.reshape(rows, n).to(torch.uint8),
        d,
        dmin,
        sc.reshape(shape) if sc is not None else None,
        mn.reshape(shape) if mn is not None else None,
    )
