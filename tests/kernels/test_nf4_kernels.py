"""NF4 dequantization (and the fused NF4 GEMV) equal bitsandbytes' own functions, byte layout included."""

import pytest
import torch
from conftest import DEVICE

from quantcourse import kernels
from quantcourse.kernels import NF4_CODE, nf4_dequantize_reference

bnbf = pytest.importorskip("bitsandbytes.functional")


def _bnb(shape, blocksize, dtype=torch.float32, seed=0):
    W = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    packed, state = bnbf.quantize_4bit(W, blocksize=blocksize, quant_type="nf4")
    return W, packed, state


def _bnb_dequantize(packed, state):
    """bitsandbytes' dequantization of ``packed``, in the tensor's own shape (it returns 1-D tensors as [1, n]).

    Its CPU C kernel (bitsandbytes 0.50) indexes absmax per row, which is wrong when the last dimension is
    even but not a multiple of the block size: those values come back with the absmax of another block
    (errors far beyond the quantization step). Its generic PyTorch path (the CUDA layout: blocks over the
    flattened tensor, as quantize_4bit computes them) is right, and is the reference for such shapes.
    """
    n = state.shape[-1]
    if n % 2 == 0 and n % state.blocksize != 0:
        from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
        from bitsandbytes.backends.utils import _get_4bit_code

        code = _get_4bit_code("nf4", packed.device)
        flat = packed.reshape(-1)
        out = _dequantize_4bit_compute(flat, state.absmax, code, state.blocksize, state.shape, state.dtype)
    else:
        out = bnbf.dequantize_4bit(packed, state)
    return out.reshape(state.shape)


def test_the_code_table_is_bitsandbytes_nf4():
    assert torch.equal(torch.tensor(NF4_CODE, dtype=torch.float32), bnbf.get_4bit_type("nf4", device="cpu").float())


@pytest.mark.parametrize("shape", [(64,), (151,), (7, 64), (33, 96), (5, 128)])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_reference_equals_bitsandbytes_and_the_high_nibble_holds_the_first_element(shape, blocksize):
    W, packed, state = _bnb(shape, blocksize, seed=len(shape))
    ref = nf4_dequantize_reference(packed, state.absmax, state.shape, state.blocksize)
    assert torch.equal(ref, _bnb_dequantize(packed, state))
    first = packed.reshape(-1)[0].item()
    table = torch.tensor(NF4_CODE)
    assert ref.reshape(-1)[0].item() == (table[first >> 4] * state.absmax[0]).item()


@pytest.mark.parametrize("shape", [(64,), (151,), (7, 64), (33, 96), (3, 200)])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_equals_bitsandbytes(shape, blocksize, dtype):
    W, packed, state = _bnb(shape, blocksize, dtype, seed=shape[0])
    got = kernels.nf4_dequantize(
        packed.to(DEVICE), state.absmax.to(DEVICE), state.shape, blocksize=state.blocksize, dtype=dtype
    )
    expected = _bnb_dequantize(packed, state)
    assert got.dtype == dtype and got.shape == W.shape
    assert torch.equal(got.cpu(), expected)


def test_odd_element_counts_and_partial_blocks():
    n, blocksize = 151, 64
    codes = torch.randint(0, 16, (n + 1,), generator=torch.Generator().manual_seed(0))
    codes[-1] = 0
    packed = ((codes[0::2] << 4) | codes[1::2]).to(torch.uint8)  # element 2j high
    absmax = torch.rand(-(-n // blocksize)) + 0.5
    ref = nf4_dequantize_reference(packed, absmax, (n,), blocksize)
    got = kernels.nf4_dequantize(packed.to(DEVICE), absmax.to(DEVICE), (n,), blocksize=blocksize, dtype=torch.float32)
    assert torch.equal(got.cpu(), ref)


@pytest.mark.parametrize("N,K", [(16, 64), (33, 96), (7, 200)])
@pytest.mark.parametrize("M", [1, 2])
@pytest.mark.parametrize("split_k", [1, 3])
def test_fused_gemv_equals_dequantize_then_multiply(N, K, M, split_k):
    W, packed, state = _bnb((N, K), 64, seed=N)
    x = torch.randn(M, K).to(DEVICE)
    got = kernels.nf4_gemv(x, packed.to(DEVICE), state.absmax.to(DEVICE), (N, K), blocksize=64, split_k=split_k)
    ref = x @ _bnb_dequantize(packed, state).to(DEVICE).T
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-5 * ref.abs().max().item())


def test_bad_nf4_inputs():
    W, packed, state = _bnb((4, 64), 64)
    with pytest.raises(ValueError, match="take 256 bytes"):
        kernels.nf4_dequantize(packed.to(DEVICE), state.absmax.to(DEVICE), (4, 64, 2))
    with pytest.raises(ValueError, match="absmax"):
        kernels.nf4_dequantize(packed.to(DEVICE), state.absmax.to(DEVICE), (4, 64), blocksize=32)
    with pytest.raises(TypeError, match="uint8"):
        kernels.nf4_dequantize(packed.to(DEVICE).to(torch.int32), state.absmax.to(DEVICE), (4, 64))
