"""quantcourse.smoothquant: statistics, factors and folds, W8A8 and the int8 GEMM.

Differential tests against plain re-statements of the authors' code (mit-han-lab/smoothquant:
calibration.py's hook, smooth.py's ``smooth_ln_fcs``, fake_quant.py's absmax quantizers), exact
equivalence of every fold on tiny Llama, OPT and GPT-2 models, and the method's point: on a layer with
outlier input channels, smoothing lowers the W8A8 error.
"""

import pytest
import torch
from tiny_models import TINY_MODELS, VOCAB, one_thread  # noqa: F401  (autouse fixture)
from torch import nn

from quantcourse import activations, smoothquant, surgery
from quantcourse.smoothquant import (
    Int8Linear,
    check_alpha,
    collect_act_scales,
    fold_smoothing,
    int8_matmul,
    quantize_w8a8,
    smooth_model,
    smoothing_factors,
    smoothquant_model,
    weight_channel_absmax,
)


def _tokens(n=4, seq_len=16, seed=1):
    return torch.randint(0, VOCAB, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def _model(family, seed=0):
    model = surgery.as_plain_linears(TINY_MODELS[family](seed))
    with torch.no_grad():  # non-trivial norm weights and biases, so that a wrong fold shows
        for module in model.modules():
            if surgery.is_norm(module):
                module.weight.uniform_(0.5, 1.5)
                if getattr(module, "bias", None) is not None:
                    module.bias.uniform_(-0.2, 0.2)
    return model


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


# ---- plain re-statements of the reference ------------------------------------------------------


def _reference_act_scales(model, tokens):
    """calibration.py's get_act_scales: a forward hook on every nn.Linear, running max of |x| per channel."""
    scales, handles = {}, []

    def stat(name, x):
        x = x.reshape(-1, x.shape[-1]).abs().detach()
        m = torch.max(x, dim=0)[0].float()
        scales[name] = torch.max(scales[name], m) if name in scales else m

    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and not name.endswith("lm_head"):
            handles.append(m.register_forward_hook(lambda mod, x, y, name=name: stat(name, x[0])))
    with torch.no_grad():
        for row in tokens:
            model(row[None])
    for h in handles:
        h.remove()
    return scales


def _reference_smooth_ln_fcs(ln, fcs, act_scales, alpha):
    """smooth.py's smooth_ln_fcs (the LayerNorm and the Llama-like RMSNorm versions are the same but for the bias)."""
    weight_scales = torch.cat([fc.weight.abs().max(dim=0, keepdim=True)[0] for fc in fcs], dim=0)
    weight_scales = weight_scales.max(dim=0)[0].clamp(min=1e-5)
    scales = (act_scales.pow(alpha) / weight_scales.pow(1 - alpha)).clamp(min=1e-5)
    with torch.no_grad():
        ln.weight.div_(scales)
        if getattr(ln, "bias", None) is not None:
            ln.bias.div_(scales)
        for fc in fcs:
            fc.weight.mul_(scales.view(1, -1))
    return scales


def _reference_fake_w8a8(x, w, per_token=True, per_channel=True):
    """fake_quant.py's absmax quantizers: q_max 127, scale = clamp(max, 1e-5) / 127, round."""

    def q(t, dim):
        s = (t.abs().amax(dim=dim, keepdim=True) if dim is not None else t.abs().max()).clamp(min=1e-5) / 127
        return (t / s).round() * s

    return q(x, -1 if per_token else None) @ q(w, -1 if per_channel else None).T


def _outlier_layer(seed=0, tokens=256, d_in=64, d_out=48, n_outliers=3, gain=60.0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, d_in, generator=gen)
    X[:, :n_outliers] *= gain  # a few input channels large in every token, as in LLMs
    W = torch.randn(d_out, d_in, generator=gen) * 0.05
    return X, W


# ---- statistics ---------------------------------------------------------------------------------


def test_channel_absmax_and_running_max_over_batches():
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 5, 8, generator=gen) * (k + 1) for k in range(3)]
    collector = smoothquant.ActMaxCollector()
    for b in batches:
        collector.update("fc", b)
    whole = torch.cat([b.reshape(-1, 8) for b in batches])
    assert torch.equal(collector.maxima["fc"], whole.abs().amax(dim=0))
    assert collector.n_tokens["fc"] == 30
    assert torch.equal(smoothquant.channel_absmax(batches[0]), batches[0].reshape(-1, 8).abs().amax(0))


