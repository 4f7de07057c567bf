import numpy as np
import pytest

from edge_recover.errors import EdgeRecoverError
from edge_recover.packing import n_blocks, pack_codes, pack_zero_points, unpack_codes, unpack_zero_points


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("block_size", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("shape", [(3, 16), (5, 100), (7, 576), (2, 1000)])
def test_pack_unpack_codes_round_trip(bits, block_size, shape):
    rng = np.random.default_rng(bits * block_size + shape[1])
    codes = rng.integers(0, 1 << bits, size=shape, dtype=np.uint8)
    packed = pack_codes(codes, bits, block_size)
    assert packed.shape == (shape[0], n_blocks(shape[1], block_size), block_size * bits // 8)
    assert packed.dtype == np.uint8
    np.testing.assert_array_equal(unpack_codes(packed, bits, shape[1]), codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("nb", [1, 3, 4, 5, 36])
def test_pack_unpack_zero_points_round_trip(bits, nb):
    zp = np.random.default_rng(nb).integers(0, 1 << bits, size=(6, nb), dtype=np.uint8)
    packed = pack_zero_points(zp, bits)
    assert packed.shape == (6, -(-nb * bits // 8))
    np.testing.assert_array_equal(unpack_zero_points(packed, bits, nb), zp)


def test_low_bits_first():
    codes = np.array([[1, 2, 3, 0] + [0] * 12], np.uint8)
    # 2-bit, low bits first: 1 | 2<<2 | 3<<4 | 0<<6 = 0b00111001
    assert pack_codes(codes, 2, 16)[0, 0, 0] == 0b00111001
    assert pack_codes(np.array([[0xA, 0x5] + [0] * 14], np.uint8), 4, 16)[0, 0, 0] == 0x5A


def test_codes_too_large_are_refused():
    with pytest.raises(EdgeRecoverError, match="exceed 2 bits"):
        pack_codes(np.full((1, 16), 4, np.uint8), 2, 16)
