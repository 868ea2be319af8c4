"""The hidden-test helpers: shortcuts are blocked through every path, and restored afterwards."""

import pytest
import torch

import quantcourse as qc
from quantcourse.grading.hidden import ShortcutUsed, assert_close_to_reference, forbid, random_inputs
from quantcourse.memory import model_bytes as aliased_model_bytes


def test_forbid_blocks_attribute_and_alias_then_restores():
    x = torch.randn(4, 8)
    with forbid("quantcourse.fake_quantize", "quantcourse.primitives.fake_quantize"), pytest.raises(ShortcutUsed):
        qc.fake_quantize(x, 4)
    with (
        forbid("quantcourse.memory.model_bytes", "quantcourse.model_bytes"),
        pytest.raises(AssertionError, match="write it yourself"),
    ):
        aliased_model_bytes(7e9, 16)
    assert aliased_model_bytes(7e9, 16) == qc.model_bytes(7e9, 16) == 14e9
    torch.testing.assert_close(qc.fake_quantize(x, 8), qc.primitives.fake_quantize(x, 8))


def test_random_inputs_are_seeded_and_heavy_tailed_on_request():
    a, b = random_inputs((1000,), seed=3), random_inputs((1000,), seed=3)
    assert torch.equal(a, b)
    normal, heavy = random_inputs((20000,), seed=1), random_inputs((20000,), seed=1, heavy_tail=True)
    # Student-t with 3 degrees of freedom: P(|x| > 4) is about 2.8%; for a standard normal it is 0.006%.
    assert (heavy.abs() > 4).float().mean() > 0.01
    assert (normal.abs() > 4).float().mean() < 0.001


def test_assert_close_to_reference_messages():
    with pytest.raises(AssertionError, match="shape"):
        assert_close_to_reference(torch.zeros(2), torch.zeros(3))
    with pytest.raises(AssertionError, match="torch.Tensor"):
        assert_close_to_reference([0.0], torch.zeros(1))
    with pytest.raises(AssertionError, match="differs"):
        assert_close_to_reference(torch.ones(2), torch.zeros(2))
