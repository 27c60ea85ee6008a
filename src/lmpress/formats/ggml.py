"""GGML block formats (llama.cpp's GGUF weight types): the types, their grids and stored parts.

Each type stores a row of weights in blocks of 32 (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL) or 256-weight
super-blocks (the k-quants Q2_K .. Q6_K, IQ4_XS) whose sub-blocks of 16 or 32 weights have their own scale
(and min), itself quantized against the super-block's float16 scale. Every type dequantizes as

    w = S * (u - offset)    symmetric types (Q4_0, Q5_0, Q8_0, Q3_K, Q6_K)
    w = S * u - M           affine types (Q4_1, Q5_1: M = -m; Q2_K, Q4_K, Q5_K: M = dmin * mn)
    w = S * table[u]        non-uniform types (IQ4_NL, IQ4_XS: llama.cpp's ``kvalues_iq4nl``)
    w = S * |v_k| * ±1      lattice types (IQ3_S, IQ3_XXS, IQ2_S, IQ2_XS, IQ2_XXS: codes
                            k | sign << 3, `lmpress.formats.iquant`)

with unsigned codes ``u`` in [0, 2**bits) and per-sub-block ``S`` (and ``M``) computed in float32
from the stored float16 and integer parts, in the order llama.cpp's reference dequantization (and
the ``gguf`` package) uses, so `dequantize` here is bit-exact with them.

`GGMLBlocks` holds codes plus the raw stored parts; `from_sub_grid` stores float sub-block scales
the type's way, and `grid_of` gives the effective per-sub-block (scale, zero) that GPTQ's error
compensation rounds on, so the file stores exactly the grid GPTQ optimized. The exact bytes of a
GGUF tensor row are `lmpress.formats.ggml_bytes`; choosing the scales for a weight matrix is a
method, `lmpress.quant.ggml_fit`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lmpress.formats.iquant import LATTICES, lattice_codes, lattice_values


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
    nonuniform: bool = False  # no (scale, zero) grid: IQ4_NL, IQ4_XS (w = S * TABLE[u]) and lattices
    lattice: bool = False  # IQ3_S, IQ2_XXS: codebook points, codes k | sign << 3 (`lmpress.formats.iquant`)

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
        GGMLType("iq4_nl", 20, 4, 32, 32, 18, False, 0, nonuniform=True),
        GGMLType("iq4_xs", 23, 4, 256, 32, 136, False, 6, nonuniform=True),
        GGMLType("iq3_s", 21, 3, 256, 32, 110, False, 4, nonuniform=True, lattice=True),
        GGMLType("iq2_xxs", 16, 2, 256, 32, 66, False, 4, nonuniform=True, lattice=True),
        GGMLType("iq2_xs", 17, 2, 256, 16, 74, False, 4, nonuniform=True, lattice=True),
        GGMLType("iq2_s", 22, 2, 256, 16, 82, False, 4, nonuniform=True, lattice=True),
        GGMLType("iq3_xxs", 18, 3, 256, 32, 98, False, 4, nonuniform=True, lattice=True),
    )
}
# llama.cpp's ``kvalues_iq4nl`` (ggml-common.h): the 16 values a non-uniform 4-bit code stands for
TABLE = torch.tensor([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=torch.float32)
GRID_NAMES = tuple(TYPES)
# the recipe spelling of the same names (``grid:``)
GridName = Literal[
    "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_nl", "iq4_xs", "iq3_s",
    "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs",
]  # fmt: skip
# what llama.cpp itself uses when a row is not a multiple of a 256-weight super-block
GRID_FALLBACK = {
    "q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0",
    "iq4_xs": "iq4_nl", "iq3_s": "iq4_nl", "iq3_xxs": "iq4_nl",
    "iq2_xxs": "iq4_nl", "iq2_xs": "iq4_nl", "iq2_s": "iq4_nl",
}  # fmt: skip


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
    if t.lattice:  # IQ3_S: d * (1 + 2*sc); IQ2_XXS: d * (0.5 + sc) / 4
        return LATTICES[t.name].scale(d[..., None], b.sc).flatten(1), None
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
    if t.lattice:  # (S * |v|) * sign, the order llama.cpp multiplies in
        mag, sgn = lattice_values(b.codes.view(rows, -1, t.sub), LATTICES[t.name])
        w = S[..., None] * mag * sgn
    elif t.nonuniform:  # S * table[u]
        w = S[..., None] * TABLE.to(u.device)[b.codes.view(rows, -1, t.sub).long()]
    elif t.name in ("q4_1", "q5_1"):  # d*u + m
        w = S[..., None] * u + b.dmin.float()[..., None]  # type: ignore[union-attr]
    elif M is not None:  # S*u - M
        w = S[..., None] * u - M[..., None]
    else:  # S * (u - offset)
        w = S[..., None] * (u - t.offset)
    return w.view(rows, n)


def grid_of(b: GGMLBlocks) -> tuple[Tensor, Tensor]:
    """(scale, zero) per sub-block with w ≈ (u - zero) * scale: the grid GPTQ rounds on.
    Exact for symmetric types; affine types' zero = M / S; non-uniform types have none.  -> (rows, n/sub) x2"""
    if b.type.nonuniform:
        raise ValueError(f"{b.type.name}'s grid is non-uniform: it has no (scale, zero) form to round on")
    S, M = sub_scales(b)
    if M is None:
        return S, torch.full_like(S, float(b.type.offset))
    safe = torch.where(S == 0, torch.ones_like(S), S)
    return S, M / safe


