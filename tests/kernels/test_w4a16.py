"""The W4A16 GEMV and GEMM equal x @ dequantize(record)ᵀ, reading quantcourse.packing's int4 layout."""

import dataclasses

import pytest
import torch
from conftest import DEVICE, FLOAT_DTYPES

from quantcourse import kernels
from quantcourse.gptq import gptq_quantize
from quantcourse.kernels import Int4Weight, w4a16_reference
from quantcourse.packing import pack_codes
from quantcourse.weights import rtn_quantize

# (N, K, group_size, allow_partial_group): odd sizes, sizes that are not multiples of the tiles, per channel
WEIGHTS = [(33, 64, 32, False), (17, 100, None, False), (48, 96, 16, False), (20, 70, 32, True), (9, 45, 8, True)]
# every weight in float32; the half types on two of them (the interpreter takes about a second per case)
CASES = [(*w, torch.float32) for w in WEIGHTS] + [
    (*w, dtype) for dtype in FLOAT_DTYPES if dtype != torch.float32 for w in (WEIGHTS[0], WEIGHTS[3])
]


def _weight(N, K, group_size, partial, symmetric=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=gen)
    record = rtn_quantize(W, 4, group_size=group_size, symmetric=symmetric, allow_partial_group=partial)
    return record, Int4Weight.from_record(record).to(DEVICE)


def _tolerance(dtype, ref):
    scale = ref.abs().max().item() + 1e-6
    # float32: only the order of the sums differs; float16/bfloat16: the result's own rounding (and, in the
    # GEMM, the weight tile rounded to the input dtype for tl.dot)
    eps = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 1.5e-2}[dtype]
    return {"rtol": 0, "atol": eps * scale}


def test_packed_layout_is_quantcourse_packing_low_nibble_first():
    W = torch.randn(3, 5)
    record = rtn_quantize(W, 4, group_size=None)
    w = Int4Weight.from_record(record)
    assert torch.equal(w.packed, pack_codes(record.codes, 4))
    c = record.codes
    assert w.packed[0, 0].item() == c[0, 0].item() | (c[0, 1].item() << 4), "code 0 in the low nibble"
    assert w.packed[0, 2].item() == c[0, 4].item(), "odd K: the last high nibble is 0"
    assert torch.equal(w.codes(), c) and torch.equal(w.dequantize(), record.dequantize())


@pytest.mark.parametrize("N,K,group_size,partial,dtype", CASES)
@pytest.mark.parametrize("M", [1, 3])
def test_gemv_equals_the_reference(N, K, group_size, partial, M, dtype):
    record, w = _weight(N, K, group_size, partial, seed=N + K)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(dtype).to(DEVICE)
    got = kernels.w4a16_gemv(x, w, split_k=1)
    ref = x.float() @ record.dequantize().to(DEVICE).T
    assert got.dtype == dtype and got.shape == (M, N)
    torch.testing.assert_close(got.float(), ref, **_tolerance(dtype, ref))


@pytest.mark.parametrize("N,K,group_size,partial,dtype", CASES)
@pytest.mark.parametrize("M", [5, 37])
def test_gemm_equals_the_reference(N, K, group_size, partial, M, dtype):
    record, w = _weight(N, K, group_size, partial, symmetric=True, seed=N * K)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(dtype).to(DEVICE)
    got = kernels.w4a16_gemm(x, w, split_k=1)
    ref = x.float() @ record.dequantize().to(DEVICE).T
    assert got.dtype == dtype and got.shape == (M, N)
    torch.testing.assert_close(got.float(), ref, **_tolerance(dtype, ref))


@pytest.mark.parametrize("fn", [kernels.w4a16_gemv, kernels.w4a16_gemm])
@pytest.mark.parametrize("split_k", [2, 3, 7])
def test_split_k_adds_up_to_the_same_product(fn, split_k):
    record, w = _weight(24, 200, 40, False, seed=split_k)
    x = torch.randn(2, 200).to(DEVICE)
    ref = w4a16_reference(x, w)
    torch.testing.assert_close(fn(x, w, split_k=split_k), ref, rtol=0, atol=1e-4 * ref.abs().max().item())
    # more slices than K blocks: the empty slices contribute zeros
    torch.testing.assert_close(fn(x, w, split_k=40), ref, rtol=0, atol=1e-4 * ref.abs().max().item())


def test_linear_dispatches_and_keeps_leading_dimensions():
    record, w = _weight(16, 64, 32, False)
    for shape in [(64,), (1, 1, 64), (2, 6, 64)]:
        x = torch.randn(shape).to(DEVICE)
        got = kernels.w4a16_linear(x, w)
        assert got.shape == (*shape[:-1], 16)
        ref = w4a16_reference(x, w)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-4 * ref.abs().max().item())


def test_a_gptq_record_works_too():
    gen = torch.Generator().manual_seed(1)
    W, X = torch.randn(12, 64, generator=gen), torch.randn(256, 64, generator=gen)
    record = gptq_quantize(W, 2 * X.T @ X / 256, 4, group_size=16, act_order=True, static_groups=True)
    w = Int4Weight.from_record(record).to(DEVICE)
    x = torch.randn(1, 64).to(DEVICE)
    ref = x @ record.weight.to(DEVICE).T
    torch.testing.assert_close(kernels.w4a16_gemv(x, w), ref, rtol=0, atol=1e-4 * ref.abs().max().item())


def test_records_the_kernels_cannot_read_are_refused():
    gen = torch.Generator().manual_seed(2)
    W, X = torch.randn(8, 64, generator=gen), torch.randn(128, 64, generator=gen)
    scattered = gptq_quantize(W, 2 * X.T @ X / 128, 4, group_size=16, act_order=True)
    with pytest.raises(ValueError, match="not consecutive"):
        Int4Weight.from_record(scattered)
    with pytest.raises(ValueError, match="4-bit codes"):
        Int4Weight.from_record(rtn_quantize(W, 3, group_size=16))
    with pytest.raises(TypeError, match="weight-only record"):
        Int4Weight.from_record(W)
    rtn = rtn_quantize(W, 4, group_size=16)
    nf4_like = dataclasses.replace(rtn, codebook=torch.linspace(-1, 1, 16))
    with pytest.raises(ValueError, match="codebook"):
        Int4Weight.from_record(nf4_like)


def test_bad_calls_say_what_is_wrong():
    _, w = _weight(8, 32, 16, False)
    with pytest.raises(ValueError, match="expects 32"):
        kernels.w4a16_gemv(torch.randn(1, 31, device=DEVICE), w)
    with pytest.raises(TypeError, match="Int4Weight"):
        kernels.w4a16_gemm(torch.randn(4, 32, device=DEVICE), torch.randn(8, 32))
    with pytest.raises(ValueError, match="split_k"):
        kernels.w4a16_gemv(torch.randn(1, 32, device=DEVICE), w, split_k=0)
