"""quantcourse.formats: ranges and rounding, against torch's own dtypes."""

import pytest
import torch

import quantcourse as qc
from quantcourse import formats as F

FLOAT_FORMATS = [F.FP16, F.BF16, F.FP8_E4M3, F.FP8_E5M2]
FLOAT_IDS = [f.name for f in FLOAT_FORMATS]


@pytest.mark.parametrize("fmt", FLOAT_FORMATS, ids=FLOAT_IDS)
def test_float_constants_match_torch_finfo(fmt):
    info = torch.finfo(fmt.torch_dtype)
    assert fmt.max == info.max
    assert fmt.min == info.min
    assert fmt.smallest_normal == info.smallest_normal
    assert fmt.eps == info.eps
    assert fmt.bits == info.bits


@pytest.mark.parametrize("fmt", FLOAT_FORMATS, ids=FLOAT_IDS)
def test_smallest_subnormal_is_torchs_smallest_positive_value(fmt):
    tiny = torch.tensor(fmt.smallest_subnormal, dtype=torch.float64)
    assert tiny.to(fmt.torch_dtype).double() == tiny
    assert (tiny / 2).to(fmt.torch_dtype).double() == 0  # exactly half-way ties to even: zero


@pytest.mark.parametrize(
    "fmt, max_, smallest_normal, smallest_subnormal, eps",
    [
        (F.FP16, 65504.0, 2.0**-14, 2.0**-24, 2.0**-10),
        (F.BF16, (2 - 2.0**-7) * 2.0**127, 2.0**-126, 2.0**-133, 2.0**-7),
        (F.FP8_E4M3, 448.0, 2.0**-6, 2.0**-9, 2.0**-3),
        (F.FP8_E5M2, 57344.0, 2.0**-14, 2.0**-16, 2.0**-2),
    ],
    ids=FLOAT_IDS,
)
def test_float_constants_by_hand(fmt, max_, smallest_normal, smallest_subnormal, eps):
    assert (fmt.max, fmt.smallest_normal, fmt.smallest_subnormal, fmt.eps) == (
        max_,
        smallest_normal,
        smallest_subnormal,
        eps,
    )


@pytest.mark.parametrize("fmt", FLOAT_FORMATS, ids=FLOAT_IDS)
def test_values_are_exactly_torchs_representable_values(fmt):
    # every bit pattern of the torch dtype that is finite and non-negative
    n_bits = fmt.bits
    int_dtype = {8: torch.uint8, 16: torch.int16}[n_bits]
    patterns = torch.arange(0, 2 ** (n_bits - 1), dtype=torch.int64).to(int_dtype)
    all_values = patterns.view(fmt.torch_dtype).double()
    expected = all_values[torch.isfinite(all_values)]
    assert torch.equal(fmt.values(), expected)