def codes_on_grid(w: Tensor, b: GGMLBlocks) -> Tensor:
    """Round (rows, n) ``w`` to the nearest code of the blocks' grid.  -> (rows, n) uint8"""
    t = b.type
    rows, n = w.shape
    if t.lattice:
        return lattice_codes(w.float(), sub_scales(b)[0], LATTICES[t.name], sub=t.sub)
    if t.nonuniform:
        return nearest_in_table(w.float().view(rows, -1, t.sub), sub_scales(b)[0][..., None]).view(rows, n)
    S, Z = grid_of(b)
    safe = torch.where(S == 0, torch.full_like(S, 1e-30), S)
    u = w.float().view(rows, -1, t.sub) / safe[..., None] + Z[..., None]
    return u.round().clamp(0, t.qmax).to(torch.uint8).view(rows, n)


def nearest_in_table(x: Tensor, S: Tensor) -> Tensor:
    """Index of the `TABLE` value v minimizing |x - S*v| (ties to the lower value), for ``x`` and
    ``S`` broadcasting together; S == 0 gives the code of the value nearest zero.  -> uint8"""
    table = TABLE.to(x.device)
    safe = torch.where(S == 0, torch.ones_like(S), S)
    y = torch.where(S == 0, torch.zeros_like(x), x / safe)  # in table units; S < 0 flips the order
    mid = (table[1:] + table[:-1]) / 2
    return torch.bucketize(y.contiguous(), mid, right=False).to(torch.uint8)


# ---- storing a grid ---------------------------------------------------------------------------


def check_width(t: GGMLType, n: int) -> None:
    if n % t.block:
        raise ValueError(f"{t.name} needs rows that are a multiple of {t.block} weights, got {n}")


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


def from_sub_grid(w: Tensor, t: GGMLType, S: Tensor, M: Tensor | None = None) -> GGMLBlocks:
    """Blocks of type ``t`` from float per-sub-block scales S and mins M (w ≈ S*u - M; symmetric
    types: w ≈ S*(u - offset), M None): the scales are stored the type's way (float16, or integers
    under a float16 super-block scale), then the codes are the nearest on the stored grid.
    (rows, n) ``w``; S, M (rows, n/sub)."""
    rows, n = w.shape
    check_width(t, n)
    nb = n // t.block
    if t.lattice:  # S ≈ d * (a*sc + b), sc 0..15, S >= 0
        lat, top = LATTICES[t.name], 2**t.scale_bits - 1
        Sb = S.clamp(min=0).reshape(rows, nb, t.n_sub)
        d = (Sb.amax(-1) / (lat.scale_mul * top + lat.scale_add)).half()
        df = d.float()[..., None]
        ratio = Sb / torch.where(df == 0, torch.ones_like(df), df)
        sc = ((ratio - lat.scale_add) / lat.scale_mul).round().clamp(0, top)
        b = GGMLBlocks(t, torch.empty(0), d, sc=sc.to(torch.int32))
    elif t.scale_bits == 0:  # 32-blocks with a float16 scale (and min)
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