@pytest.mark.parametrize("family", TINY_MODELS)
def test_collect_act_scales_equals_the_reference_hook(family):
    model = _model(family)
    tokens = _tokens()
    got = collect_act_scales(model, tokens, batch_size=3, progress=False)
    expected = _reference_act_scales(model, tokens)
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)


def test_shared_inputs_are_reduced_once():
    model = _model("llama")
    calls = []
    original = smoothquant.channel_absmax
    try:
        smoothquant.channel_absmax = lambda x: calls.append(1) or original(x)
        collect_act_scales(model, _tokens(n=1), progress=False)
    finally:
        smoothquant.channel_absmax = original
    # per block: q/k/v share one input, gate/up another; o and down have their own: 4 of 7 linears
    assert len(calls) == 4 * len(surgery.decoder_blocks(model))


# ---- factors and folds --------------------------------------------------------------------------


def test_weight_channel_absmax_takes_the_max_over_every_linear_and_clamps():
    w1 = torch.tensor([[1.0, -3.0, 0.0], [2.0, 0.5, 0.0]])
    w2 = torch.tensor([[-4.0, 1.0, 0.0]])
    assert torch.equal(weight_channel_absmax([w1, w2]), torch.tensor([4.0, 3.0, 1e-5]))


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 0.85, 1.0])
def test_smoothing_factors_match_the_reference(alpha):
    gen = torch.Generator().manual_seed(3)
    act = torch.rand(32, generator=gen) * 10
    act[5] = 0.0  # a dead channel: the factor is clamped, not zero
    fcs = [nn.Linear(32, n) for n in (16, 8)]
    norm = nn.LayerNorm(32)
    ref_norm, ref_fcs = nn.LayerNorm(32), [nn.Linear(32, n) for n in (16, 8)]
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
        ref_norm.load_state_dict(norm.state_dict())
        for fc, ref in zip(fcs, ref_fcs, strict=True):
            ref.load_state_dict(fc.state_dict())
    expected = _reference_smooth_ln_fcs(ref_norm, ref_fcs, act, alpha)
    got = smoothquant.smooth_norm_linears(norm, fcs, act, alpha)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    assert got.min() >= 1e-5
    torch.testing.assert_close(norm.weight, ref_norm.weight)
    torch.testing.assert_close(norm.bias, ref_norm.bias)
    for fc, ref in zip(fcs, ref_fcs, strict=True):
        torch.testing.assert_close(fc.weight, ref.weight)


def test_alpha_one_flattens_the_activations_and_alpha_zero_the_weights():
    X, W = _outlier_layer()
    act = X.abs().amax(0)
    for alpha, flat in ((1.0, "activations"), (0.0, "weights")):
        s = smoothing_factors(act, weight_channel_absmax([W]), alpha)
        x_max, w_max = (X / s).abs().amax(0), (W * s).abs().amax(0)
        if flat == "activations":  # s = max|X_j|: every input channel peaks at 1
            torch.testing.assert_close(x_max, torch.ones_like(x_max))
            assert (w_max / w_max.median()).max() > 20  # the outliers now live in the weights
        else:  # s = 1 / max|W_j|: every weight column peaks at 1, the activations keep their outliers
            torch.testing.assert_close(w_max, torch.ones_like(w_max))
            assert (x_max / x_max.median()).max() > 20
    # alpha = 0.5 splits evenly: both peak at sqrt(max|X_j| max|W_j|)
    s = smoothing_factors(act, weight_channel_absmax([W]), 0.5)
    torch.testing.assert_close((X / s).abs().amax(0), (W * s).abs().amax(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", TINY_MODELS)
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_smooth_model_computes_the_same_function(family, alpha):
    model = _model(family)
    tokens = _tokens()
    before = _logits(model, tokens)
    scales = collect_act_scales(model, tokens, progress=False)
    report = smooth_model(model, scales, alpha)
    torch.testing.assert_close(_logits(model, tokens), before, rtol=1e-4, atol=1e-4)
    blocks = len(surgery.decoder_blocks(model))
    assert len(report.factors) == 2 * blocks  # the attention norm's group and the FFN norm's group
    smoothed = {n for names in report.linears.values() for n in names}
    assert not smoothed & set(report.unsmoothed)
    assert all(
        n.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "fc1", "c_attn", "c_fc")) for n in smoothed
    )
    assert all(n.endswith(("o_proj", "down_proj", "out_proj", "fc2", "c_proj")) for n in report.unsmoothed)