def _random_in_range(fmt, n=200_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    lo, hi = fmt.min_exponent - fmt.mantissa_bits - 2, fmt.max_exponent
    exps = torch.randint(lo, hi, (n,), generator=g).float()
    x = torch.randn(n, generator=g) * torch.exp2(exps)
    return x.clamp(-fmt.max, fmt.max)


@pytest.mark.parametrize("fmt", FLOAT_FORMATS, ids=FLOAT_IDS)
def test_round_equals_torch_cast_in_range(fmt):
    x = _random_in_range(fmt)
    assert torch.equal(fmt.round(x), x.to(fmt.torch_dtype).float())


@pytest.mark.parametrize("fmt", FLOAT_FORMATS, ids=FLOAT_IDS)
def test_round_ties_to_even_and_subnormals(fmt):
    values = fmt.values()[:40]  # zero, the subnormals and the first normals
    midpoints = ((values[1:] + values[:-1]) / 2).float()  # exact ties between neighbours
    x = torch.cat([values.float(), midpoints, -midpoints])
    assert torch.equal(fmt.round(x), x.to(fmt.torch_dtype).float())
    # a tie goes to the neighbour with an even mantissa (an even bit pattern)
    codes = fmt.round(midpoints).to(fmt.torch_dtype).view(torch.uint8 if fmt.bits == 8 else torch.int16)
    assert (codes.long() % 2 == 0).all()


@pytest.mark.parametrize("fmt", FLOAT_FORMATS, ids=FLOAT_IDS)
def test_round_ties_around_one(fmt):
    # 1 + eps/2 lies half-way between 1 and 1 + eps: ties to 1 (even); 1 + 3 eps/2 ties up to 1 + 2 eps
    x = torch.tensor([1 + fmt.eps / 2, 1 + 3 * fmt.eps / 2, -(1 + fmt.eps / 2)])
    assert fmt.round(x).tolist() == [1.0, 1 + 2 * fmt.eps, -1.0]
    assert torch.equal(fmt.round(x), x.to(fmt.torch_dtype).float())


@pytest.mark.parametrize("fmt", FLOAT_FORMATS, ids=FLOAT_IDS)
def test_round_saturates(fmt):
    x = torch.tensor([fmt.max * 1.01, -fmt.max * 1.5, float("inf"), float("-inf")], dtype=torch.float64)
    assert fmt.round(x).tolist() == [fmt.max, -fmt.max, fmt.max, -fmt.max]


def test_e4m3_saturation_agrees_with_torch():
    # torch's own float8_e4m3fn cast saturates too (e5m2 and fp16 overflow to inf instead)
    x = torch.tensor([449.0, 470.0, 1e6, -1e6, float("inf")])
    assert torch.equal(F.FP8_E4M3.round(x), x.to(torch.float8_e4m3fn).float())


@pytest.mark.parametrize("fmt", FLOAT_FORMATS, ids=FLOAT_IDS)
def test_round_keeps_nan_signed_zero_dtype_and_input(fmt):
    x = torch.tensor([float("nan"), -0.0, 0.0, 3.3], dtype=torch.float32)
    before = x.clone()
    y = fmt.round(x)
    assert y.dtype == torch.float32
    assert torch.isnan(y[0])
    assert torch.signbit(y[1]) and not torch.signbit(y[2])
    torch.testing.assert_close(x, before, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("fmt", FLOAT_FORMATS, ids=FLOAT_IDS)
def test_round_is_idempotent_and_lands_on_the_grid(fmt):
    x = _random_in_range(fmt, n=20_000, seed=1).double()
    y = fmt.round(x)
    assert torch.equal(fmt.round(y), y)
    assert torch.isin(y.abs(), fmt.values()).all()


def test_round_in_other_dtypes():
    x = torch.randn(1000, dtype=torch.float64)
    assert F.BF16.round(x).dtype == torch.float64
    assert torch.equal(F.BF16.round(x.float()), x.float().bfloat16().float())
    xb = torch.randn(1000).bfloat16()
    assert torch.equal(F.FP8_E4M3.round(xb), xb.to(torch.float8_e4m3fn).bfloat16())


@pytest.mark.parametrize("n_bits", range(2, 9))
@pytest.mark.parametrize("signed", [True, False], ids=["int", "uint"])
def test_int_formats(n_bits, signed):
    fmt = F.get_format(f"{'' if signed else 'u'}int{n_bits}")
    assert fmt == F.IntFormat(n_bits, signed)
    if signed:
        assert (fmt.min, fmt.max) == (-(2 ** (n_bits - 1)), 2 ** (n_bits - 1) - 1)
        info = torch.iinfo(torch.int8)
    else:
        assert (fmt.min, fmt.max) == (0, 2**n_bits - 1)
        info = torch.iinfo(torch.uint8)
    if n_bits == 8:
        assert (fmt.min, fmt.max) == (info.min, info.max)
    assert fmt.smallest_normal == fmt.smallest_subnormal == fmt.eps == 1
    assert len(fmt.values()) == fmt.n_values == 2**n_bits


def test_int_round_ties_to_even_and_clamps():
    x = torch.tensor([0.5, 1.5, 2.5, -2.5, 7.4, 7.6, 100.0, -100.0])
    assert F.INT4.round(x).tolist() == [0, 2, 2, -2, 7, 7, 7, -8]
    assert F.UINT4.round(x).tolist() == [0, 2, 2, 0, 7, 8, 15, 0]


def test_named_formats():
    assert set(F.FORMATS) >= {"int2", "int8", "uint2", "uint8", "fp16", "bf16", "fp8_e4m3", "fp8_e5m2"}
    assert F.get_format("FP8_E4M3") is F.FP8_E4M3
    assert F.get_format("bfloat16") is F.BF16


def test_get_format_unknown_name():
    with pytest.raises(ValueError, match="unknown format 'fp4'"):
        F.get_format("fp4")


def test_get_format_not_a_string():
    with pytest.raises(TypeError, match="format name must be a string"):
        F.get_format(4)


def test_round_rejects_integer_tensor():
    with pytest.raises(TypeError, match="must be a floating-point tensor"):
        F.FP16.round(torch.arange(3))


def test_round_rejects_non_tensor():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        F.INT8.round([1.0, 2.0])


def test_int_format_rejects_bad_bits():
    with pytest.raises(ValueError, match="IntFormat needs n_bits"):
        F.IntFormat(0)


# ---- codebook formats and the registry -----------------------------------------------------------------


def test_fp4_e2m1_has_the_ocp_values_and_rounds_to_the_nearest():
    fmt = F.get_format("fp4_e2m1")
    assert fmt is F.FP4_E2M1 and fmt.bits == 4 and fmt.n_values == 15  # +0 and -0 are one value
    assert fmt.values().tolist() == [-6, -4, -3, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3, 4, 6]
    x = torch.tensor([0.2, 0.25, 0.3, 2.4, 2.5, 2.6, 5.0, 5.1, 100.0, -100.0, -0.74, float("nan")])
    got = fmt.round(x)
    assert got[:-1].tolist() == [0.0, 0.0, 0.5, 2.0, 2.0, 3.0, 4.0, 6.0, 6.0, -6.0, -0.5]  # ties to the smaller level
    assert torch.isnan(got[-1]) and got.dtype == x.dtype


def test_register_format_adds_a_codebook_and_refuses_a_clash():
    nf2 = F.CodebookFormat("test_codebook2", (-1.0, -0.3, 0.2, 1.0), 2)
    try:
        assert F.register_format(nf2) is nf2 and F.get_format("TEST_CODEBOOK2") is nf2
        assert F.register_format(nf2) is nf2  # the same format again is fine
        with pytest.raises(ValueError, match="already registered"):
            F.register_format(F.CodebookFormat("test_codebook2", (0.0, 1.0), 1))
    finally:
        F.FORMATS.pop("test_codebook2", None)


@pytest.mark.parametrize(
    "levels,bits,message", [((1.0, 0.0), 1, "ascending"), ((0.0,), 1, "at least 2"), ((0.0, 1.0, 2.0), 1, "bits >= 2")]
)
def test_codebook_format_errors(levels, bits, message):
    with pytest.raises(ValueError, match=message):
        F.CodebookFormat("bad", levels, bits)


def test_fp32_is_registered_and_memory_uses_the_same_registry():
    assert F.get_format("fp32").bits == 32 and F.get_format("float32") is F.FP32
    assert F.FP32.max == torch.finfo(torch.float32).max and F.FP32.eps == torch.finfo(torch.float32).eps
    assert {name: F.get_format(name).bits for name in qc.memory.FORMAT_BITS} == qc.memory.FORMAT_BITS
