"""GGML block formats (llama.cpp's GGUF weight types): the grids, their byte layouts, and fitting.

Each type stores a row of weights in blocks of 32 (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) or 256-weight
super-blocks (the k-quants Q2_K .. Q6_K) whose sub-blocks of 16 or 32 weights have their own scale
(and min), itself quantized against the super-block's float16 scale. Every type dequantizes as

    w = S * (u - offset)    symmetric types (Q4_0, Q5_0, Q8_0, Q3_K, Q6_K)
    w = S * u - M           affine types (Q4_1, Q5_1: M = -m; Q2_K, Q4_K, Q5_K: M = dmin * mn)

with unsigned codes ``u`` in [0, 2**bits) and per-sub-block ``S`` (and ``M``) computed in float32
from the stored float16 and integer parts, in the order llama.cpp's reference dequantization (and
the ``gguf`` package) uses, so `dequantize` here is bit-exact with them.

`GGMLBlocks` holds codes plus the raw stored parts; `pack`/`unpack` convert to and from the exact
bytes of a GGUF tensor row; `fit_grid` chooses the parts for a weight matrix (importance-weighted
least squares over candidate scales, the approach of llama.cpp's ``make_qkx2_quants``, written
here from the format's definition), and `grid_of` gives the effective per-sub-block (scale, zero)
that GPTQ's error compensation rounds on, so the file stores exactly the grid GPTQ optimized.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class GGMLType:
    """One GGUF block type."""

    name: str  # lower-case recipe name: "q4_k"
    type_id: int  # ggml_type enum value
    bits: int
    block: int  # weights per (super-)block
    sub: int  # weights per sub-block sharing one scale
    type_size: int  # bytes per block
    affine: bool  # has a min: w = S*u - M
    scale_bits: int = 0  # k-quants: bits of the sub-block scales (and mins); 0: the block's fp16 d directly

    @property
    def offset(self) -> int:
        """Code of zero for symmetric types."""
        return 2 ** (self.bits - 1)

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    @property
    def n_sub(self) -> int:
        return self.block // self.sub

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.type_size / self.block

    def row_bytes(self, n: int) -> int:
        return n // self.block * self.type_size


TYPES: dict[str, GGMLType] = {
    t.name: t
    for t in (
        GGMLType("q4_0", 2, 4, 32, 32, 18, False),
        GGMLType("q4_1", 3, 4, 32, 32, 20, True),
        GGMLType("q5_0", 6, 5, 32, 32, 22, False),
        GGMLType("q5_1", 7, 5, 32, 32, 24, True),
        GGMLType("q8_0", 8, 8, 32, 32, 34, False),
        GGMLType("q2_k", 10, 2, 256, 16, 84, True, 4),
        GGMLType("q3_k", 11, 3, 256, 16, 110, False, 6),
        GGMLType("q4_k", 12, 4, 256, 32, 144, True, 6),
        GGMLType("q5_k", 13, 5, 256, 32, 176, True, 6),
        GGMLType("q6_k", 14, 6, 256, 16, 210, False, 8),
    )
}
GRID_NAMES = tuple(TYPES)


def ggml_type(name: str) -> GGMLType:
    try:
        return TYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown GGUF type {name!r}; choose one of {', '.join(GRID_NAMES)}") from None


@dataclass
class GGMLBlocks:
    """Codes and stored parts of one (rows, n) matrix in a GGML type; n a multiple of the block.

    d: (rows, nb) float16, the block scale; dmin: (rows, nb) float16, the k-quant min scale or the
    Q4_1/Q5_1 block min ``m``; sc, mn: (rows, nb, n_sub) int32 sub-block scales / mins (k-quants;
    Q3_K's are signed -32..31, Q6_K's -128..127); codes: (rows, n) uint8 in [0, 2**bits).
    """

    type: GGMLType
    codes: Tensor
    d: Tensor
    dmin: Tensor | None = None
    sc: Tensor | None = None
    mn: Tensor | None = None


# ---- effective grid ---------------------------------------------------------------------------


def sub_scales(b: GGMLBlocks) -> tuple[Tensor, Tensor | None]:
    """Per-sub-block float32 scale S and min M (None for symmetric types).  -> (rows, n/sub) x2"""
    t = b.type
    d = b.d.float()
    if t.scale_bits == 0:  # one scale per 32-block
        S = d
        M = -b.dmin.float() if t.affine and b.dmin is not None else None
        return S, M
    assert b.sc is not None
    S = (d[..., None] * b.sc.float()).flatten(1)  # (rows, nb*n_sub)
    if not t.affine:
        return S, None
    assert b.dmin is not None and b.mn is not None
    return S, (b.dmin.float()[..., None] * b.mn.float()).flatten(1)


def dequantize(b: GGMLBlocks) -> Tensor:
    """The weights the blocks represent, float32, bit-exact with llama.cpp's reference.  (rows, n)"""
    t = b.type
    rows, n = b.codes.shape
    S, M = sub_scales(b)
    u = b.codes.view(rows, -1, t.sub).float()  # (rows, n/sub, sub)
    if t.name in ("q4_1", "q5_1"):  # d*u + m
        w = S[..., None] * u + b.dmin.float()[..., None]  # type: ignore[union-attr]
    elif M is not None:  # S*u - M
        w = S[..., None] * u - M[..., None]
    else:  # S * (u - offset)
        w = S[..., None] * (u - t.offset)
    return w.view(rows, n)


