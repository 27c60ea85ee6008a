"""Dense packing round-trips for every width and matches the format's byte count."""

import pytest
import torch

from lmpress.formats.packing import pack, packed_width, unpack, unpack_float


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("n", [1, 7, 8, 100, 129])
def test_pack_roundtrip(bits: int, n: int) -> None:
    codes = torch.randint(0, 2**bits, (5, n), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, packed_width(n, bits))
    assert torch.equal(unpack(packed, bits, n), codes)
    flip = 2 ** (bits - 1)
    for dtype in (torch.bfloat16, torch.float32):
        assert torch.equal(unpack_float(packed, bits, n, dtype), codes.to(dtype))
        assert torch.equal(unpack_float(packed, bits, n, dtype, flip), (codes ^ flip).to(dtype))


def test_byte_counts_match_the_format() -> None:
    assert packed_width(128, 4) == 64  # two codes per byte
    assert packed_width(128, 3) == 48  # exactly 3 bits per code
    assert packed_width(128, 2) == 32
    assert packed_width(100, 8) == 100


def test_four_bit_layout_is_low_nibble_first() -> None:
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.uint8)
    assert pack(codes, 4).tolist() == [[0x21, 0x43, 0x65, 0x87]]
