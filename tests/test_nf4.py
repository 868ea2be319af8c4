"""Tests of quantcourse.nf4: bytes equal to bitsandbytes on fresh inputs, round-trip bounds, the module, errors."""

from __future__ import annotations

import zlib

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch

from quantcourse import nf4

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True, scope="module")
def _eager_bitsandbytes():
    """bitsandbytes wraps its PyTorch dequantization in torch.compile; eager runs the same arithmetic without
    compiling once per shape (minutes on two cores)."""
    with torch._dynamo.config.patch(disable=True):
        yield


def _draw(n: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, generator=gen)
    if kind == "heavy":  # Student-t with 2 degrees of freedom: rare huge values set the block absmax
        x = x / (torch.randn(2, n, generator=gen).pow(2).mean(0)).sqrt()
    elif kind == "zeros":  # half the values zero, and whole blocks of zeros
        x[torch.rand(n, generator=gen) < 0.5] = 0
        x[: min(n, 300)] = 0
    elif kind == "tiny":  # absmax below float32's normal range in some blocks (bitsandbytes clamps at 1e-38)
        x = x * 1e-39
    elif kind == "constant":  # every absmax equal: the double-quantized constants are all 0
        x = torch.full((n,), 0.37)
    return x


def _shape(n: int, gen: torch.Generator) -> tuple[int, ...]:
    """A fresh 1-, 2- or 3-D shape of about n values."""
    rank = int(torch.randint(1, 4, (1,), generator=gen))
    if rank == 1:
        return (n,)
    cols = int(torch.randint(1, 700, (1,), generator=gen))
    rows = max(1, n // cols)
    return (rows, cols) if rank == 2 else (2, max(1, rows // 2), cols)


def _bnb_dequantize(data: torch.Tensor, state, shape) -> torch.Tensor:
    """bitsandbytes' dequantization of a flattened copy: its AVX-512 CPU kernel mis-indexes the scales of 2-D
    tensors whose width is not a multiple of the block size (see quantcourse.nf4); 1-D tensors are right."""
    state.shape = torch.Size([state.shape.numel()])
    return bnbF.dequantize_4bit(data, state).reshape(shape)


CASES = [
    (block_size, quant_type, kind, double_quant)
    for block_size in nf4.BLOCK_SIZES
    for quant_type in nf4.QUANT_TYPES
    for kind, double_quant in (("normal", False), ("heavy", True), ("zeros", True), ("tiny", False))
]


@pytest.mark.parametrize(("block_size", "quant_type", "kind", "double_quant"), CASES)
def test_bytes_equal_bitsandbytes(block_size, quant_type, kind, double_quant):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{block_size}{quant_type}{kind}".encode()))
    for trial in range(3):
        n = int(torch.randint(1, 6000, (1,), generator=gen)) | (trial == 0)  # odd lengths every time on trial 0
        shape = _shape(n, gen)
        # (bitsandbytes' AVX-512 bf16 conversion flushes subnormal results to zero, torch's keeps them: the
        # tiny values are compared in float32)
        dtype = DTYPES[trial] if kind != "tiny" else torch.float32
        x = _draw(torch.Size(shape).numel(), kind, gen).reshape(shape).to(dtype)
        ref, state = bnbF.quantize_4bit(
            x, blocksize=block_size, quant_type=quant_type, compress_statistics=double_quant
        )
        q = nf4.quantize_4bit(x, quant_type=quant_type, block_size=block_size, double_quant=double_quant)
        assert torch.equal(q.data, ref), f"codes differ for shape {shape} {dtype}"
        if double_quant:
            assert torch.equal(q.absmax.codes, state.absmax)
            assert torch.equal(q.absmax.absmax2, state.state2.absmax)
            assert torch.equal(q.absmax.offset, state.offset)
        else:
            assert torch.equal(q.absmax, state.absmax)
        got = nf4.dequantize_4bit(q)
        assert got.shape == x.shape and got.dtype == dtype
        assert torch.equal(got, _bnb_dequantize(ref, state, shape))


@pytest.mark.parametrize("kind", ["normal", "constant", "zeros"])
def test_double_quant_state_equals_bitsandbytes_on_many_blocks(kind):
    gen = torch.Generator().manual_seed(7)
    x = _draw(64 * 3000 + 17, kind, gen)  # 3001 constants: 12 second-level blocks, the last one short
    _, state = bnbF.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    q = nf4.quantize_4bit(x, block_size=64, double_quant=True)
    assert torch.equal(q.absmax.codes, state.absmax)
    assert torch.equal(q.absmax.absmax2, state.state2.absmax)
    restored = bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset
    assert torch.equal(q.block_absmax(), restored)


def test_blockwise_8bit_equals_bitsandbytes():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(256 * 40 + 5, generator=gen) * torch.logspace(-5, 1, 256 * 40 + 5)
    for block_size in (64, 256, 4096):
        ref, state = bnbF.quantize_blockwise(x, blocksize=block_size)
        codes, absmax2 = nf4.quantize_blockwise_8bit(x, block_size=block_size)
        assert torch.equal(codes, ref) and torch.equal(absmax2, state.absmax)
        expected = bnbF.dequantize_blockwise(ref, state)
        assert torch.equal(nf4.dequantize_blockwise_8bit(codes, absmax2, block_size=block_size), expected)


def test_codebooks_equal_bitsandbytes():
    assert torch.equal(nf4.codebook("nf4"), bnbF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(nf4.codebook("fp4"), bnbF.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(nf4.dynamic_codebook(), bnbF.create_dynamic_map())
    normal_map = bnbF.create_normal_map()  # 256 entries: 7 negative, 241 zeros, 8 positive
    assert torch.equal(nf4.normal_float_codebook(), torch.cat([normal_map[:8], normal_map[-8:]]))
    symmetric = bnbF.create_normal_map(use_extra_value=False)
    assert torch.equal(nf4.normal_float_codebook(use_extra_value=False), torch.cat([symmetric[:8], symmetric[-7:]]))


def test_nf4_codebook_is_made_of_normal_quantiles():
    from scipy.stats import norm

    values = nf4.normal_float_codebook().double()
    assert values[0] == -1 and values[-1] == 1 and values[7] == 0
    assert (values.diff() > 0).all() and (values < 0).sum() == 7 and (values > 0).sum() == 8
    scale = norm.ppf(nf4.NF4_OFFSET)  # the largest quantile, about 1.848
    assert scale == pytest.approx(1.848, abs=1e-3)
    assert values[8] * scale == pytest.approx(norm.ppf(0.5 + (nf4.NF4_OFFSET - 0.5) / 8), rel=1e-5)


def test_nearest_codes_pick_the_nearest_value():
    for quant_type in nf4.QUANT_TYPES:
        values = nf4.codebook(quant_type)
        scaled = torch.rand(20000) * 2 - 1
        codes = nf4.nearest_codes(scaled, quant_type).long()
        best = (scaled[:, None] - values[None, :]).abs().min(1).values
        assert torch.allclose((scaled - values[codes]).abs(), best, atol=1e-7)


def test_packing_puts_the_first_value_in_the_high_nibble():
    codes = torch.tensor([1, 2, 15, 0, 7])
    data = nf4.pack_nibbles(codes)
    assert data.flatten().tolist() == [0x12, 0xF0, 0x70] and data.shape == (3, 1)
    assert nf4.unpack_nibbles(data, 5).tolist() == codes.tolist()


@pytest.mark.parametrize("quant_type", nf4.QUANT_TYPES)
@pytest.mark.parametrize("block_size", [32, 64, 4096])
def test_round_trip_error_is_at_most_half_the_widest_gap(quant_type, block_size):
    x = torch.randn(37, 515) * 3
    q = nf4.quantize_4bit(x, quant_type=quant_type, block_size=block_size)
    x_hat = nf4.dequantize_4bit(q)
    half_gap = nf4.codebook(quant_type).sort().values.diff().max() / 2  # NF4: (1 - 0.723) / 2
    scale = q.absmax.repeat_interleave(block_size)[: x.numel()].view_as(x)
    assert ((x - x_hat).abs() <= half_gap * scale + 1e-6).all()
    # The largest value of each block is stored exactly (±1 is a code of both types).
    assert torch.isclose(
        x_hat.abs().flatten()[: x.numel() // block_size * block_size].view(-1, block_size).amax(1),
        q.absmax[: x.numel() // block_size],
    ).all()
    again = nf4.dequantize_4bit(nf4.quantize_4bit(x_hat, quant_type=quant_type, block_size=block_size))
    assert torch.equal(again, x_hat)  # quantizing a dequantized tensor changes nothing


def test_nf4_error_is_below_fp4_and_int4_on_normal_weights():
    from quantcourse import PerGroup, fake_quantize

    W = torch.randn(256, 512)
    err = {t: (W - nf4.quantize_4bit(W, quant_type=t).dequantize()).pow(2).mean() for t in nf4.QUANT_TYPES}
    int4 = (W - fake_quantize(W, 4, symmetric=True, granularity=PerGroup(64))).pow(2).mean()
    assert err["nf4"] < err["fp4"] and err["nf4"] < int4


def test_double_quant_error_is_small_and_bits_are_counted():
    W = torch.randn(512, 512)
    plain = nf4.quantize_4bit(W)
    double = nf4.quantize_4bit(W, double_quant=True)
    relative = (double.block_absmax() - plain.absmax).abs() / plain.absmax
    assert relative.max() < 0.01 and relative.mean() < 0.002  # 8 bits around the mean lose little
    assert nf4.bits_per_parameter(64) == 4.5
    assert nf4.bits_per_parameter(64, double_quant=True) == pytest.approx(4.127, abs=5e-4)
    assert plain.nbytes() * 8 / W.numel() == 4.5
    assert double.nbytes() * 8 / W.numel() == pytest.approx(nf4.bits_per_parameter(64, double_quant=True), abs=1e-3)


@pytest.mark.parametrize("double_quant", [False, True])
def test_linear4bit_matches_bitsandbytes(double_quant):
    torch.manual_seed(0)
    linear = torch.nn.Linear(192, 40)
    reference = bnb.nn.Linear4bit(192, 40, compute_dtype=torch.float32, quant_type="nf4")
    reference.weight = bnb.nn.Params4bit(
        linear.weight.data.clone(), requires_grad=False, quant_type="nf4", compress_statistics=double_quant
    )
    reference.bias = torch.nn.Parameter(linear.bias.data.clone())
    reference = reference.to("cpu")
    reference.support_avx512bf16_for_cpu = False  # its AVX512-BF16 fast path rounds activations to bf16
    module = nf4.Linear4bit.from_float(linear, double_quant=double_quant)
    assert torch.equal(module.data, reference.weight.data)
    x = torch.randn(3, 7, 192)
    with torch.no_grad():
        assert torch.equal(module(x), reference(x))
        expected = x @ nf4.dequantize_4bit(module.quantized_weight()).T + linear.bias
        assert torch.allclose(module(x), expected, atol=1e-5)


def test_quantize_model_swaps_the_decoder_linears():
    from tiny_models import tiny_llama

    model = tiny_llama()
    tokens = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        before = model(tokens).logits
        nf4.quantize_model(model, block_size=32)
        after = model(tokens).logits
    swapped = [m for m in model.modules() if isinstance(m, nf4.Linear4bit)]
    assert len(swapped) == 2 * 7 and not isinstance(model.lm_head, nf4.Linear4bit)
    assert not torch.equal(before, after) and torch.allclose(before, after, atol=0.3)
    assert "nf4" in repr(swapped[0]) and swapped[0].data.dtype == torch.uint8


# ---- errors -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [48, 16, 8192, 0, True, 64.0])
def test_odd_block_sizes_are_refused(block_size):
    with pytest.raises(ValueError, match="block_size must be one of 32, 64"):
        nf4.quantize_4bit(torch.randn(128), block_size=block_size)


def test_non_float_input_is_refused():
    with pytest.raises(TypeError, match="floating-point"):
        nf4.quantize_4bit(torch.arange(64))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        nf4.quantize_4bit(torch.randn(64, dtype=torch.float64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        nf4.quantize_4bit([1.0, 2.0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_are_refused(bad):
    x = torch.randn(128)
    x[5] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        nf4.quantize_4bit(x)


def test_other_bad_inputs():
    with pytest.raises(ValueError, match="quant_type must be 'nf4' or 'fp4'"):
        nf4.quantize_4bit(torch.randn(64), quant_type="int4")
    with pytest.raises(ValueError, match="empty"):
        nf4.quantize_4bit(torch.randn(0))
    with pytest.raises(TypeError, match="double_quant must be True or False"):
        nf4.quantize_4bit(torch.randn(64), double_quant=1)
    with pytest.raises(TypeError, match="Quantized4bit"):
        nf4.dequantize_4bit(torch.zeros(4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="offset must be a probability"):
        nf4.normal_float_codebook(1.0)
    with pytest.raises(ValueError, match="5 codes take 3 bytes"):
        nf4.unpack_nibbles(torch.zeros(2, dtype=torch.uint8), 5)
    with pytest.raises(TypeError, match="nn.Linear"):
        nf4.Linear4bit.from_float(torch.nn.Conv1d(2, 2, 1))
    with pytest.raises(TypeError, match="1-D float32"):
        nf4.double_quantize(torch.ones(4, 4))