@pytest.mark.parametrize("norm", [nn.LayerNorm(16), nn.LayerNorm(16, bias=False)])
def test_each_fold_is_exact_for_layernorm_with_and_without_bias(norm):
    gen = torch.Generator().manual_seed(0)
    fcs = [nn.Linear(16, 8), nn.Linear(16, 4, bias=False)]
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        if norm.bias is not None:
            norm.bias.uniform_(-1, 1)
    x = torch.randn(10, 16, generator=gen)
    before = [fc(norm(x)) for fc in fcs]
    s = torch.rand(16, generator=gen) * 4 + 0.1
    fold_smoothing(norm, fcs, s)
    for fc, b in zip(fcs, before, strict=True):
        torch.testing.assert_close(fc(norm(x)), b, rtol=1e-5, atol=1e-5)


def test_llama_rmsnorm_fold_is_exact():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm, fc = LlamaRMSNorm(16), nn.Linear(16, 8)
    x = torch.randn(5, 16)
    before = fc(norm(x))
    fold_smoothing(norm, [fc], torch.rand(16) + 0.5)
    torch.testing.assert_close(fc(norm(x)), before, rtol=1e-5, atol=1e-5)


# ---- the method's point --------------------------------------------------------------------------


@pytest.mark.parametrize("per_token", [False, True])
def test_smoothing_lowers_the_w8a8_error_of_a_layer_with_outlier_channels(per_token):
    X, W = _outlier_layer()
    Y = X @ W.T
    plain = (_reference_fake_w8a8(X, W, per_token=per_token) - Y).pow(2).mean()
    s = smoothing_factors(X.abs().amax(0), weight_channel_absmax([W]), 0.5)
    smoothed = (_reference_fake_w8a8(X / s, W * s, per_token=per_token) - Y).pow(2).mean()
    assert smoothed < plain / 4, f"smoothing should cut the W8A8 error: {plain:.3g} -> {smoothed:.3g}"
    # the library's fake-quantized layer gives the reference's numbers
    lin = nn.Linear(64, 48, bias=False)
    with torch.no_grad():
        lin.weight.copy_(W)
    mode = "per_token" if per_token else "per_tensor"
    layer = activations.QuantizedLinear(lin, w_bits=8, act=smoothquant._act_quantizer(mode, None))
    torch.testing.assert_close(layer(X), _reference_fake_w8a8(X, W, per_token=per_token), rtol=1e-5, atol=1e-4)


def test_smoothquant_lowers_the_per_tensor_error_of_a_model_with_outliers():
    model = _model("llama")
    with torch.no_grad():  # outlier channels in the norms' outputs, as LLMs have them
        for block in surgery.decoder_blocks(model):
            block.input_layernorm.weight[:2] *= 40
            block.post_attention_layernorm.weight[3] *= 40
    tokens = _tokens(n=6)
    ref = _logits(model, tokens)
    scales = collect_act_scales(model, tokens, progress=False)

    def err(alpha):
        m = _model("llama")
        m.load_state_dict(model.state_dict())
        smoothquant_model(m, alpha=alpha, activations="per_tensor", act_scales=scales, progress=False)
        return (_logits(m, tokens) - ref).pow(2).mean().item()

    assert err(0.5) < err(None) / 2


# ---- W8A8 and the integer path -------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(17, 64, 24), (1, 8, 8), (40, 576, 32), (3, 5, 7)])
def test_int8_matmul_is_exact(shape):
    M, K, N = shape
    gen = torch.Generator().manual_seed(M)
    a = torch.randint(-127, 128, (M, K), generator=gen, dtype=torch.int8)
    b = torch.randint(-127, 128, (N, K), generator=gen, dtype=torch.int8)
    expected = (a.long() @ b.long().T).to(torch.int32)
    for backend in ("auto", "exact"):
        got = int8_matmul(a, b, backend=backend)
        assert got.dtype == torch.int32 and torch.equal(got, expected)
    if smoothquant._int_mm_works("cpu"):
        assert torch.equal(int8_matmul(a, b, backend="int_mm"), expected)


