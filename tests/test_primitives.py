"""quantcourse.primitives: properties, the worked example, optimum-quanto and torch fake-quant, bad inputs."""

import pytest
import torch

import quantcourse as qc
from quantcourse import PerChannel, PerGroup, PerTensor, PerToken
from quantcourse.primitives import SCALE_EPS, fake_quantize_ste

GRANULARITIES = {
    "tensor": PerTensor(),
    "channel0": PerChannel(0),
    "channel1": PerChannel(1),
    "channel-1": PerChannel(-1),
    "token": PerToken(),
    "group16": PerGroup(16),
}
SCHEMES = {"sym": True, "asym": False}


def _weight(shape=(8, 64), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * 0.02
    x[0, 3] = 0.3  # an outlier
    return x


# ---------------------------------------------------------------- worked examples (chapter 2)


def test_worked_example_asymmetric_int8_on_minus_one_to_one():
    x = torch.tensor([-1.0, 0.5, 1.0])
    qp = qc.choose_qparams(x, 8, symmetric=False, granularity=PerTensor())
    assert qp.scale.item() == pytest.approx(2 / 255, rel=1e-7)
    # -min / scale = 127.49999 in float32 (2/255 rounds up), so the zero point is 127
    assert qp.zero_point.item() == 127
    q = qc.quantize(x, qp)
    assert int(q[1]) - qp.zero_point.item() == 64  # 0.5 is 63.75 steps from 0 -> 64 steps
    x_hat = qc.dequantize(q, qp)
    assert x_hat[1].item() == pytest.approx(64 * 2 / 255, abs=1e-7)
    assert round(x_hat[1].item(), 5) == 0.50196


def test_worked_example_symmetric_int8():
    x = torch.tensor([-1.0, 0.5, 1.0])
    qp = qc.choose_qparams(x, 8, symmetric=True, granularity=PerTensor())
    assert qp.scale.item() == pytest.approx(1 / 127)
    q = qc.quantize(x, qp)
    assert q.tolist() == [-127, 64, 127]  # 0.5 * 127 = 63.5: a tie, rounded to the even 64
    assert qc.dequantize(q, qp)[1].item() == pytest.approx(64 / 127)


def test_worked_example_int4_symmetric():
    x = torch.tensor([[0.7, -0.35, 0.1, 0.0]])
    qp = qc.choose_qparams(x, 4, symmetric=True, granularity=PerTensor())
    assert qp.scale.item() == pytest.approx(0.1)  # 0.7 / 7
    assert qc.quantize(x, qp).tolist() == [[7, -4, 1, 0]]  # -3.5 ties to the even -4


# ---------------------------------------------------------------- properties


@pytest.mark.parametrize("symmetric", SCHEMES.values(), ids=SCHEMES.keys())
@pytest.mark.parametrize("granularity", GRANULARITIES.values(), ids=GRANULARITIES.keys())
@pytest.mark.parametrize("n_bits", range(2, 9))
def test_round_trip_codes_and_zero_point(n_bits, granularity, symmetric):
    x = _weight()
    x_before = x.clone()
    qp = qc.choose_qparams(x, n_bits, symmetric=symmetric, granularity=granularity)
    q = qc.quantize(x, qp)
    q_before = q.clone()
    x_hat = qc.dequantize(q, qp)

    # codes in range, with the documented dtype
    assert q.dtype == (torch.int8 if symmetric else torch.uint8)
    assert q.shape == x.shape
    assert int(q.min()) >= qp.qmin and int(q.max()) <= qp.qmax
    if symmetric:
        assert (qp.qmin, qp.qmax) == (-(2 ** (n_bits - 1) - 1), 2 ** (n_bits - 1) - 1)
        assert (qp.zero_point == 0).all()
    else:
        assert (qp.qmin, qp.qmax) == (0, 2**n_bits - 1)
        assert ((qp.zero_point >= 0) & (qp.zero_point <= qp.qmax)).all()
    assert qp.scale.dtype == torch.float32 and qp.zero_point.dtype == torch.int32
    assert qp.scale.shape == qp.zero_point.shape

    # every value inside the range comes back within half a step (plus float32 rounding)
    step = granularity.expand(qp.scale, x).expand_as(x)
    assert ((x - x_hat).abs() <= step / 2 * (1 + 1e-5) + 1e-7).all()

    # idempotence: re-quantizing dequantized values gives the same codes
    assert torch.equal(qc.quantize(x_hat, qp), q)
    # fake_quantize is exactly dequantize(quantize(x))
    assert torch.equal(qc.fake_quantize(x, n_bits, symmetric=symmetric, granularity=granularity), x_hat)
    # inputs never modified
    assert torch.equal(x, x_before) and torch.equal(q, q_before)


# ---------------------------------------------------------------- blockwise = whole-tensor formula
# quantize, dequantize and fake_quantize run a cache-sized block of rows at a time on a CPU. The
# reference below is the formula on the whole tensor at once (the library's previous code): the
# results must be the same bits, dtypes and strides, whatever the block boundaries.


def _reference_qparams(x, n_bits, symmetric, g):
    """(scale, zero_point) from amax and amin of the whole tensor at once."""
    hi, lo = g.reduce(x, torch.amax).float(), g.reduce(x, torch.amin).float()
    if symmetric:
        scale = (torch.maximum(hi, -lo) / (2 ** (n_bits - 1) - 1)).clamp(min=qc.primitives.SCALE_EPS)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = ((hi - lo) / (2**n_bits - 1)).clamp(min=qc.primitives.SCALE_EPS)
    return scale, torch.round(-lo / scale).clamp(0, 2**n_bits - 1).to(torch.int32)


def _reference(x, qp):
    """(codes, dequantized float32, fake-quantized) computed on the whole tensor at once."""
    g = qp.granularity
    xg, scale = g.broadcast(x.detach(), qp.scale)
    zero_point = g.broadcast(x, qp.zero_point)[1]
    codes = torch.div(xg.float(), scale).round_()
    if not qp.symmetric:
        codes.add_(zero_point)
    codes = codes.clamp_(qp.qmin, qp.qmax).reshape(x.shape).to(qp.code_dtype)
    x_hat = codes.to(torch.float32, memory_format=torch.contiguous_format)
    hg = g.broadcast(x_hat, qp.scale)[0]
    if not qp.symmetric:
        hg.sub_(zero_point)
    hg.mul_(scale)
    fake = torch.div(xg.float(), scale).round_().add_(zero_point).clamp_(qp.qmin, qp.qmax).sub_(zero_point)
    return codes, x_hat, fake.mul_(scale).reshape(x.shape).to(x.dtype)


def _same_bits(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
    assert torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def _block_inputs():
    g = torch.Generator().manual_seed(3)
    edge = torch.randn(12, 64, generator=g)
    edge[0] = 0.0  # an all-zero row: scale SCALE_EPS
    edge[1] = -0.0
    edge[2, ::2] = 1e30  # huge values next to tiny ones
    edge[3] = -1e-40  # subnormals
    edge[4] = torch.linspace(-1, 1, 64)
    edge[5] = torch.tensor([0.0, -0.0]).repeat(32)  # zeros of both signs: amax/amin may return either
    ties = (torch.randint(-300, 300, (10, 32), generator=g).float() + 0.5) / 254
    ties[:, 0] = 1.0  # scale 1/127 per row: x / scale lands on the ties k + 1/2
    return {
        "randn 2-D": torch.randn(37, 96, generator=g) * 0.02,
        "randn 3-D": torch.randn(3, 5, 64, generator=g),
        "vector": torch.randn(1000, generator=g),
        "long rows": torch.randn(2, 3000, generator=g),
        "scalar": torch.tensor(0.7),
        "edge": edge,
        "ties": ties,
        "transposed": torch.randn(64, 48, generator=g).t(),
        "float16": torch.randn(20, 64, generator=g).half(),
        "bfloat16": torch.randn(20, 64, generator=g).bfloat16(),
        "float64": torch.randn(20, 64, generator=g).double(),
    }


def _granularities(x):
    out = [PerTensor(), *(PerChannel(a) for a in range(x.dim()))]
    if x.dim():
        out += [PerToken(), *(PerGroup(gs) for gs in (1, 16, 32) if x.shape[-1] % gs == 0)]
    return out


@pytest.mark.parametrize("block_elements", [7, 64, 2**19])
@pytest.mark.parametrize("name", list(_block_inputs()))
def test_blockwise_equals_the_whole_tensor_formula(name, block_elements, monkeypatch):
    monkeypatch.setattr(qc.primitives, "BLOCK_ELEMENTS", block_elements)
    x = _block_inputs()[name]
    for granularity in _granularities(x):
        for n_bits, symmetric in [(8, True), (4, True), (8, False), (4, False), (2, False)]:
            qp = qc.choose_qparams(x, n_bits, symmetric=symmetric, granularity=granularity)
            scale, zero_point = _reference_qparams(x, n_bits, symmetric, granularity)
            _same_bits(qp.scale, scale)
            _same_bits(qp.zero_point, zero_point)
            codes, x_hat, fake = _reference(x, qp)
            _same_bits(qc.quantize(x, qp), codes)
            _same_bits(qc.dequantize(codes, qp), x_hat)
            _same_bits(qc.dequantize(codes, qp, torch.float16), x_hat.half())
            _same_bits(qc.fake_quantize(x, n_bits, symmetric=symmetric, granularity=granularity), fake)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_in_a_late_block_of_quantize(bad, monkeypatch):
    monkeypatch.setattr(qc.primitives, "BLOCK_ELEMENTS", 64)
    x = torch.randn(32, 64)
    qp = qc.choose_qparams(x, 8, granularity=PerChannel(0))
    x[-1, -1] = bad  # in the last of 32 blocks
    with pytest.raises(ValueError, match="contains 1 NaN or Inf values"):
        qc.quantize(x, qp)


@pytest.mark.parametrize("symmetric", SCHEMES.values(), ids=SCHEMES.keys())
@pytest.mark.parametrize("n_bits", [2, 4, 8])
def test_fake_quantize_is_idempotent(n_bits, symmetric):
    x = _weight((16, 64))
    once = qc.fake_quantize(x, n_bits, symmetric=symmetric, granularity=PerGroup(16))
    twice = qc.fake_quantize(once, n_bits, symmetric=symmetric, granularity=PerGroup(16))
    # the scale is recomputed from the quantized values: equal up to float32 rounding of the scale
    torch.testing.assert_close(twice, once, rtol=1e-6, atol=1e-9)


def test_asymmetric_zero_is_exact_and_range_includes_zero():
    x = torch.tensor([[0.0, 0.3, 0.7, 1.1], [0.0, -0.2, -0.9, -0.4]])  # all >= 0 / all <= 0
    for n_bits in (2, 4, 8):
        x_hat = qc.fake_quantize(x, n_bits, symmetric=False, granularity=PerToken())
        assert (x_hat[:, 0] == 0).all()
        qp = qc.choose_qparams(x, n_bits, symmetric=False, granularity=PerToken())
        assert qp.zero_point[0].item() == 0 and qp.zero_point[1].item() == qp.qmax


def test_all_zero_tensor_gives_zeros_not_nan():
    for symmetric in (True, False):
        qp = qc.choose_qparams(torch.zeros(4, 8), 4, symmetric=symmetric, granularity=PerChannel(0))
        assert (qp.scale == SCALE_EPS).all()
        assert torch.equal(qc.fake_quantize(torch.zeros(4, 8), 4, symmetric=symmetric), torch.zeros(4, 8))


@pytest.mark.parametrize(
    "granularity, shape, expected",
    [
        (PerTensor(), (6, 32), ()),
        (PerChannel(0), (6, 32), (6, 1)),
        (PerChannel(1), (6, 32), (1, 32)),
        (PerChannel(-1), (2, 6, 32), (1, 1, 32)),
        (PerChannel(1), (2, 6, 32), (1, 6, 1)),
        (PerChannel(0), (32,), (32,)),
        (PerToken(), (6, 32), (6, 1)),
        (PerToken(), (2, 6, 32), (2, 6, 1)),
        (PerGroup(8), (6, 32), (6, 4)),
        (PerGroup(8), (2, 6, 32), (2, 6, 4)),
        (PerGroup(32), (32,), (1,)),
    ],
    ids=lambda v: str(v).replace(" ", ""),
)
def test_scale_shapes_per_granularity(granularity, shape, expected):
    x = torch.randn(shape)
    for symmetric in (True, False):
        qp = qc.choose_qparams(x, 4, symmetric=symmetric, granularity=granularity)
        assert tuple(qp.scale.shape) == expected
        assert granularity.param_shape(x.shape) == expected
        assert qc.dequantize(qc.quantize(x, qp), qp).shape == x.shape


def test_per_channel_of_a_vector_gives_one_scale_per_element():
    x = torch.tensor([0.5, -2.0, 0.0, 4.0])
    qp = qc.choose_qparams(x, 8, symmetric=True, granularity=PerChannel(0))
    torch.testing.assert_close(qp.scale, x.abs().clamp_min(SCALE_EPS * 127) / 127)
    torch.testing.assert_close(qc.fake_quantize(x, 8, symmetric=True, granularity=PerChannel(0)), x)


def test_per_token_on_a_weight_equals_per_channel_0():
    x = _weight()
    for symmetric in (True, False):
        a = qc.fake_quantize(x, 4, symmetric=symmetric, granularity=PerToken())
        b = qc.fake_quantize(x, 4, symmetric=symmetric, granularity=PerChannel(0))
        assert torch.equal(a, b)


def test_per_group_equals_per_channel_on_each_group():
    x = _weight((4, 64))
    grouped = qc.fake_quantize(x, 4, symmetric=False, granularity=PerGroup(16))
    by_hand = qc.fake_quantize(x.reshape(16, 16), 4, symmetric=False, granularity=PerChannel(0)).reshape(4, 64)
    assert torch.equal(grouped, by_hand)


@pytest.mark.parametrize("granularity", GRANULARITIES.values(), ids=GRANULARITIES.keys())
def test_non_contiguous_input(granularity):
    x = _weight((64, 32)).T  # [32, 64], transposed strides
    assert not x.is_contiguous()
    for symmetric in (True, False):
        qp = qc.choose_qparams(x, 4, symmetric=symmetric, granularity=granularity)
        q = qc.quantize(x, qp)
        assert torch.equal(q, qc.quantize(x.contiguous(), qp))
        assert torch.equal(qc.dequantize(q, qp), qc.dequantize(q.contiguous(), qp))
        assert torch.equal(qc.fake_quantize(x, 4, symmetric=symmetric, granularity=granularity), qc.dequantize(q, qp))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_other_float_dtypes(dtype):
    x = _weight().to(dtype)
    x_hat = qc.fake_quantize(x, 8, symmetric=True, granularity=PerChannel(0))
    assert x_hat.dtype == dtype
    qp = qc.choose_qparams(x, 8, symmetric=True, granularity=PerChannel(0))
    assert qp.scale.dtype == torch.float32
    assert qc.dequantize(qc.quantize(x, qp), qp, dtype=dtype).dtype == dtype


def test_requires_grad_input_is_accepted_and_untouched():
    x = _weight().requires_grad_()
    x_hat = qc.fake_quantize(x, 8)
    assert x.grad is None and not x_hat.requires_grad


def test_one_outlier_coarsens_everyone_per_tensor_not_per_channel():
    x = _weight()  # row 0 holds a 0.3 outlier among values of ~0.02
    err_tensor = (qc.fake_quantize(x, 4, granularity=PerTensor()) - x)[1:].abs().mean()
    err_channel = (qc.fake_quantize(x, 4, granularity=PerChannel(0)) - x)[1:].abs().mean()
    assert err_channel < err_tensor / 3


# ---------------------------------------------------------------- differential: torch's fake quantization


def _torch_fake_quant(x, qp, axis=None):
    if axis is None:
        return torch.fake_quantize_per_tensor_affine(x, qp.scale.item(), int(qp.zero_point), qp.qmin, qp.qmax)
    return torch.fake_quantize_per_channel_affine(
        x, qp.scale.flatten(), qp.zero_point.flatten(), axis, qp.qmin, qp.qmax
    )


@pytest.mark.parametrize("symmetric", SCHEMES.values(), ids=SCHEMES.keys())
@pytest.mark.parametrize("n_bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize(
    "granularity, axis",
    [(PerTensor(), None), (PerChannel(0), 0), (PerChannel(1), 1), (PerToken(), 0)],
    ids=["tensor", "channel0", "channel1", "token"],
)
def test_fake_quantize_equals_torch(granularity, axis, n_bits, symmetric):
    x = _weight((48, 80), seed=n_bits)
    qp = qc.choose_qparams(x, n_bits, symmetric=symmetric, granularity=granularity)
    ours = qc.fake_quantize(x, n_bits, symmetric=symmetric, granularity=granularity)
    assert torch.equal(ours, _torch_fake_quant(x, qp, axis))


def test_torch_differs_only_by_its_rounded_reciprocal():
    # torch computes round(x * (1 / scale)); we (and quanto) compute round(x / scale). On a big
    # tensor a few values sit within a float32 rounding error of a tie between two codes.
    x = torch.randn(1024, 1024)
    qp = qc.choose_qparams(x, 8, symmetric=False, granularity=PerChannel(0))
    ref = _torch_fake_quant(x, qp, axis=0)
    ours = qc.fake_quantize(x, 8, symmetric=False, granularity=PerChannel(0))
    s, zp = qp.scale, qp.zero_point
    with_reciprocal = ((torch.round(x * (1 / s)) + zp).clamp(qp.qmin, qp.qmax) - zp) * s
    assert torch.equal(with_reciprocal, ref)
    differ = ours != ref
    assert differ.sum() < 1e-5 * x.numel()
    frac = (x / s - torch.floor(x / s))[differ]
    assert ((frac - 0.5).abs() < 1e-4).all()  # every difference is at a tie
    assert torch.allclose((ours - ref)[differ].abs(), s.expand_as(x)[differ])  # of one step


# ---------------------------------------------------------------- differential: optimum-quanto


@pytest.fixture(scope="module")
def quanto():
    pytest.importorskip("optimum.quanto")
    from optimum import quanto
    from optimum.quanto.tensor.optimizers import AbsmaxOptimizer, MaxOptimizer
    from optimum.quanto.tensor.weights import quantize_weight

    return quanto, AbsmaxOptimizer(), MaxOptimizer(), quantize_weight


@pytest.mark.parametrize("shape", [(64, 128), (192, 576), (576, 1536)], ids=str)
def test_int8_per_channel_equals_quanto_qint8(quanto, shape):
    module, absmax, _, quantize_weight = quanto
    W = torch.randn(*shape) * 0.02
    W[5, 7] = 0.5  # an outlier
    # what quanto's QLinear does for weights=qint8: absmax scale per output channel, then quantize
    scale = absmax(W, qtype=module.qint8, axis=0)
    qt = quantize_weight(W, qtype=module.qint8, axis=0, scale=scale, optimized=False)
    qp = qc.choose_qparams(W, 8, symmetric=True, granularity=PerChannel(0))
    codes = qc.quantize(W, qp)
    assert torch.equal(qp.scale, qt._scale)
    assert torch.equal(codes, qt._data)
    assert torch.equal(qc.dequantize(codes, qp), qt.dequantize())


def test_int8_equals_quanto_qlinear(quanto):
    module = quanto[0]
    linear = torch.nn.Linear(256, 96)
    qlinear = module.nn.QLinear.from_module(linear, weights=module.qint8)
    module.freeze(qlinear)
    assert type(qlinear.weight).__name__.endswith("WeightQBytesTensor")
    qp = qc.choose_qparams(linear.weight, 8, symmetric=True, granularity=PerChannel(0))
    assert torch.equal(qc.quantize(linear.weight, qp), qlinear.weight._data)
    assert torch.equal(qp.scale, qlinear.weight._scale)


def test_int4_per_group_asymmetric_equals_quanto_qint4_zeropoint(quanto):
    # quanto's qint4 with integer zero points (MaxOptimizer zeropoint=True) is our asymmetric scheme
    # whenever each group holds both signs (quanto does not widen the range to include 0).
    module, _, max_opt, quantize_weight = quanto
    W = torch.randn(96, 256) * 0.02
    scale, zero_point = max_opt(W, qtype=module.qint4, axis=0, group_size=64, zeropoint=True)
    qt = quantize_weight(W, qtype=module.qint4, axis=0, scale=scale, shift=zero_point, group_size=64, optimized=False)
    qp = qc.choose_qparams(W, 4, symmetric=False, granularity=PerGroup(64))
    assert torch.equal(qp.scale.flatten(), scale.flatten())
    assert torch.equal(qp.zero_point.flatten(), zero_point.flatten().int())
    assert torch.equal(qc.fake_quantize(W, 4, symmetric=False, granularity=PerGroup(64)), qt.dequantize())


# ---------------------------------------------------------------- bad inputs: one test per message


@pytest.mark.parametrize("n_bits", [1, 9, 0, 16, 4.0], ids=["1", "9", "0", "16", "4.0"])
def test_bits_out_of_range(n_bits):
    with pytest.raises(ValueError, match="n_bits must be an int from 2 to 8"):
        qc.choose_qparams(torch.randn(4, 4), n_bits)


def test_bool_bits():
    with pytest.raises(ValueError, match="n_bits must be an int from 2 to 8, got True"):
        qc.fake_quantize(torch.randn(4, 4), True)


def test_non_float_dtype():
    with pytest.raises(TypeError, match="must be a floating-point tensor, got dtype torch.int64"):
        qc.choose_qparams(torch.arange(8), 8)


def test_not_a_tensor():
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        qc.fake_quantize([1.0, 2.0], 8)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("granularity", [PerGroup(16), PerTensor(), PerChannel(1)], ids=str)
def test_nan_inf_in_choose_qparams(bad, granularity, monkeypatch):
    monkeypatch.setattr(qc.primitives, "BLOCK_ELEMENTS", 64)  # one row a block: the bad value in the third
    x = torch.randn(4, 64)
    x[2, 17] = bad
    with pytest.raises(ValueError, match="contains 1 NaN or Inf values"):
        qc.choose_qparams(x, 4, symmetric=False, granularity=granularity)


def test_nan_in_quantize():
    x = torch.randn(4, 8)
    qp = qc.choose_qparams(x, 8)
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        qc.quantize(x, qp)


def test_huge_finite_values_are_not_mistaken_for_inf():
    x = torch.full((4, 8), 3e38)  # the sum overflows, the values do not
    assert torch.isfinite(qc.fake_quantize(x, 8, granularity=PerChannel(0))).all()
    qp = qc.choose_qparams(x, 8)
    assert torch.equal(qc.quantize(x, qp), torch.full((4, 8), 127, dtype=torch.int8))


def test_empty_tensor():
    with pytest.raises(ValueError, match=r"x is empty \(shape \(0, 4\)\)"):
        qc.choose_qparams(torch.empty(0, 4), 8)


def test_group_size_not_dividing():
    with pytest.raises(ValueError, match=r"group_size=128 does not divide the last dimension \(576\).*\[16, 32, 64\]"):
        qc.choose_qparams(torch.randn(2, 576), 4, granularity=PerGroup(128))


def test_group_size_not_positive():
    with pytest.raises(ValueError, match="PerGroup\\(group_size\\) needs a positive int"):
        PerGroup(0)


def test_bad_axis():
    with pytest.raises(ValueError, match=r"PerChannel\(axis=2\) needs a tensor with that axis, got shape \(4, 4\)"):
        qc.choose_qparams(torch.randn(4, 4), 8, granularity=PerChannel(2))


def test_axis_not_an_int():
    with pytest.raises(TypeError, match="PerChannel\\(axis\\) needs an int axis"):
        PerChannel("0")


def test_wrong_granularity_type():
    with pytest.raises(TypeError, match="granularity must be PerTensor\\(\\), PerChannel\\(axis\\)"):
        qc.choose_qparams(torch.randn(4, 4), 8, granularity="per_channel")


def test_scalar_per_token():
    with pytest.raises(ValueError, match="PerToken\\(\\) needs at least one dimension"):
        qc.choose_qparams(torch.tensor(1.0), 8, granularity=PerToken())


def test_scalar_per_group():
    with pytest.raises(ValueError, match="PerGroup needs at least one dimension"):
        qc.choose_qparams(torch.tensor(1.0), 8, granularity=PerGroup(1))


def test_symmetric_not_a_bool():
    with pytest.raises(TypeError, match="symmetric must be True \\(absmax\\) or False"):
        qc.choose_qparams(torch.randn(4, 4), 8, symmetric="no")


def test_qparams_of_another_shape():
    qp = qc.choose_qparams(torch.randn(4, 8), 8, granularity=PerChannel(0))
    with pytest.raises(ValueError, match=r"qparams hold scales of shape \(4, 1\), but x of shape \(6, 8\)"):
        qc.quantize(torch.randn(6, 8), qp)


def test_qparams_not_qparams():
    with pytest.raises(TypeError, match="qparams must be the QParams that choose_qparams returns"):
        qc.quantize(torch.randn(4, 8), (0.1, 0))


def test_dequantize_float_codes():
    qp = qc.choose_qparams(torch.randn(4, 8), 8)
    with pytest.raises(TypeError, match="q must be an integer tensor of codes"):
        qc.dequantize(torch.randn(4, 8), qp)


def test_dequantize_bad_dtype():
    x = torch.randn(4, 8)
    qp = qc.choose_qparams(x, 8)
    with pytest.raises(TypeError, match="dtype must be a floating-point torch.dtype"):
        qc.dequantize(qc.quantize(x, qp), qp, dtype=torch.int32)


def test_qparams_is_frozen():
    qp = qc.choose_qparams(torch.randn(4, 8), 8)
    with pytest.raises(AttributeError):
        qp.n_bits = 4


# ---- the straight-through fake quantizer (chapters 4-5) ----------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False], ids=["absmax", "zero_point"])
def test_fake_quantize_ste_forward_equals_library_and_gradient_is_1_inside_0_outside(symmetric):
    x = torch.linspace(-3, 3, 601)
    qp = qc.choose_qparams(torch.tensor([-1.0, 2.0]), 4, symmetric=symmetric)
    xr = x.clone().requires_grad_()
    y = fake_quantize_ste(xr, qp)
    torch.testing.assert_close(y, qc.dequantize(qc.quantize(x, qp), qp), rtol=0, atol=0)
    y.backward(torch.ones_like(y))
    codes = torch.round(x / qp.scale) + qp.zero_point
    inside = (codes >= qp.qmin) & (codes <= qp.qmax)
    assert torch.equal(xr.grad, inside.float())
    assert xr.grad[x.abs() < 0.5].eq(1).all() and xr.grad[x > 2.5].eq(0).all()


def test_fake_quantize_ste_gradcheck_is_identity_inside():
    x = torch.rand(20, dtype=torch.float64) - 0.5  # well inside [-1, 1]
    qp = qc.choose_qparams(torch.tensor([-1.0, 1.0]), 8)
    x.requires_grad_()
    (g,) = torch.autograd.grad(fake_quantize_ste(x, qp).sum(), x)
    assert torch.equal(g, torch.ones_like(x))


def test_fake_quantize_ste_per_group():
    W = torch.randn(4, 16)
    qp = qc.choose_qparams(W, 4, granularity=qc.PerGroup(8))
    torch.testing.assert_close(
        fake_quantize_ste(W, qp), qc.fake_quantize(W, 4, granularity=qc.PerGroup(8)), rtol=0, atol=0
    )
