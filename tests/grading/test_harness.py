"""quantcourse.grading.harness: the pieces assignment 6's hidden tests share assemble GPTQ exactly."""

import torch

from quantcourse import gptq
from quantcourse.grading import harness
from quantcourse.grading.hidden import DEVICE


def test_correlated_layer_is_seeded_and_on_the_grading_device():
    W, H = harness.correlated_layer(3, out_f=8, in_f=16)
    W2, H2 = harness.correlated_layer(3, out_f=8, in_f=16)
    assert W.shape == (8, 16) and H.shape == (16, 16) and W.dtype == H.dtype == torch.float64
    assert W.device == H.device == DEVICE and torch.equal(W, W2) and torch.equal(H, H2)
    assert torch.allclose(H, H.T) and torch.linalg.eigvalsh(H).min() > 0


def test_gptq_from_the_reference_parts_equals_the_library():
    for seed, (n_bits, block_size) in enumerate(((3, 32), (4, 24), (2, 128))):
        W, H = harness.correlated_layer(seed, out_f=12, in_f=72)
        got = harness.gptq_from_parts(
            harness.reference_column_step, harness.reference_lazy_update, W, H, n_bits, block_size
        )
        expected = gptq.gptq_quantize(W, H, n_bits, block_size=block_size).weight
        torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-9)


def test_a_wrong_part_is_caught():
    W, H = harness.correlated_layer(0, out_f=12, in_f=64)

    def no_feedback(W1, U1, i, scale, zero, n_bits):  # rounds without spreading the error: that is RTN
        W1, q, err = harness.reference_column_step(W1, U1, i, scale, zero, n_bits)
        return W1, q, torch.zeros_like(err)

    got = harness.gptq_from_parts(no_feedback, harness.reference_lazy_update, W, H, 3, 16)
    assert not torch.allclose(got, gptq.gptq_quantize(W, H, 3, block_size=16).weight, rtol=1e-7, atol=1e-9)