def test_int8_matmul_rejects_float_and_mismatched_operands():
    with pytest.raises(TypeError, match="int8"):
        int8_matmul(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.int8))
    with pytest.raises(ValueError, match="share K"):
        int8_matmul(torch.zeros(2, 3, dtype=torch.int8), torch.zeros(2, 4, dtype=torch.int8))


@pytest.mark.parametrize("weights", ["per_channel", "per_tensor"])
@pytest.mark.parametrize("mode", ["per_token", "per_tensor", "static"])
def test_int8_linear_equals_the_fake_quantized_layer(weights, mode):
    X, W = _outlier_layer(seed=2)
    lin = nn.Linear(64, 48)
    with torch.no_grad():
        lin.weight.copy_(W)
    qp = smoothquant.static_act_qparams(X.abs().amax(0)) if mode == "static" else None
    fake = smoothquant.quantize_w8a8(
        nn.Sequential(lin),
        weights=weights,
        activations=mode,
        act_scales={"0": X.abs().amax(0)} if mode == "static" else None,
    )
    real = Int8Linear.from_float(lin, weights=weights, activations=mode, static_qparams=qp)
    assert real.weight_q.dtype == torch.int8
    x3 = X.reshape(4, 64, 64)
    torch.testing.assert_close(real(x3), fake(x3), rtol=1e-5, atol=1e-5)
    per_token = mode == "per_token"
    if mode != "static":
        expected = _reference_fake_w8a8(X, W, per_token=per_token, per_channel=weights == "per_channel") + lin.bias
        torch.testing.assert_close(real(X), expected.detach(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("family", TINY_MODELS)
def test_integer_model_equals_fake_quantized_model(family):
    tokens = _tokens()
    fake, real = _model(family), _model(family)
    scales = collect_act_scales(fake, tokens, progress=False)
    for m, integer in ((fake, False), (real, True)):
        smoothquant_model(m, alpha=0.5, activations="static", act_scales=scales, integer=integer, progress=False)
    assert any(isinstance(mod, Int8Linear) for mod in real.modules())
    torch.testing.assert_close(_logits(real, tokens), _logits(fake, tokens), rtol=1e-3, atol=1e-3)


def test_static_ranges_from_the_statistics_equal_a_second_calibration_pass():
    """The smoothed inputs' per-tensor max is max_j(act_max_j / s_j): no second pass over the data."""
    model = _model("llama")
    tokens = _tokens()
    scales = collect_act_scales(model, tokens, progress=False)
    report = smooth_model(model, scales, 0.5)
    observers = activations.calibrate_linear_inputs(model, tokens.split(2), "minmax", progress=False)
    divisor = {n: report.factors[g] for g, names in report.linears.items() for n in names}
    for name, obs in observers.items():
        expected = obs.qparams(8).scale
        got = smoothquant.static_act_qparams(scales[name], divisor.get(name)).scale
        torch.testing.assert_close(got, expected.reshape(()), rtol=1e-5, atol=1e-9)


def test_w8a8_model_can_be_restored():
    model = _model("opt")
    tokens = _tokens()
    before = _logits(model, tokens)
    quantize_w8a8(model, activations="per_tensor")
    assert isinstance(model.model.decoder.layers[0].fc1, activations.QuantizedLinear)
    activations.restore_float_linears(model)
    torch.testing.assert_close(_logits(model, tokens), before)


def test_paper_levels_use_per_tensor_weights():
    assert {lvl["activations"] for lvl in smoothquant.PAPER_LEVELS.values()} == {"per_token", "per_tensor", "static"}
    assert all(lvl["weights"] == "per_tensor" for lvl in smoothquant.PAPER_LEVELS.values())


# ---- clear errors, before any forward pass -------------------------------------------------------


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), True, "0.5", None])
def test_alpha_outside_zero_one_is_rejected(alpha):
    with pytest.raises(ValueError, match=r"alpha .* \[0, 1\]"):
        check_alpha(alpha)