def grid_of(b: GGMLBlocks) -> tuple[Tensor, Tensor]:
    """(scale, zero) per sub-block with w ≈ (u - zero) * scale: the grid GPTQ rounds on.
    Exact for symmetric types; affine types' zero = M / S.  -> (rows, n/sub) x2"""
    S, M = sub_scales(b)
    if M is None:
        return S, torch.full_like(S, float(b.type.offset))
    safe = torch.where(S == 0, torch.ones_like(S), S)
    return S, M / safe


def codes_on_grid(w: Tensor, b: GGMLBlocks) -> Tensor:
    """Round (rows, n) ``w`` to the nearest code of the blocks' grid.  -> (rows, n) uint8"""
    t = b.type
    rows, n = w.shape
    S, Z = grid_of(b)
    safe = torch.where(S == 0, torch.full_like(S, 1e-30), S)
    u = w.float().view(rows, -1, t.sub) / safe[..., None] + Z[..., None]
    return u.round().clamp(0, t.qmax).to(torch.uint8).view(rows, n)


# ---- fitting ----------------------------------------------------------------------------------


def _fit_affine(
    x: Tensor, wt: Tensor, qmax: int, steps: int = 20, min_at_most_zero: bool = True
) -> tuple[Tensor, Tensor]:
    """Per row of (N, g) ``x``: scale s and min m (x ≈ s*u + m, u in [0, qmax]) minimizing the
    ``wt``-weighted squared error, over candidate scales around (max-min)/qmax, each refit by
    weighted least squares given its codes.  -> (N,) x2. ``min_at_most_zero``: m <= 0, as the
    k-quants require (Q4_1/Q5_1 store any float min)."""
    lo = x.amin(-1).clamp(max=0) if min_at_most_zero else x.amin(-1)
    hi = x.amax(-1)
    rng = (hi - lo).clamp(min=1e-20)
    best_s, best_m = rng / qmax, lo
    best_err = _affine_err(x, wt, best_s, best_m, qmax)
    sw = wt.sum(-1)
    for i in range(steps + 1):
        iscale = (qmax - 1 + 0.1 * i) / rng  # candidates around qmax / range
        u = ((x - lo[:, None]) * iscale[:, None]).round().clamp(0, qmax)
        # weighted least squares for x ≈ s*u + m
        su = (wt * u).sum(-1)
        suu = (wt * u * u).sum(-1)
        sx = (wt * x).sum(-1)
        sux = (wt * u * x).sum(-1)
        det = sw * suu - su * su
        ok = det > 0
        s = torch.where(ok, (sw * sux - su * sx) / torch.where(ok, det, 1), best_s)
        m = torch.where(ok, (suu * sx - su * sux) / torch.where(ok, det, 1), best_m)
        if min_at_most_zero:  # a min above zero: refit the scale with m = 0
            pos = m > 0
            s = torch.where(pos, sux / suu.clamp(min=1e-30), s)
            m = torch.where(pos, torch.zeros_like(m), m)
        err = _affine_err(x, wt, s, m, qmax)
        better = (err < best_err) & (s > 0)
        best_err = torch.where(better, err, best_err)
        best_s, best_m = torch.where(better, s, best_s), torch.where(better, m, best_m)
    return best_s, best_m


def _affine_err(x: Tensor, wt: Tensor, s: Tensor, m: Tensor, qmax: int) -> Tensor:
    safe = torch.where(s > 0, s, torch.ones_like(s))
    u = ((x - m[:, None]) / safe[:, None]).round().clamp(0, qmax)
    return (wt * (s[:, None] * u + m[:, None] - x).pow(2)).sum(-1)


def _fit_symmetric(x: Tensor, wt: Tensor, offset: int, steps: int = 18) -> Tensor:
    """Per row of (N, g) ``x``: signed scale s (x ≈ s*q, q in [-offset, offset-1]) minimizing the
    weighted squared error; candidates put the largest magnitude at -offset (either sign) and
    nearby levels, each refit by least squares given its codes.  -> (N,)"""
    idx = x.abs().argmax(-1, keepdim=True)
    amax = x.gather(-1, idx).squeeze(-1)  # signed value of largest magnitude
    best_s = amax / -offset
    best_err = _sym_err(x, wt, best_s, offset)
    for i in range(steps + 1):
        level = -offset + (i - steps / 2) * 0.1  # around -offset
        if abs(level) < 0.5:
            continue
        iscale = level / torch.where(amax == 0, torch.ones_like(amax), amax)
        q = (x * iscale[:, None]).round().clamp(-offset, offset - 1)
        sqq = (wt * q * q).sum(-1)
        s = (wt * q * x).sum(-1) / sqq.clamp(min=1e-30)
        err = _sym_err(x, wt, s, offset)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
    return best_s


