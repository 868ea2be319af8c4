"""Static and dynamic activation quantization and the WxAy model helper (chapter 4)."""

import pytest
import torch
from torch import nn

import quantcourse as qc
from quantcourse.activations import (
    ActivationQuantizer,
    QuantizedLinear,
    calibrate_linear_inputs,
    fake_quantize_per_token,
    quantize_model_w_a,
    restore_float_linears,
)
from quantcourse.calibration import MinMaxObserver, PercentileObserver


class Toy(nn.Module):
    """Embedding + two linears: takes token ids like a causal LM."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 16)
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, ids):
        return self.down(torch.relu(self.up(self.embed(ids))))


def batches(n=3):
    return [torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(k)) for k in range(n)]


def test_static_uses_fixed_range_dynamic_uses_each_tokens_range():
    x = torch.randn(2, 5, 8)
    x[0, 0] *= 100  # one loud token
    qp = qc.choose_qparams(x, 8)
    static = ActivationQuantizer.static(qp)(x)
    dynamic = ActivationQuantizer.dynamic(8)(x)
    torch.testing.assert_close(static, qc.dequantize(qc.quantize(x, qp), qp), rtol=0, atol=0)
    torch.testing.assert_close(dynamic, qc.fake_quantize(x, 8, granularity=qc.PerToken()), rtol=0, atol=0)
    quiet = (slice(1, None),)
    assert (dynamic - x)[quiet].abs().max() < (static - x)[quiet].abs().max() / 10


@pytest.mark.parametrize("symmetric", [True, False], ids=["absmax", "zero_point"])
def test_fake_quantize_per_token_equals_the_library_and_passes_gradients(symmetric):
    x = (torch.randn(3, 4, 16) * torch.logspace(0, 2, 4)[:, None]).requires_grad_()
    y = fake_quantize_per_token(x, 4, symmetric=symmetric)
    expected = qc.fake_quantize(x.detach(), 4, symmetric=symmetric, granularity=qc.PerToken())
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(g, torch.ones_like(x))  # a token's own range clips nothing


def test_static_per_channel_qparams_fit_inputs_of_the_same_rank():
    x = torch.randn(4, 3, 8) * torch.arange(1, 9)
    obs = MinMaxObserver(granularity=qc.PerChannel(-1))
    obs.update(x)
    y = ActivationQuantizer.static(obs.qparams(8))(x)
    torch.testing.assert_close(y, qc.fake_quantize(x, 8, granularity=qc.PerChannel(-1)), rtol=0, atol=0)


def test_calibration_hooks_see_each_linear_input_and_are_removed():
    model = Toy()
    observers = calibrate_linear_inputs(model, batches(), "minmax", progress=False)
    assert set(observers) == {"up", "down"}
    h = torch.relu(model.up(model.embed(torch.cat([b.flatten() for b in batches()]))))
    assert observers["down"].max_val.item() == pytest.approx(h.max().item())
    assert not model.up._forward_pre_hooks and not model.down._forward_pre_hooks


def test_quantize_model_w_a_and_restore():
    model = Toy()
    ids = batches(1)[0]
    with torch.no_grad():
        ref = model(ids)
        quantize_model_w_a(model, batches(), w_bits=8, a_bits=8, observer=lambda: PercentileObserver(), progress=False)
        assert isinstance(model.up, QuantizedLinear) and model.up.act.is_static
        q8 = model(ids)
        restore_float_linears(model)
        assert type(model.up) is nn.Linear
        torch.testing.assert_close(model(ids), ref, rtol=0, atol=0)
    assert 0 < (q8 - ref).abs().max() < 0.05 * ref.abs().max()


def test_w4a8_dynamic_per_group_needs_no_calibration():
    model = Toy()
    quantize_model_w_a(model, w_bits=4, a_bits=8, dynamic=True, w_group_size=8)
    assert not model.down.act.is_static
    W = model.down.linear.weight
    torch.testing.assert_close(model.down.weight, qc.fake_quantize(W, 4, granularity=qc.PerGroup(8)))


def test_lower_bits_mean_larger_error():
    ids = batches(1)[0]
    errors = []
    for a_bits in (8, 4):
        model = Toy()
        with torch.no_grad():
            ref = model(ids)
            quantize_model_w_a(model, batches(), w_bits=8, a_bits=a_bits, progress=False)
            errors.append((model(ids) - ref).pow(2).mean().item())
    assert errors[1] > 10 * errors[0]


def test_static_without_data_raises():
    with pytest.raises(ValueError, match="needs calibration_batches"):
        quantize_model_w_a(Toy())


def test_static_needs_qparams():
    with pytest.raises(TypeError, match="needs QParams"):
        ActivationQuantizer.static(0.1)


@pytest.mark.slow
def test_course_model_dynamic_w8a8_close_to_float_and_better_than_static():
    from quantcourse import data
    from quantcourse.evaluate import perplexity
    from quantcourse.models import load_model

    model, tok = load_model()
    calib = data.calibration_samples(tok, 4, 128, seed=0).split(2)
    tokens = data.eval_tokens(tok)
    base = perplexity(model, tokens, seq_len=256, n_windows=2)
    quantize_model_w_a(model, w_bits=8, a_bits=8, dynamic=True)
    dynamic = perplexity(model, tokens, seq_len=256, n_windows=2)
    restore_float_linears(model)
    quantize_model_w_a(model, calib, w_bits=8, a_bits=8, observer="minmax", progress=False)
    static = perplexity(model, tokens, seq_len=256, n_windows=2)
    # per-tensor static int8 activations suffer from this model's massive activations (chapter 4)
    assert base < dynamic < 1.1 * base < static


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(dynamic=True, calibration_batches=batches()), "calibration_batches and observers would be ignored"),
        (dict(dynamic=True, observers={}), "would be ignored"),
        (dict(dynamic=True, w_group_size=5), "w_group_size=5 does not divide the 16 inputs of up"),
        (dict(dynamic=True, w_group_size=0), "w_group_size must be a positive int"),
    ],
)
def test_quantize_model_w_a_checks_options_before_calibrating(kwargs, message):
    model = Toy()
    model.forward = lambda *a: pytest.fail("ran the model before checking the options")
    with pytest.raises(ValueError, match=message):
        quantize_model_w_a(model, **kwargs)
