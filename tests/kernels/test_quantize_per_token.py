"""quantize_per_token_int8 equals the library's per-token absmax int8 (codes and scales, bit for bit)."""

import pytest
import torch
from conftest import DEVICE, FLOAT_DTYPES

from quantcourse import kernels
from quantcourse.kernels import per_token_int8_reference


@pytest.mark.parametrize("shape", [(1, 7), (3, 64), (5, 129), (2, 3, 100), (1, 300)])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_codes_and_scales_equal_the_library(shape, dtype):
    gen = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=gen) * torch.rand(shape[:-1] + (1,), generator=gen) * 5).to(dtype).to(DEVICE)
    q, s = kernels.quantize_per_token_int8(x)
    q_ref, s_ref = per_token_int8_reference(x)
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == (*x.shape[:-1], 1)
    assert torch.equal(s, s_ref)
    assert torch.equal(q, q_ref)


def test_ties_round_half_to_even_and_zero_rows_get_the_floor_scale():
    # absmax 127 -> scale exactly 1, so x / scale lands on .5 ties; torch.round sends them to even
    ties = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49999997, 126.5]])
    zeros = torch.zeros(1, 9)
    x = torch.cat([ties, zeros]).to(DEVICE)
    q, s = kernels.quantize_per_token_int8(x)
    assert q[0].tolist() == [127, 0, 2, 2, 0, -2, -2, 0, 126]
    q_ref, s_ref = per_token_int8_reference(x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    assert s[1].item() == torch.finfo(torch.float32).eps and q[1].abs().sum() == 0


def test_heavy_tailed_rows():
    gen = torch.Generator().manual_seed(3)
    x = torch.distributions.StudentT(2.0).sample((4, 96)).to(DEVICE)
    x[1, 5] = 300.0  # an outlier token: the rest of its row collapses to few codes
    q, s = kernels.quantize_per_token_int8(x)
    q_ref, s_ref = per_token_int8_reference(x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    del gen


def test_bad_inputs_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="NaN or Inf"):
        kernels.quantize_per_token_int8(torch.tensor([[1.0, float("nan")]], device=DEVICE))
    with pytest.raises(TypeError, match="floating-point"):
        kernels.quantize_per_token_int8(torch.ones(2, 3, dtype=torch.int32, device=DEVICE))
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        kernels.quantize_per_token_int8(torch.ones(2, 3, dtype=torch.float64, device=DEVICE))
