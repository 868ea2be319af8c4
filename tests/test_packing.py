"""Dense bit packing of integer codes (quantcourse.packing)."""

import pytest
import torch

from quantcourse.packing import pack_codes, packed_size, unpack_codes


@pytest.mark.parametrize("n", [1, 3, 7, 8, 13, 577])
@pytest.mark.parametrize("n_bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_round_trip_every_width_and_odd_lengths(n_bits, n):
    codes = torch.randint(0, 2**n_bits, (3, n), dtype=torch.uint8)
    packed = pack_codes(codes, n_bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, packed_size(n, n_bits))
    assert torch.equal(unpack_codes(packed, n_bits, n), codes)


def test_four_bits_low_nibble_first():
    assert pack_codes(torch.tensor([1, 2, 15]), 4).tolist() == [0x21, 0x0F]


def test_two_bits_lowest_pair_first():
    assert pack_codes(torch.tensor([3, 0, 1, 2, 1]), 2).tolist() == [0b10_01_00_11, 0b01]


def test_three_bits_is_a_dense_bit_stream():
    codes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0])
    stream = sum(c << (3 * j) for j, c in enumerate(codes.tolist()))  # 24 bits, code 0 lowest
    expected = [(stream >> (8 * k)) & 0xFF for k in range(3)]
    assert pack_codes(codes, 3).tolist() == expected
    assert expected == [0b11_010_001, 0b0_101_100_0, 0b000_111_11]  # c2 and c5 straddle two bytes


def test_eight_bits_is_the_identity():
    codes = torch.randint(0, 256, (4, 9), dtype=torch.uint8)
    assert torch.equal(pack_codes(codes, 8), codes)


def test_packed_size():
    assert [packed_size(576, b) for b in (2, 3, 4, 8)] == [144, 216, 288, 576]
    assert packed_size(5, 3) == 2


def test_leading_dimensions_are_kept():
    codes = torch.randint(0, 8, (2, 3, 10))
    assert torch.equal(unpack_codes(pack_codes(codes, 3), 3, 10), codes.to(torch.uint8))


def test_error_code_out_of_range():
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 7\]"):
        pack_codes(torch.tensor([0, 8]), 3)


def test_error_float_codes():
    with pytest.raises(TypeError, match="integer tensor"):
        pack_codes(torch.tensor([0.0, 1.0]), 4)


def test_error_bits_out_of_range():
    with pytest.raises(ValueError, match="n_bits must be an int from 1 to 8"):
        pack_codes(torch.tensor([0]), 9)


def test_error_wrong_packed_length():
    with pytest.raises(ValueError, match="take 2 bytes per row"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 3, 5)


def test_error_packed_not_uint8():
    with pytest.raises(TypeError, match="uint8"):
        unpack_codes(torch.zeros(2, dtype=torch.int32), 4, 4)


def test_error_scalar_codes():
    with pytest.raises(ValueError, match="at least one dimension"):
        pack_codes(torch.tensor(3), 4)
