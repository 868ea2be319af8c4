"""The weight-only record and grid (quantcourse.weights): GPTQ's reference grid, round-to-nearest, QuantizedWeight."""

import pytest
import torch

import quantcourse as qc
from quantcourse.weights import QuantizedWeight, dequantize_codes, rtn_quantize, weight_qparams

# ---- the grid (GPTQ reference quant.py) -------------------------------------------------------------------------


def test_grid_asymmetric_hand_worked_and_equal_to_choose_qparams():
    W = torch.tensor([[-1.0, 0.5, 2.0], [0.5, 1.0, 1.5]])
    qp = weight_qparams(W, 2)  # maxq = 3
    assert torch.allclose(qp.scale[:, 0], torch.tensor([1.0, 0.5]))  # ranges [-1, 2] and [0, 1.5]
    assert qp.zero_point[:, 0].tolist() == [1, 0]
    lib = qc.choose_qparams(W, 2, symmetric=False, granularity=qc.PerChannel(0))
    assert torch.equal(qp.scale, lib.scale) and torch.equal(qp.zero_point, lib.zero_point)


def test_grid_symmetric_uses_all_levels_with_zero_at_the_middle():
    W = torch.tensor([[-3.5, 1.0, 3.5]])
    qp = weight_qparams(W, 3, symmetric=True)  # scale = 2 * 3.5 / 7 = 1, zero point 4
    assert qp.scale.item() == 1.0 and qp.zero_point.item() == 4
    codes = qc.quantize(W, qp)
    assert codes.tolist() == [[0, 5, 7]]  # -3.5 -> round(-3.5) = -4 -> 0;  3.5 -> 8, clamped to 7
    assert qc.dequantize(codes, qp).tolist() == [[-4.0, 1.0, 3.0]]  # one level more below 0 than above
    assert not qp.symmetric  # unsigned codes: a zero-point QParams whose zero point is 2^(b-1)


def test_grid_all_zero_row_gets_the_reference_range():
    qp = weight_qparams(torch.zeros(1, 4), 4)
    assert qp.scale.item() == pytest.approx(2 / 15)
    assert qp.zero_point.item() == 7  # round(1 / float32(2/15)) = round(7.4999996)
    assert weight_qparams(torch.zeros(1, 4), 4, symmetric=True).zero_point.item() == 8


def test_grid_symmetric_quirk_for_rows_without_negative_values():
    qp = weight_qparams(torch.tensor([[0.0, 1.5]]), 4, symmetric=True)
    assert qp.scale.item() == pytest.approx(1.5 / 15) and qp.zero_point.item() == 8


def test_rtn_matches_the_library_primitives():
    W = torch.randn(16, 64)
    r = rtn_quantize(W, 4, group_size=16)
    qp = weight_qparams(W, 4, granularity=qc.PerGroup(16))
    assert torch.equal(r.codes, qc.quantize(W, qp))
    assert torch.equal(r.weight, qc.dequantize(qc.quantize(W, qp), qp))
    assert r.loss is None and r.perm is None


def test_quantized_weight_fills_in_consecutive_groups():
    codes = torch.randint(0, 16, (3, 8), dtype=torch.uint8)
    scale, zero = torch.rand(3, 2) + 0.1, torch.full((3, 2), 8, dtype=torch.int32)
    r = QuantizedWeight(codes.float(), codes, scale, zero, 4, 4, False)
    assert r.g_idx.tolist() == [0, 0, 0, 0, 1, 1, 1, 1] and r.has_consecutive_groups
    assert r.perm is None and r.loss is None and r.codebook is None
    expected = scale[:, [0, 0, 0, 0, 1, 1, 1, 1]] * (codes.float() - 8)
    assert torch.equal(r.dequantize(), expected)


def test_quantized_weight_with_reordered_groups_is_not_consecutive():
    codes = torch.zeros(2, 4, dtype=torch.uint8)
    r = QuantizedWeight(
        codes.float(),
        codes,
        torch.ones(2, 2),
        torch.zeros(2, 2, dtype=torch.int32),
        4,
        2,
        False,
        g_idx=torch.tensor([0, 1, 0, 1]),
    )
    assert not r.has_consecutive_groups


def test_dequantize_codes_with_a_codebook_looks_codes_up():
    codebook = torch.tensor([-1.0, -0.25, 0.5, 1.0])  # a non-uniform 2-bit format
    codes = torch.tensor([[0, 1, 2, 3], [3, 3, 0, 1]], dtype=torch.uint8)
    scale, zero = torch.tensor([[2.0], [0.5]]), torch.zeros(2, 1, dtype=torch.int32)
    got = dequantize_codes(codes, scale, zero, torch.zeros(4, dtype=torch.long), codebook=codebook)
    assert got.tolist() == [[-2.0, -0.5, 1.0, 2.0], [0.5, 0.5, -0.5, -0.125]]


def test_error_group_size_not_positive():
    with pytest.raises(ValueError, match="positive int"):
        rtn_quantize(torch.randn(4, 8), 4, group_size=0)