def _sym_err(x: Tensor, wt: Tensor, s: Tensor, offset: int) -> Tensor:
    safe = torch.where(s == 0, torch.ones_like(s), s)
    q = (x / safe[:, None]).round().clamp(-offset, offset - 1)
    return (wt * (s[:, None] * q - x).pow(2)).sum(-1)


def _quantize_scales(s: Tensor, levels: int, signed: bool) -> tuple[Tensor, Tensor]:
    """Sub-block scales (rows, nb, n_sub) as integers times one float16 block scale d.
    Unsigned: 0..levels; signed: -levels-1..levels (largest magnitude at the negative end, as the
    sub-scales' own sign carries it).  -> (d (rows, nb) float16, ints (rows, nb, n_sub) int32)"""
    if signed:
        idx = s.abs().argmax(-1, keepdim=True)
        big = s.gather(-1, idx).squeeze(-1)  # (rows, nb) signed
        d = (big / -(levels + 1)).half()
        df = d.float()
        ints = (s / torch.where(df == 0, torch.ones_like(df), df)[..., None]).round().clamp(-(levels + 1), levels)
    else:
        d = (s.amax(-1) / levels).half()
        df = d.float()
        ints = (s / torch.where(df == 0, torch.ones_like(df), df)[..., None]).round().clamp(0, levels)
    return d, torch.where(df[..., None] == 0, torch.zeros_like(ints), ints).to(torch.int32)


def fit_grid(w: Tensor, t: GGMLType, importance: Tensor | None = None) -> GGMLBlocks:
    """Choose the stored scales (and mins) of type ``t`` for (rows, n) ``w``; codes are the
    nearest on that grid. ``importance`` (n,) weights each column's squared error (for example
    the input Hessian's diagonal, making it the output error under a diagonal covariance)."""
    rows, n = w.shape
    check_width(t, n)
    wf = w.detach().float()
    imp = torch.ones(n, device=w.device) if importance is None else importance.float().clamp(min=0) + 1e-12
    x = wf.reshape(-1, t.sub)  # (rows*n/sub, sub)
    wt = imp.view(1, -1).expand(rows, n).reshape(-1, t.sub)
    if t.affine:
        s, m = _fit_affine(x, wt, t.qmax, min_at_most_zero=t.scale_bits > 0)
        return from_sub_grid(wf, t, s.view(rows, -1), -m.view(rows, -1))
    return from_sub_grid(wf, t, _fit_symmetric(x, wt, t.offset).view(rows, -1))


def check_width(t: GGMLType, n: int) -> None:
    if n % t.block:
        raise ValueError(f"{t.name} needs rows that are a multiple of {t.block} weights, got {n}")


def from_sub_grid(w: Tensor, t: GGMLType, S: Tensor, M: Tensor | None = None) -> GGMLBlocks:
    """Blocks of type ``t`` from float per-sub-block scales S and mins M (w ≈ S*u - M; symmetric
    types: w ≈ S*(u - offset), M None): the scales are stored the type's way (float16, or integers
    under a float16 super-block scale), then the codes are the nearest on the stored grid.
    (rows, n) ``w``; S, M (rows, n/sub)."""
    rows, n = w.shape
    check_width(t, n)
    nb = n // t.block
    if t.scale_bits == 0:  # 32-blocks with a float16 scale (and min)
        if t.affine:
            assert M is not None
            b = GGMLBlocks(t, torch.empty(0), S.half().view(rows, nb), (-M).half().view(rows, nb))
        else:
            b = GGMLBlocks(t, torch.empty(0), S.half().view(rows, nb))
    elif t.affine:  # k-quants with mins (M >= 0)
        assert M is not None
        levels = 2**t.scale_bits - 1
        d, sc = _quantize_scales(S.clamp(min=0).reshape(rows, nb, t.n_sub), levels, signed=False)
        dmin, mn = _quantize_scales(M.clamp(min=0).reshape(rows, nb, t.n_sub), levels, signed=False)
        b = GGMLBlocks(t, torch.empty(0), d, dmin, sc, mn)
    else:  # Q3_K, Q6_K: signed sub-scales
        levels = 2 ** (t.scale_bits - 1) - 1
        d, sc = _quantize_scales(S.reshape(rows, nb, t.n_sub), levels, signed=True)
        b = GGMLBlocks(t, torch.empty(0), d, sc=sc)
    b.codes = codes_on_grid(w.float(), b)
    return b


def quantize(w: Tensor, t: GGMLType | str, importance: Tensor | None = None) -> GGMLBlocks:
    """Round-to-nearest on a fitted grid of type ``t``."""
    return fit_grid(w, ggml_type(t) if isinstance(t, str) else t, importance)


# ---- bytes ------------------------------------------------------------------------------------


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
