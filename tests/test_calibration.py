"""Observers (chapter 4): ranges, histograms, the MSE and entropy searches against plain references."""

import math

import pytest
import torch

import quantcourse as qc
from quantcourse.calibration import (
    EntropyObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    PercentileObserver,
    kl_divergence_candidates,
    make_observer,
    mse_candidates,
    qparams_from_range,
)

HIST_OBSERVERS = [PercentileObserver, MSEObserver, EntropyObserver]
ALL_OBSERVERS = [MinMaxObserver, MovingAverageMinMaxObserver, *HIST_OBSERVERS]


def heavy_tailed(kind: str, n: int = 200_000, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    dist = torch.distributions.StudentT(5.0) if kind == "student_t5" else torch.distributions.Laplace(0.0, 1.0)
    return dist.sample((n,))


def calibrated(cls, x: torch.Tensor, n_batches: int = 4, **kwargs):
    obs = cls(**kwargs)
    for batch in x.chunk(n_batches):
        obs.update(batch)
    return obs


def quant_mse(x: torch.Tensor, qp: qc.QParams) -> float:
    return ((qc.dequantize(qc.quantize(x, qp), qp) - x) ** 2).mean().item()


# --- plain, slow references (loops): transcriptions of the published pseudocode -------------------------


def slow_entropy_bin(hist: list[float], start_bin: int = 128, n_levels: int = 128) -> int:
    """TensorRT / NVIDIA pytorch-quantization entropy calibration, one candidate and one bin at a time."""
    bins = list(hist)
    bins[0] = bins[1]
    best_i, best = None, math.inf
    for i in range(start_bin, len(bins) + 1):
        p = bins[:i]
        p[-1] += sum(bins[i:])
        sums, counts = [0.0] * n_levels, [0] * n_levels
        for j in range(i):
            if bins[j] > 0:
                sums[j * n_levels // i] += bins[j]
                counts[j * n_levels // i] += 1
        q = [sums[j * n_levels // i] / counts[j * n_levels // i] if bins[j] > 0 else 0.0 for j in range(i)]
        zp, zq = sum(p), sum(q)
        kl = 0.0
        for pj, qj in zip(p, q, strict=True):
            if pj > 0:
                kl = math.inf if qj == 0 else kl + pj / zp * math.log((pj / zp) / (qj / zq))
        if kl <= best:  # the last minimum wins
            best, best_i = kl, i
    return best_i


def slow_mse_bin(hist: torch.Tensor, width: float, start_bin: int, levels: int) -> int:
    """NVIDIA's mse method: fake-quantize every bin center with each candidate as amax."""
    centers = (torch.arange(len(hist), dtype=torch.float64) + 0.5) * width
    errors = []
    for i in range(start_bin, len(hist)):
        step = centers[i] / levels
        fq = torch.clamp(torch.round(centers / step), max=levels) * step
        errors.append(((fq - centers) ** 2 * hist).sum().item())
    return start_bin + min(range(len(errors)), key=errors.__getitem__)


# --- min-max and moving average -------------------------------------------------------------------------


def test_minmax_qparams_equal_choose_qparams_on_all_data():
    x = torch.randn(3, 50, 16)
    obs = calibrated(MinMaxObserver, x, n_batches=3)
    for symmetric in (True, False):
        got, expected = obs.qparams(8, symmetric=symmetric), qc.choose_qparams(x, 8, symmetric=symmetric)
        torch.testing.assert_close(got.scale, expected.scale, rtol=0, atol=0)
        torch.testing.assert_close(got.zero_point, expected.zero_point, rtol=0, atol=0)


def test_minmax_per_channel_matches_choose_qparams_per_channel():
    x = torch.randn(4, 10, 8) * torch.arange(1, 9)
    obs = calibrated(MinMaxObserver, x, n_batches=2, granularity=qc.PerChannel(-1))
    got = obs.qparams(8, symmetric=False)
    expected = qc.choose_qparams(x, 8, symmetric=False, granularity=qc.PerChannel(-1))
    assert got.scale.shape == (1, 1, 8) and got.granularity == qc.PerChannel(-1)
    torch.testing.assert_close(got.scale, expected.scale, rtol=0, atol=0)
    torch.testing.assert_close(got.zero_point, expected.zero_point, rtol=0, atol=0)


def test_moving_average_follows_its_formula():
    batches = [torch.randn(100) * (k + 1) for k in range(5)]
    obs = MovingAverageMinMaxObserver(averaging_constant=0.1)
    lo, hi = batches[0].min(), batches[0].max()
    for k, b in enumerate(batches):
        obs.update(b)
        if k:
            lo, hi = lo + 0.1 * (b.min() - lo), hi + 0.1 * (b.max() - hi)
    torch.testing.assert_close(obs.min_val, lo.reshape(1))
    torch.testing.assert_close(obs.max_val, hi.reshape(1))
    torch.testing.assert_close(obs.qparams(8).scale, torch.maximum(hi, -lo) / 127)


def test_qparams_from_range_hand_worked():
    qp = qparams_from_range(torch.tensor([-1.0]), torch.tensor([3.0]), 8, symmetric=False)
    assert qp.scale.item() == pytest.approx(4 / 255) and qp.zero_point.item() == 64  # round(63.75)
    qp = qparams_from_range(torch.tensor([-1.0, -2.0]), torch.tensor([0.5, 1.0]), 4, param_shape=(2, 1))
    torch.testing.assert_close(qp.scale, torch.tensor([[1 / 7], [2 / 7]]))


# --- histogram observers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["laplace", "student_t5"])
@pytest.mark.parametrize("cls", [MSEObserver, EntropyObserver], ids=["mse", "entropy"])
def test_mse_and_entropy_clip_below_max_and_beat_minmax(cls, kind):
    x = heavy_tailed(kind)
    obs = calibrated(cls, x)
    qp = obs.qparams(8)
    assert qp.scale.item() * 127 < 0.95 * x.abs().max().item(), "should clip the tail"
    assert quant_mse(x, qp) < quant_mse(x, calibrated(MinMaxObserver, x).qparams(8))


@pytest.mark.parametrize("n_bits", [8, 4])
def test_entropy_threshold_equals_slow_reference(n_bits):
    x = heavy_tailed("student_t5", n=50_000, seed=1)
    obs = calibrated(EntropyObserver, x, n_batches=1, num_bins=512, start_bin=2 ** (n_bits - 1))
    i = slow_entropy_bin(obs.hist[0].tolist(), start_bin=2 ** (n_bits - 1), n_levels=2 ** (n_bits - 1))
    assert obs.threshold(n_bits).item() == pytest.approx(i * obs.width.item(), rel=1e-12)


def test_kl_divergences_equal_direct_sum():
    torch.manual_seed(3)
    hist = torch.randint(0, 5, (2, 300)).double() * (torch.rand(2, 300) < 0.7)
    hist[:, 0] = hist[:, 1]
    cand = torch.arange(40, 301)
    got = kl_divergence_candidates(hist, cand, torch.tensor([32, 32]))
    for c in range(2):
        for col, i in enumerate(cand.tolist()[::37]):
            b = hist[c].tolist()
            p = b[:i]
            p[-1] += sum(b[i:])
            lv = [j * 32 // i for j in range(i)]
            sums = [sum(b[j] for j in range(i) if lv[j] == k) for k in range(32)]
            cnt = [sum(1 for j in range(i) if lv[j] == k and b[j] > 0) for k in range(32)]
            q = [sums[lv[j]] / cnt[lv[j]] if b[j] > 0 else 0.0 for j in range(i)]
            zp, zq = sum(p), sum(q)
            kl = sum(
                pj / zp * math.log(pj / zp / (qj / zq)) if qj > 0 else math.inf
                for pj, qj in zip(p, q, strict=True)
                if pj > 0
            )
            assert got[c, col * 37].item() == pytest.approx(kl, rel=1e-9, abs=1e-12)


def test_mse_threshold_equals_slow_reference():
    x = heavy_tailed("laplace", n=50_000, seed=2)
    obs = calibrated(MSEObserver, x, n_batches=1, num_bins=512, start_bin=64)
    i = slow_mse_bin(obs.hist[0], obs.width.item(), 64, 15)
    assert obs.threshold(5).item() == pytest.approx((i + 0.5) * obs.width.item(), rel=1e-12)
    _, err = obs.errors(5)
    direct = mse_candidates(obs.hist, obs.width, torch.tensor([i]), torch.tensor([15]))
    assert err.min().item() == pytest.approx(direct.item(), rel=1e-9)


@pytest.mark.parametrize("p", [99.0, 99.9, 99.99])
def test_percentile_within_one_bin_of_torch_quantile(p):
    x = heavy_tailed("laplace", n=100_000)
    obs = calibrated(PercentileObserver, x, percentile=p)
    expected = torch.quantile(x.abs().double(), p / 100).item()
    assert abs(obs.threshold(8).item() - expected) <= obs.width.item() * (1 + 1e-9)


def test_histogram_grows_at_the_same_width():
    obs = PercentileObserver(num_bins=100)
    obs.update(torch.linspace(-1, 1, 1001))
    width = obs.width.clone()
    obs.update(torch.tensor([2.5]))
    assert torch.equal(obs.width, width) and obs.hist.shape[1] == 250 and obs.hist.sum().item() == 1002
    assert obs.hist[0, 249].item() == 1  # 2.5 lands in the last new bin


def test_histogram_merges_bins_past_max_bins():
    obs = MSEObserver(num_bins=100, max_bins=200, start_bin=10)
    obs.update(torch.linspace(0, 1, 101))
    obs.update(torch.tensor([10.0]))  # would need 1000 bins of the first width
    assert obs.hist.shape[1] <= 200 and obs.hist.sum().item() == 102
    assert obs.width.item() * obs.n_bins.item() >= 10.0


def test_histogram_same_as_one_batch_when_range_does_not_grow():
    x = torch.randn(10_000)
    x[0] = 10.0  # the first batch holds the maximum
    one, many = calibrated(EntropyObserver, x, n_batches=1), calibrated(EntropyObserver, x, n_batches=5)
    torch.testing.assert_close(one.hist, many.hist, rtol=0, atol=0)


def test_all_zero_batch_first_then_data():
    obs = PercentileObserver(percentile=100.0)
    obs.update(torch.zeros(10))
    obs.update(torch.tensor([0.0, 4.0]))
    assert obs.hist[0, 0].item() == 11 and obs.threshold(8).item() == pytest.approx(4.0 * (2047 / 2048))


@pytest.mark.parametrize("cls", HIST_OBSERVERS, ids=lambda c: c.__name__)
def test_per_channel_histogram_equals_per_tensor_on_each_channel(cls):
    x = torch.distributions.Laplace(0.0, 1.0).sample((6, 500, 3)) * torch.tensor([1.0, 3.0, 0.2])
    kwargs = {"num_bins": 256} | ({} if cls is PercentileObserver else {"start_bin": 32})
    per_channel = calibrated(cls, x, n_batches=3, granularity=qc.PerChannel(-1), **kwargs)
    qp = per_channel.qparams(4)
    assert qp.scale.shape == (1, 1, 3)
    for c in range(3):
        single = calibrated(cls, x[..., c], n_batches=3, **kwargs)
        torch.testing.assert_close(qp.scale.flatten()[c], single.qparams(4).scale)


@pytest.mark.parametrize("cls", HIST_OBSERVERS, ids=lambda c: c.__name__)
def test_asymmetric_range_stays_inside_observed_range(cls):
    x = torch.distributions.Exponential(1.0).sample((20_000,))  # non-negative, one long tail
    obs = calibrated(cls, x)
    lo, hi = obs.clipping_range(8, symmetric=False)
    assert lo.item() >= x.min().item() and hi.item() <= x.max().item()
    qp = obs.qparams(8, symmetric=False)
    assert qp.zero_point.item() == 0  # lo = min >= 0: the zero point sits at the bottom


def test_as_observer_shares_one_calibration():
    x = heavy_tailed("laplace", n=20_000)
    source = calibrated(PercentileObserver, x)
    for cls in (MSEObserver, EntropyObserver, MinMaxObserver):
        torch.testing.assert_close(source.as_observer(cls).qparams(8).scale, calibrated(cls, x).qparams(8).scale)
    with pytest.raises(TypeError, match="cannot stand in for a EntropyObserver"):
        calibrated(MinMaxObserver, x).as_observer(EntropyObserver)


def test_make_observer_by_name():
    assert isinstance(make_observer("entropy", num_bins=512), EntropyObserver)
    with pytest.raises(ValueError, match="unknown observer 'kl'"):
        make_observer("kl")


# --- errors ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ALL_OBSERVERS, ids=lambda c: c.__name__)
def test_qparams_before_update_raises(cls):
    with pytest.raises(RuntimeError, match="has not seen any data"):
        cls().qparams(8)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_input_raises(bad):
    x = torch.randn(10)
    x[3] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        EntropyObserver().update(x)


def test_integer_input_raises():
    with pytest.raises(TypeError, match="floating-point"):
        MinMaxObserver().update(torch.arange(5))


@pytest.mark.parametrize("p", [0, 100.5, -1, True])
def test_bad_percentile_raises(p):
    with pytest.raises(ValueError, match="percentile must be a number in"):
        PercentileObserver(percentile=p)


def test_bad_averaging_constant_raises():
    with pytest.raises(ValueError, match="averaging_constant"):
        MovingAverageMinMaxObserver(averaging_constant=0.0)


def test_bad_bins_raise():
    with pytest.raises(ValueError, match="num_bins must be"):
        EntropyObserver(num_bins=1)
    with pytest.raises(ValueError, match="max_bins must be"):
        EntropyObserver(num_bins=2048, max_bins=100)
    with pytest.raises(ValueError, match="start_bin must be"):
        EntropyObserver(num_bins=256, start_bin=512)
    with pytest.raises(ValueError, match="start_bin must be"):
        MSEObserver(num_bins=256, start_bin=256)


def test_per_token_granularity_rejected():
    with pytest.raises(TypeError, match="per-token ranges are dynamic"):
        MinMaxObserver(granularity=qc.PerToken())


def test_changing_channel_count_raises():
    obs = MinMaxObserver(granularity=qc.PerChannel(-1))
    obs.update(torch.randn(4, 8))
    with pytest.raises(ValueError, match="feed tensors with the same number"):
        obs.update(torch.randn(4, 9))


def test_bad_bits_and_symmetric_raise():
    obs = calibrated(MinMaxObserver, torch.randn(10))
    with pytest.raises(ValueError, match="n_bits must be"):
        obs.qparams(9)
    with pytest.raises(TypeError, match="symmetric must be"):
        obs.qparams(8, symmetric="yes")


# ---- differential tests against torch.ao's observers (the docstrings claim to match them) -------------------


def _ao_batches():
    gen = torch.Generator().manual_seed(7)
    return [torch.randn(4, 16, 32, generator=gen) * (1 + k) + 0.3 * k for k in range(5)]


@pytest.mark.parametrize("moving", [False, True], ids=["minmax", "moving_average"])
def test_range_observers_equal_torch_ao(moving):
    from torch.ao.quantization import observer as ao

    ours = MovingAverageMinMaxObserver(averaging_constant=0.01) if moving else MinMaxObserver()
    theirs = ao.MovingAverageMinMaxObserver(averaging_constant=0.01) if moving else ao.MinMaxObserver()
    for x in _ao_batches():
        ours.update(x)
        theirs(x)
    assert torch.equal(ours.min_val, theirs.min_val.reshape(ours.min_val.shape))
    assert torch.equal(ours.max_val, theirs.max_val.reshape(ours.max_val.shape))


def test_per_channel_minmax_equals_torch_ao():
    from torch.ao.quantization import observer as ao

    ours = MinMaxObserver(granularity=qc.PerChannel(-1))
    theirs = ao.PerChannelMinMaxObserver(ch_axis=-1)
    for x in _ao_batches():
        ours.update(x)
        theirs(x)
    assert torch.equal(ours.min_val, theirs.min_val) and torch.equal(ours.max_val, theirs.max_val)


@pytest.mark.parametrize("symmetric", [False, True], ids=["affine", "symmetric"])
def test_minmax_qparams_equal_torch_ao(symmetric):
    """8-bit parameters from the same range: torch.ao's affine quint8 [0, 255], and its symmetric qint8 restricted
    to [-127, 127] (the library's symmetric grid drops -128)."""
    from torch.ao.quantization import observer as ao

    kwargs = (
        dict(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric, quant_min=-127, quant_max=127)
        if symmetric
        else dict(dtype=torch.quint8, qscheme=torch.per_tensor_affine, quant_min=0, quant_max=255)
    )
    ours, theirs = MinMaxObserver(), ao.MinMaxObserver(**kwargs)
    for x in _ao_batches():
        ours.update(x)
        theirs(x)
    qp = ours.qparams(8, symmetric=symmetric)
    scale, zero_point = theirs.calculate_qparams()
    torch.testing.assert_close(qp.scale.reshape(1), scale, rtol=1e-6, atol=0)
    assert qp.zero_point.reshape(1).tolist() == zero_point.tolist()
