"""The W8A8 int8 GEMM equals the exact integer product scaled per token and per channel."""

import pytest
import torch
from conftest import DEVICE

from quantcourse import kernels
from quantcourse.kernels import per_channel_int8, per_token_int8_reference, w8a8_reference


@pytest.mark.parametrize("M,N,K", [(1, 17, 64), (7, 40, 5), (33, 24, 100), (16, 32, 32), (3, 65, 130)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_equals_the_exact_integer_product(M, N, K, out_dtype):
    gen = torch.Generator().manual_seed(M * N + K)
    x, W = torch.randn(M, K, generator=gen) * 3, torch.randn(N, K, generator=gen)
    qx, sx = per_token_int8_reference(x)
    qw, sw = per_channel_int8(W)
    got = kernels.w8a8_matmul(qx.to(DEVICE), sx.to(DEVICE), qw.to(DEVICE), sw.to(DEVICE), out_dtype=out_dtype)
    expected = w8a8_reference(qx, sx, qw, sw, out_dtype)
    assert got.dtype == out_dtype and got.shape == (M, N)
    assert torch.equal(got.cpu(), expected), "the int32 accumulation is exact and the epilogue is two multiplies"
    # and it approximates the float product
    rel = (expected.float() - x @ W.T).norm() / (x @ W.T).norm()
    assert rel < 0.02


def test_extreme_codes_accumulate_without_overflow():
    K = 1000  # 127 * 127 * 1000 = 16.1M: past float32's exact integers (2**24), inside int32
    qx = torch.full((2, K), 127, dtype=torch.int8)
    qw = torch.full((3, K), -127, dtype=torch.int8)
    qw[1, ::3] = 127
    sx, sw = torch.ones(2, 1), torch.ones(3, 1)
    got = kernels.w8a8_matmul(qx.to(DEVICE), sx.to(DEVICE), qw.to(DEVICE), sw.to(DEVICE), out_dtype=torch.float32)
    assert got[0, 0].item() == -127 * 127 * K
    assert torch.equal(got.cpu(), w8a8_reference(qx, sx, qw, sw))


def test_bad_inputs():
    qx, sx = torch.zeros(4, 8, dtype=torch.int8), torch.ones(4, 1)
    qw, sw = torch.zeros(5, 8, dtype=torch.int8), torch.ones(5, 1)
    with pytest.raises(TypeError, match="int8"):
        kernels.w8a8_matmul(qx.float(), sx, qw, sw)
    with pytest.raises(ValueError, match="must be \\[N, K\\]"):
        kernels.w8a8_matmul(qx, sx, qw[:, :7], sw)
    with pytest.raises(ValueError, match="one per token"):
        kernels.w8a8_matmul(qx, sx[:3], qw, sw)