class _NoForward(nn.Module):
    """A model that fails if anything runs it."""

    def __init__(self):
        super().__init__()
        self.model = _model("llama").model

    def forward(self, *args, **kwargs):
        raise AssertionError("the options should have been checked before any forward pass")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": 1.2}, r"alpha"),
        ({"alpha": 0.5, "weights": "per_group"}, r"weights must be one of"),
        ({"alpha": 0.5, "activations": "per_channel"}, r"activations must be one of"),
        ({"alpha": 0.5, "batch_size": 0}, r"batch_size"),
    ],
)
def test_options_are_validated_before_any_forward_pass(kwargs, match):
    with pytest.raises(ValueError, match=match):
        smoothquant_model(_NoForward(), _tokens(), progress=False, **kwargs)


@pytest.mark.parametrize("calibration", [torch.zeros(0, 16, dtype=torch.long), torch.zeros(4, 0, dtype=torch.long)])
def test_calibration_with_no_tokens_is_rejected(calibration):
    with pytest.raises(ValueError, match="no tokens"):
        collect_act_scales(_NoForward(), calibration)
    with pytest.raises(ValueError, match="no tokens"):
        smoothquant_model(_NoForward(), calibration)


def test_float_calibration_and_missing_statistics_are_rejected():
    with pytest.raises(ValueError, match="token ids"):
        collect_act_scales(_NoForward(), torch.randn(2, 8))
    with pytest.raises(ValueError, match="calibration token ids"):
        smoothquant_model(_NoForward(), None, alpha=0.5)
    with pytest.raises(ValueError, match="no statistics"):
        smooth_model(_model("llama"), {}, 0.5)
    with pytest.raises(ValueError, match="static activation quantization needs act_scales"):
        quantize_w8a8(_model("llama"), activations="static")


def test_fold_rejects_mismatched_factors():
    with pytest.raises(ValueError, match="channels"):
        fold_smoothing(nn.LayerNorm(8), [nn.Linear(8, 4)], torch.ones(6))
    with pytest.raises(ValueError, match="positive"):
        fold_smoothing(nn.LayerNorm(8), [nn.Linear(8, 4)], torch.zeros(8))


@pytest.mark.slow
def test_smoothing_lowers_the_per_tensor_w8a8_error_on_course_model_activations():
    """On the course model's real q/k/v and gate/up inputs, smoothing cuts the per-tensor W8A8 output error."""
    from quantcourse import data
    from quantcourse.models import load_model

    model, tokenizer = load_model()
    tokens = data.calibration_samples(tokenizer, 2, 128, seed=0)
    scales = collect_act_scales(model, tokens, progress=False)
    block = surgery.decoder_blocks(model)[10]
    fcs = {"q": block.self_attn.q_proj, "gate": block.mlp.gate_proj}
    with surgery.record_inputs(fcs) as inputs, torch.no_grad():
        model(tokens)
    for key, suffix in (("q", "self_attn.q_proj"), ("gate", "mlp.gate_proj")):
        X, W = torch.cat(inputs[key]), fcs[key].weight.detach()
        Y = X @ W.T
        plain = (_reference_fake_w8a8(X, W, per_token=False) - Y).pow(2).mean()
        s = smoothing_factors(scales[f"model.layers.10.{suffix}"], weight_channel_absmax([W]), 0.8)
        smoothed = (_reference_fake_w8a8(X / s, W * s, per_token=False) - Y).pow(2).mean()
        assert smoothed < plain / 2, f"{suffix}: per-tensor W8A8 error {plain:.3g} -> {smoothed:.3g} after smoothing"


def test_int_mm_probe_says_true_where_torch_int_mm_runs():
    a = torch.randint(-127, 128, (32, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    b = torch.randint(-127, 128, (24, 64), generator=torch.Generator().manual_seed(1), dtype=torch.int8)
    try:
        runs = torch.equal(torch._int_mm(a, b.T), (a.long() @ b.long().T).to(torch.int32))
    except (AttributeError, RuntimeError, NotImplementedError):
        runs = False
    assert smoothquant._int_mm_works("cpu") == runs
