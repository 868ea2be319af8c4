"""QAT (chapter 5): STE gradients, LSQ gradients against the paper's formulas, prepare/convert.

The straight-through fake quantizer itself is a primitive: its tests are in test_primitives.py.
"""

import math

import pytest
import torch
from torch import nn

import quantcourse as qc
from quantcourse.qat import (
    IntWeightLinear,
    LSQQuantizer,
    QATLinear,
    convert,
    grad_scale,
    lsq_fake_quantize,
    lsq_init_scale,
    prepare,
    round_ste,
)


def test_round_ste_forward_rounds_half_to_even_and_passes_gradient():
    x = torch.tensor([-1.5, -0.4, 0.5, 1.5, 2.7], requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y, torch.tensor([-2.0, -0.0, 0.0, 2.0, 3.0]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(5))


def test_grad_scale_is_identity_forward_and_scales_gradient():
    s = torch.tensor(0.37, requires_grad=True)
    y = grad_scale(s, 0.25)
    assert y.item() == s.item()
    y.backward()
    assert s.grad.item() == 0.25


@pytest.mark.parametrize("n_bits", [2, 3, 4, 8])
def test_lsq_gradients_match_the_paper(n_bits):
    qn, qp = 2 ** (n_bits - 1), 2 ** (n_bits - 1) - 1
    v = torch.randn(1000) * 2
    s = torch.tensor(0.3, requires_grad=True)
    vr = v.clone().requires_grad_()
    g = 1 / math.sqrt(v.numel() * qp)
    y = lsq_fake_quantize(vr, s, qn=qn, qp=qp, g=g)
    u = v / 0.3
    torch.testing.assert_close(y.detach(), torch.round(u.clamp(-qn, qp)) * 0.3)
    grads_s = [torch.autograd.grad(y[k], s, retain_graph=True)[0].item() for k in range(0, 1000, 50)]
    expected = torch.where(u < -qn, -float(qn), torch.where(u > qp, float(qp), -u + torch.round(u))) * g
    torch.testing.assert_close(torch.tensor(grads_s), expected[::50], rtol=1e-5, atol=1e-7)
    y.sum().backward()
    assert torch.equal(vr.grad, ((u >= -qn) & (u <= qp)).float())
    torch.testing.assert_close(s.grad, expected.sum(), rtol=1e-4, atol=1e-6)


def test_lsq_plus_offset_gradient_is_1_outside_0_inside():
    v = torch.tensor([-5.0, 0.1, 0.4, 9.0])
    s, beta = torch.tensor(0.1, requires_grad=True), torch.tensor(0.0, requires_grad=True)
    y = lsq_fake_quantize(v, s, qn=0, qp=15, g=1.0, offset=beta)
    grads = [torch.autograd.grad(y[k], beta, retain_graph=True)[0].item() for k in range(4)]
    assert grads == [1.0, 0.0, 0.0, 1.0]


def test_lsq_init_scale_formula():
    W = torch.randn(8, 32)
    torch.testing.assert_close(lsq_init_scale(W, 7), 2 * W.abs().mean() / math.sqrt(7))
    per_channel = lsq_init_scale(W, 7, qc.PerChannel(0))
    assert per_channel.shape == (8, 1)
    torch.testing.assert_close(per_channel[:, 0], 2 * W.abs().mean(1) / math.sqrt(7))


def test_minmax_init_equals_round_to_nearest_grid():
    W = torch.randn(8, 32)
    q = LSQQuantizer(4, granularity=qc.PerChannel(0), param_shape=(8, 1), init=W, init_method="minmax")
    torch.testing.assert_close(q.scale.detach(), W.abs().amax(1, keepdim=True) / 7)
    with pytest.raises(ValueError, match="method must be 'lsq' or 'minmax'"):
        lsq_init_scale(W, 7, method="mse")


def test_lsq_quantizer_weight_gradient_scale_uses_layer_size():
    W = torch.randn(6, 10)
    q = LSQQuantizer(4, granularity=qc.PerChannel(0), param_shape=(6, 1), init=W)
    s0 = q.scale.detach().clone()
    q(W).sum().backward()
    u = W / s0
    raw = torch.where(u < -8, -8.0, torch.where(u > 7, 7.0, -u + torch.round(u))).sum(1, keepdim=True)
    torch.testing.assert_close(q.scale.grad, raw / math.sqrt(60 * 7), rtol=1e-4, atol=1e-7)


def test_lsq_plus_activation_init_from_min_max():
    x = torch.rand(4, 5, 8) * 3 - 0.5
    q = LSQQuantizer(8, offset=True)
    y = q(x)
    torch.testing.assert_close(q.offset.detach(), x.min())
    torch.testing.assert_close(q.scale.detach(), (x.max() - x.min()) / 255)
    assert (y - x).abs().max() <= q.scale.item() / 2 + 1e-6


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))


@pytest.mark.parametrize("a_mode", [None, "lsq", "lsq+", "dynamic"])
@pytest.mark.parametrize("w_group_size", [None, 8], ids=["per_channel", "group8"])
def test_prepare_then_convert_gives_the_same_outputs(a_mode, w_group_size):
    model = tiny_model()
    x = torch.randn(3, 5, 16)
    prepare(model, w_bits=3, w_group_size=w_group_size, a_bits=None if a_mode is None else 4, a_mode=a_mode or "lsq")
    assert isinstance(model[0], QATLinear)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    for _ in range(3):  # a few steps so that the scales move away from their initial values
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    with torch.no_grad():
        fake = model(x)
        convert(model)
        real = model(x)
    assert isinstance(model[0], IntWeightLinear) and model[0].codes.dtype == torch.uint8
    assert int(model[0].codes.max()) <= 7 and model[0].zero_point.unique().tolist() == [4]
    torch.testing.assert_close(real, fake, rtol=0, atol=0)


def test_prepare_keeps_the_float_parameters_and_trains_them():
    model = tiny_model()
    weight = model[0].weight
    prepare(model, w_bits=4)
    assert model[0].weight is weight
    names = {n for n, _ in model.named_parameters()}
    assert "0.weight_quantizer.scale" in names


def test_qat_beats_ptq_on_a_regression_task():
    torch.manual_seed(0)
    X = torch.randn(512, 16)
    teacher = tiny_model()
    Y = teacher(X).detach()
    student = tiny_model()
    prepare(student, w_bits=2)
    with torch.no_grad():
        ptq_loss = (student(X) - Y).pow(2).mean().item()
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        loss = (student(X) - Y).pow(2).mean()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * ptq_loss


def test_convert_without_prepare_raises():
    with pytest.raises(ValueError, match="convert found no QATLinear"):
        convert(tiny_model())


def test_bad_a_mode_raises():
    with pytest.raises(ValueError, match="a_mode must be"):
        prepare(tiny_model(), a_bits=8, a_mode="static")


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="does not divide"):
        prepare(tiny_model(), w_group_size=5)


def test_lsq_plus_qparams_refused():
    with pytest.raises(ValueError, match="offset is not an integer zero point"):
        LSQQuantizer(8, offset=True, init=torch.randn(4)).qparams()


def test_bad_bits_raise():
    with pytest.raises(ValueError, match="n_bits must be"):
        prepare(tiny_model(), w_bits=1)
