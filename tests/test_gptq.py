"""GPTQ (quantcourse.gptq): equality with the plain OBQ loop (gptq.obq_reference), error properties, errors."""

import math

import pytest
import torch

import quantcourse as qc
from quantcourse.gptq import HessianCollector, accumulate_hessian, gptq_quantize, hessian_error, obq_reference
from quantcourse.weights import QuantizedWeight, rtn_quantize


def correlated_inputs(n_tokens, d, *, seed, dtype=torch.float64, skew=0.0):
    """Inputs with correlated features (a random mixing matrix) and, with ``skew``, very unequal scales."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=gen, dtype=dtype) / math.sqrt(d)
    X = torch.randn(n_tokens, d, generator=gen, dtype=dtype) @ (torch.eye(d, dtype=dtype) + 2 * mix)
    X = X + torch.randn(d, generator=gen, dtype=dtype)  # a mean, as real activations have
    return X * torch.logspace(0, skew, d, dtype=dtype)[torch.randperm(d, generator=gen)]


def layer(out_f, in_f, *, seed, dtype=torch.float64, skew=0.0):
    gen = torch.Generator().manual_seed(1000 + seed)
    W = torch.randn(out_f, in_f, generator=gen, dtype=dtype)
    H, _ = accumulate_hessian(None, 0, correlated_inputs(4 * in_f, in_f, seed=seed, dtype=dtype, skew=skew))
    return W, H


CASES = {
    "per-channel-4b": dict(n_bits=4),
    "per-channel-3b-sym": dict(n_bits=3, symmetric=True),
    "g16-4b": dict(n_bits=4, group_size=16),
    "g16-2b-block8": dict(n_bits=2, group_size=16, block_size=8),
    "g32-block16-act-order": dict(n_bits=4, group_size=32, block_size=16, act_order=True),
    "g16-static-act-order": dict(n_bits=3, group_size=16, static_groups=True, act_order=True),
    "g8-block32-8b": dict(n_bits=8, group_size=8, block_size=32),
    "act-order-per-channel-sym": dict(n_bits=4, act_order=True, symmetric=True, block_size=24),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_equals_column_by_column_reference(case):
    case = dict(case)
    n_bits = case.pop("n_bits")
    W, H = layer(24, 96, seed=n_bits)
    expected_codes, expected_loss = obq_reference(W, H, n_bits, **case)
    got = gptq_quantize(W, H, n_bits, **case)
    assert torch.equal(got.codes.long(), expected_codes)
    assert got.loss == pytest.approx(expected_loss, rel=1e-9)


def test_loss_is_half_the_damped_quadratic_error():
    W, H = layer(16, 64, seed=1)
    r = gptq_quantize(W, H, 3, group_size=16, act_order=True)
    H_damped = H + 0.01 * H.diagonal().mean() * torch.eye(64, dtype=H.dtype)
    D = W - r.weight
    assert r.loss == pytest.approx(0.5 * torch.einsum("oi,ij,oj->", D, H_damped, D).item(), rel=1e-10)


@pytest.mark.parametrize("n_bits,group_size", [(4, None), (4, 32), (3, 32), (2, 64)])
def test_gptq_error_well_below_rtn_on_correlated_inputs(n_bits, group_size):
    W, H = layer(128, 256, seed=n_bits, dtype=torch.float32)
    gptq = gptq_quantize(W, H, n_bits, group_size=group_size)
    rtn = rtn_quantize(W, n_bits, group_size=group_size)
    assert hessian_error(W, gptq.weight, H) < 0.6 * hessian_error(W, rtn.weight, H)


def test_act_order_helps_when_the_hessian_diagonal_is_skewed():
    ratios = []
    for seed in range(3):
        W, H = layer(64, 128, seed=seed, skew=1.5)  # input scales spread over 1.5 decades
        plain = hessian_error(W, gptq_quantize(W, H, 3).weight, H)
        ordered = hessian_error(W, gptq_quantize(W, H, 3, act_order=True).weight, H)
        ratios.append(ordered / plain)
    assert max(ratios) < 0.9, ratios


def test_identity_hessian_is_round_to_nearest():
    W, _ = layer(32, 64, seed=3, dtype=torch.float32)
    got = gptq_quantize(W, torch.eye(64), 4, group_size=16)
    assert torch.equal(got.codes, rtn_quantize(W, 4, group_size=16).codes)


def test_result_fields_shapes_and_dtypes():
    W, H = layer(24, 64, seed=4, dtype=torch.float32)
    r = gptq_quantize(W.half(), H, 4, group_size=16, act_order=True)
    assert isinstance(r, QuantizedWeight)
    assert r.weight.shape == W.shape and r.weight.dtype == torch.float16
    assert r.codes.dtype == torch.uint8 and int(r.codes.max()) <= 15
    assert r.scale.shape == r.zero_point.shape == (24, 4)
    assert r.scale.dtype == torch.float32 and r.zero_point.dtype == torch.int32
    assert sorted(r.perm.tolist()) == list(range(64))
    assert torch.bincount(r.g_idx).tolist() == [16] * 4  # act-order groups are not contiguous, but full
    assert torch.equal(r.g_idx[r.perm], torch.arange(64) // 16)
    assert torch.equal(r.dequantize(torch.float16), r.weight)


def test_static_groups_keep_groups_contiguous_under_act_order():
    W, H = layer(8, 64, seed=5)
    r = gptq_quantize(W, H, 4, group_size=16, act_order=True, static_groups=True)
    assert torch.equal(r.g_idx, torch.arange(64) // 16)


def test_does_not_modify_its_inputs():
    W, H = layer(16, 32, seed=6)
    H[3, :] = H[:, 3] = 0  # a dead input, which the algorithm patches on its own copy
    W0, H0 = W.clone(), H.clone()
    gptq_quantize(W, H, 4, group_size=8, act_order=True)
    assert torch.equal(W, W0) and torch.equal(H, H0)


def test_dead_inputs_are_zeroed_and_receive_no_error():
    W, H = layer(16, 32, seed=7)
    H[[2, 9], :] = 0
    H[:, [2, 9]] = 0
    r = gptq_quantize(W, H, 4)
    assert torch.all(r.weight[:, [2, 9]] == 0)
    assert torch.isfinite(r.weight).all()


def test_block_size_does_not_matter_when_groups_start_blocks():
    W, H = layer(16, 128, seed=8)
    a = gptq_quantize(W, H, 4, group_size=32, block_size=32)
    b = gptq_quantize(W, H, 4, group_size=32, block_size=64)  # a group starts mid-block: stale W
    c = gptq_quantize(W, H, 4, block_size=7)
    assert torch.equal(c.codes, gptq_quantize(W, H, 4, block_size=128).codes)
    assert not torch.equal(a.codes, b.codes)  # the reference's dynamic-group rule is visible


def test_partial_last_group_only_when_allowed():
    W, H = layer(8, 40, seed=9)
    r = gptq_quantize(W, H, 4, group_size=16, allow_partial_group=True)
    assert r.scale.shape == (8, 3)
    assert torch.bincount(r.g_idx).tolist() == [16, 16, 8]
    expected, _ = obq_reference(W, H, 4, group_size=16)
    assert torch.equal(r.codes.long(), expected)


# ---- accumulate_hessian -------------------------------------------------------------------------


def test_accumulate_hessian_hand_worked():
    X = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    H, n = accumulate_hessian(None, 0, X)
    # 2/N Σ x xᵀ = (2/2) * ([[1,2],[2,4]] + [[9,0],[0,0]])
    assert n == 2
    assert torch.allclose(H, torch.tensor([[10.0, 2.0], [2.0, 4.0]]))


def test_accumulate_hessian_batches_equal_the_whole():
    X = correlated_inputs(300, 16, seed=0)
    H, n = None, 0
    for part in X.split([7, 93, 200]):
        H, n = accumulate_hessian(H, n, part)
    assert n == 300
    assert torch.allclose(H, 2 * X.T @ X / 300, rtol=1e-12)


def test_accumulate_hessian_flattens_batches_of_sequences():
    X = torch.randn(2, 5, 8)
    H, n = accumulate_hessian(None, 0, X)
    assert n == 10 and torch.allclose(H, 2 * X.reshape(10, 8).T @ X.reshape(10, 8) / 10, atol=1e-6)


def test_hessian_collector_shares_one_hessian_between_layers_fed_the_same_input():
    collect = HessianCollector()
    q, k = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)
    for _ in range(2):
        X = torch.randn(10, 8)
        collect("q", q, X)
        collect("k", k, X)  # the same object: no second product
        collect("o", q, X.clone())  # same values, another tensor: its own Hessian
    Hq, Hk, Ho = collect.take("q"), collect.take("k"), collect.take("o")
    assert Hq is Hk and Ho is not Hq and torch.allclose(Ho, Hq)


@pytest.mark.parametrize("d,dtype", [(1000, torch.float64), (16, torch.float64), (600, torch.float32)])
def test_hessian_collector_equals_accumulate_hessian(d, dtype):
    # d=1000: three row blocks of unequal sizes in the upper-triangle products; 16: a single one
    X = correlated_inputs(700, d, seed=2, dtype=dtype)
    collect, H, n = HessianCollector(), None, 0
    for part in X.split([100, 250, 350]):
        collect("layer", torch.nn.Linear(d, 2), part)
        H, n = accumulate_hessian(H, n, part)
    got = collect.take("layer")
    assert got.dtype == dtype and torch.equal(got, got.T)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(got, H, rtol=tol, atol=tol * H.abs().max().item())


# ---- bad inputs: one test per message -------------------------------------------------------------


def test_error_H_not_square():
    with pytest.raises(ValueError, match="square"):
        gptq_quantize(torch.randn(4, 8), torch.randn(8, 4), 4)


def test_error_H_does_not_match_W():
    with pytest.raises(ValueError, match="input columns"):
        gptq_quantize(torch.randn(4, 8), torch.eye(6), 4)


@pytest.mark.parametrize("n_bits", [1, 9, 4.0])
def test_error_bits_out_of_range(n_bits):
    with pytest.raises(ValueError, match="n_bits"):
        gptq_quantize(torch.randn(4, 8), torch.eye(8), n_bits)


def test_error_group_size_does_not_divide():
    with pytest.raises(ValueError, match="does not divide the 576 input columns.*allow_partial_group"):
        gptq_quantize(torch.randn(4, 576), torch.eye(576), 4, group_size=128)


def test_error_nan_in_W():
    W = torch.randn(4, 8)
    W[1, 2] = float("nan")
    with pytest.raises(ValueError, match="W contains 1 NaN"):
        gptq_quantize(W, torch.eye(8), 4)


def test_error_nan_in_H():
    H = torch.eye(8)
    H[0, 0] = float("inf")
    with pytest.raises(ValueError, match="H contains 1 NaN or Inf"):
        gptq_quantize(torch.randn(4, 8), H, 4)


def test_error_W_not_2d():
    with pytest.raises(ValueError, match="2-D"):
        gptq_quantize(torch.randn(8), torch.eye(8), 4)


def test_error_integer_W():
    with pytest.raises(TypeError, match="floating-point"):
        gptq_quantize(torch.ones(4, 8, dtype=torch.int32), torch.eye(8), 4)


def test_error_H_not_positive_definite():
    with pytest.raises(ValueError, match="not positive definite"):
        gptq_quantize(torch.randn(4, 8), -torch.eye(8), 4)


def test_error_static_groups_without_group_size():
    with pytest.raises(ValueError, match="static_groups=True needs a group_size"):
        gptq_quantize(torch.randn(4, 8), torch.eye(8), 4, static_groups=True)


def test_error_negative_damp():
    with pytest.raises(ValueError, match="damp"):
        gptq_quantize(torch.randn(4, 8), torch.eye(8), 4, damp=-0.1)


def test_error_bad_block_size():
    with pytest.raises(ValueError, match="block_size"):
        gptq_quantize(torch.randn(4, 8), torch.eye(8), 4, block_size=0)


def test_error_accumulate_hessian_shape():
    with pytest.raises(ValueError, match=r"H must be \[8, 8\]"):
        accumulate_hessian(torch.eye(4), 10, torch.randn(3, 8))


def test_error_hessian_error_shapes():
    with pytest.raises(ValueError, match="W_hat has shape"):
        hessian_error(torch.randn(4, 8), torch.randn(4, 7), torch.eye(8))


def test_error_quantize_model_unknown_method():
    with pytest.raises(ValueError, match="method must be"):
        qc.gptq.quantize_model(torch.nn.Linear(2, 2), None, method="awq")


# ---- a real layer of the course model -----------------------------------------------------------


@pytest.mark.slow
def test_real_course_model_layer_gptq_well_below_rtn(course_model):
    from quantcourse import data
    from quantcourse.models import load_model

    model, tok = load_model()
    calib = data.calibration_samples(tok, 4, 256, seed=0)
    inputs = {}
    layer = model.model.layers[10]
    hooks = [
        m.register_forward_hook(lambda mod, a, o, n=n: inputs.setdefault(n, []).append(a[0].detach()))
        for n, m in (("q_proj", layer.self_attn.q_proj), ("down_proj", layer.mlp.down_proj))
    ]
    with torch.no_grad():
        model(calib)
    for h in hooks:
        h.remove()
    for name, linear in (("q_proj", layer.self_attn.q_proj), ("down_proj", layer.mlp.down_proj)):
        H, _ = accumulate_hessian(None, 0, torch.cat(inputs[name]))
        W = linear.weight.detach()
        for n_bits in (3, 4):
            e_gptq = hessian_error(W, gptq_quantize(W, H, n_bits, group_size=64).weight, H)
            e_rtn = hessian_error(W, rtn_quantize(W, n_bits, group_size=64).weight, H)
            assert e_gptq < 0.7 * e_rtn, (name, n_bits, e_gptq, e_rtn)


# ---- quantize_model fails fast ---------------------------------------------------------------------------


def _model_that_must_not_run():
    """A tiny Llama whose forward pass fails: an error from quantize_model proves it came before any forward."""
    from tiny_models import tiny_llama

    model = tiny_llama()
    model.forward = lambda *a, **k: pytest.fail("quantize_model ran a forward pass before checking its options")
    return model


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(method="rtn", act_order=True), "act_order only apply to method='gptq'"),
        (dict(method="rtn", damp=0.1, block_size=64), "damp, block_size only apply to method='gptq'"),
        (dict(method="awq"), "method must be one of 'gptq', 'rtn'"),
        (dict(group_size=48), r"model.layers.0.self_attn.q_proj.*group_size=48 does not divide the 32 input"),
        (dict(n_bits=1), "n_bits"),
        (dict(static_groups=True, group_size=None), "static_groups=True needs a group_size"),
        (dict(symmetric="yes"), "symmetric must be True or False"),
        (dict(true_sequential=1), "true_sequential must be True or False"),
        (dict(method="rtn", true_sequential=True), "true_sequential only apply to method='gptq'"),
        (dict(forward_dtype="bf16"), "forward_dtype must be None .* 'bfloat16' or 'float16'"),
        (dict(forward_dtype=torch.bfloat16), "forward_dtype must be None"),
        (dict(method="rtn", forward_dtype="bfloat16"), "forward_dtype only apply to method='gptq'"),
        (dict(batch_size=0), "batch_size must be a positive int"),
        (dict(calibration=None), "method='gptq' needs calibration token ids"),
        (dict(calibration=torch.randn(2, 8)), "token ids"),
    ],
)
def test_quantize_model_checks_every_option_before_any_forward_pass(kwargs, message):
    kwargs = {"calibration": torch.zeros(2, 8, dtype=torch.long), "group_size": 16, **kwargs}
    with pytest.raises(ValueError, match=message):
        qc.gptq.quantize_model(_model_that_must_not_run(), kwargs.pop("calibration"), progress=False, **kwargs)


def test_gptq_config_fills_in_gptq_defaults_and_is_frozen():
    config = qc.gptq.GPTQConfig()
    assert config.as_dict() == dict(
        method="gptq", n_bits=4, group_size=64, symmetric=False, act_order=False, static_groups=False,
        damp=0.01, block_size=128, true_sequential=False, forward_dtype=None,
    )  # fmt: skip
    assert qc.gptq.GPTQConfig(method="rtn").act_order is False
    with pytest.raises(AttributeError):
        config.n_bits = 3
