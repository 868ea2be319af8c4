"""AWQ (quantcourse.awq): the grid, the statistic, the scale and clip searches, the fold, the model-level run."""

import copy

import pytest
import torch
from tiny_models import TINY_MODELS, tiny_llama, tiny_opt

from quantcourse import awq, gptq, pipeline, serialization, surgery, weights


def reference_pseudo_quantize(w, n_bit, q_group_size):
    # mit-han-lab/llm-awq awq/quantize/quantizer.py pseudo_quantize_tensor (zero_point=True), transcribed.
    org_w_shape = w.shape
    if q_group_size > 0:
        w = w.reshape(-1, q_group_size)
    max_val = w.amax(dim=1, keepdim=True)
    min_val = w.amin(dim=1, keepdim=True)
    max_int, min_int = 2**n_bit - 1, 0
    scales = (max_val - min_val).clamp(min=1e-5) / max_int
    zeros = (-torch.round(min_val / scales)).clamp_(min_int, max_int)
    w = (torch.clamp(torch.round(w / scales) + zeros, min_int, max_int) - zeros) * scales
    return w.reshape(org_w_shape)


def reference_auto_clip(w, input_feat, n_bit, q_group_size, n_grid=20, max_shrink=0.5, n_sample_token=512):
    # auto_clip.py auto_clip_layer, transcribed (one output-channel batch, CPU).
    group_size = q_group_size if q_group_size > 0 else w.shape[1]
    input_feat = input_feat.view(-1, input_feat.shape[-1])
    input_feat = input_feat.reshape(1, input_feat.shape[0], -1, group_size)
    input_feat = input_feat[:, 0 :: max(input_feat.shape[1] // n_sample_token, 1)]
    w = w.reshape(w.shape[0], 1, -1, group_size)
    org_max_val = w.abs().amax(dim=-1, keepdim=True)
    best_max_val = org_max_val.clone()
    min_errs = torch.ones_like(org_max_val) * 1e9
    org_out = (input_feat * w).sum(dim=-1)
    for i_s in range(int(max_shrink * n_grid)):
        max_val = org_max_val * (1 - i_s / n_grid)
        cur_w = torch.clamp(w, -max_val, max_val)
        q_w = reference_pseudo_quantize(cur_w, n_bit, q_group_size)
        cur_out = (input_feat * q_w).sum(dim=-1)
        err = (cur_out - org_out).pow(2).mean(dim=1).view(min_errs.shape)
        cur_best_idx = err < min_errs
        min_errs[cur_best_idx] = err[cur_best_idx]
        best_max_val[cur_best_idx] = max_val[cur_best_idx]
    return best_max_val.squeeze(1).squeeze(-1), min_errs.squeeze(1).squeeze(-1)


@pytest.mark.parametrize("n_bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, None])
def test_pseudo_quantize_matches_the_reference(n_bits, group_size):
    W = torch.randn(48, 128, dtype=torch.float64)
    W[:3] = W[:3].abs() + 0.1  # all-positive groups: the zero point clamps at 0
    W[3] = 0  # all-zero rows: the 1e-5 floor of the range
    got = awq.pseudo_quantize(W, n_bits, group_size)
    assert torch.equal(got, reference_pseudo_quantize(W, n_bits, group_size or -1))
    record = awq.quantize_weight(W.float(), n_bits, group_size)
    assert torch.equal(record.weight, awq.pseudo_quantize(W.float(), n_bits, group_size))
    assert record.codes.dtype == torch.uint8 and int(record.codes.max()) <= 2**n_bits - 1
    assert int(record.zero_point.min()) >= 0 and int(record.zero_point.max()) <= 2**n_bits - 1
    assert torch.equal(record.dequantize(), record.weight)


def test_awq_grid_is_not_widened_to_zero_as_gptqs():
    W = torch.linspace(1.0, 2.0, 64).reshape(1, 64)
    scale, zero = awq.awq_qparams(W, 4, 64)
    assert scale.item() == pytest.approx(1.0 / 15) and zero.item() == 0
    assert weights.weight_qparams(W, 4).scale.item() == pytest.approx(2.0 / 15)  # GPTQ's range is [0, 2]


def test_activation_scale_is_the_mean_magnitude_over_all_batches():
    batches = [torch.randn(2, 5, 8), torch.randn(3, 8)]
    flat = torch.cat([batches[0].reshape(-1, 8), batches[1]])
    torch.testing.assert_close(awq.activation_scale(batches), flat.abs().mean(0))
    with pytest.raises(ValueError, match="no batches"):
        awq.activation_scale([])


def test_scales_for_alpha():
    s_x = torch.rand(64) * 10 + 0.01
    assert torch.equal(awq.scales_for_alpha(s_x, 0.0), torch.ones(64))
    for alpha in (0.25, 0.5, 0.95):
        s = awq.scales_for_alpha(s_x, alpha)
        assert (s.max() * s.min()).item() == pytest.approx(1.0, rel=1e-5)
        expected = s_x.pow(alpha).clamp(min=1e-4)
        torch.testing.assert_close(s, expected / (expected.max() * expected.min()).sqrt())
    with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 1\]"):
        awq.scales_for_alpha(s_x, 1.5)
    with pytest.raises(ValueError, match="1-D"):
        awq.scales_for_alpha(s_x.reshape(8, 8), 0.5)


def _block_inputs(model, n=2, seq=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    calibration = torch.randint(0, 128, (n, seq), generator=gen)
    model = surgery.as_plain_linears(model)
    inputs, args, kwargs = pipeline.capture_block_inputs(model, calibration, batch_size=n)
    blocks = surgery.decoder_blocks(model)
    return pipeline.BlockContext(0, "model.layers.0", blocks[0], inputs, args, kwargs)


@pytest.mark.parametrize("family", list(TINY_MODELS))
def test_scaling_every_group_with_searched_scales_leaves_the_block_function_unchanged(family):
    model = TINY_MODELS[family]()
    ctx = _block_inputs(model)
    before = ctx.run()
    report = awq.awq_block(ctx, 3, group_size=16, n_grid=5, clip=False)
    assert len(report.searches) == len(surgery.scale_groups(ctx.block))
    assert any(s.alpha > 0 for s in report.searches.values())  # something was really scaled
    for a, b in zip(before, ctx.run(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_alpha_zero_leaves_the_weights_unchanged():
    model = tiny_llama()
    block = surgery.decoder_blocks(model)[0]
    saved = copy.deepcopy(block.state_dict())
    s_x = torch.rand(32) * 5
    surgery.fold_scales(surgery.scale_groups(block)[0], awq.scales_for_alpha(s_x, 0))
    for key, value in block.state_dict().items():
        assert torch.equal(value, saved[key]), key
    W = block.mlp.down_proj.weight
    seen = []
    awq.search_scale([W], torch.rand(64), lambda ws: seen.append(ws[0]) or 0.0, n_bits=4, group_size=32, n_grid=4)
    assert torch.equal(seen[0], awq.pseudo_quantize(W, 4, 32))  # α = 0 is plain round-to-nearest


def test_scale_search_picks_the_alpha_of_lowest_loss():
    ctx = _block_inputs(tiny_llama(), n=2, seq=32)
    block, n_grid = ctx.block, 10
    linears = [block.mlp.gate_proj, block.mlp.up_proj]
    X = []
    ctx.collect(lambda name, linear, x: X.append(x) if name.endswith("gate_proj") else None)
    X = torch.cat(X)
    s_x = awq.activation_scale(X)
    loss = awq.module_output_loss(linears, lambda: [block.mlp(X)])
    result = awq.search_scale([lin.weight for lin in linears], s_x, loss, n_bits=3, group_size=32, n_grid=n_grid)
    # The plain loop: scale, quantize, run the MLP, compare, restore.
    y_float = block.mlp(X)
    plain = []
    for k in range(n_grid):
        s = s_x.pow(k / n_grid).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        saved = [lin.weight.data.clone() for lin in linears]
        for lin in linears:
            lin.weight.data = reference_pseudo_quantize(lin.weight.data * s, 3, 32) / s
        plain.append((block.mlp(X) - y_float).pow(2).mean().item())
        for lin, w in zip(linears, saved, strict=True):
            lin.weight.data = w
    torch.testing.assert_close(result.losses, torch.tensor(plain, dtype=torch.float64), rtol=1e-4, atol=0)
    assert result.alpha == pytest.approx(min(range(n_grid), key=plain.__getitem__) / n_grid)
    assert result.loss <= plain[0] + 1e-12  # never worse than α = 0 (round-to-nearest) on its own data


def test_linear_output_loss_equals_the_direct_mean():
    W, X = torch.randn(24, 64, dtype=torch.float64), torch.randn(300, 64, dtype=torch.float64)
    W_hat = awq.pseudo_quantize(W, 3, 32)
    direct = (X @ W.T - X @ W_hat.T).pow(2).mean().item()
    assert awq.linear_output_loss(W, [X[:100], X[100:]])([W_hat]) == pytest.approx(direct, rel=1e-10)  # Gram
    direct = (X[:50] @ W.T - X[:50] @ W_hat.T).pow(2).mean().item()
    assert awq.linear_output_loss(W, X[:50])([W_hat]) == pytest.approx(direct, rel=1e-10)  # fewer tokens: direct


@pytest.mark.parametrize("group_size", [32, None])
def test_clip_search_matches_the_reference(group_size):
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(40, 64, generator=gen, dtype=torch.float64)
    W[:, 5] *= 8  # a few large weights worth clipping
    X = torch.randn(2048, 64, generator=gen, dtype=torch.float64)
    got = awq.search_clip(W, X, 3, group_size)
    expected, _ = reference_auto_clip(W, X, 3, group_size or 64)  # None: one group of the whole row
    assert torch.equal(got, expected)
    assert (got < W.reshape(40, -1, group_size or 64).abs().amax(-1)).any()  # some groups are clipped
    clipped = awq.apply_clip(W, got)
    assert clipped.abs().reshape(40, got.shape[1], -1).amax(-1).le(got).all()


def test_awq_on_a_tiny_model_reports_every_group_and_keeps_the_function_before_rounding():
    model = tiny_opt()
    calibration = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    probe = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    before = model(probe).logits
    report = awq.awq_transform_model(model, calibration, 4, group_size=32, n_grid=10, clip=False, progress=False)
    torch.testing.assert_close(model(probe).logits, before, rtol=1e-4, atol=1e-4)  # scaling alone is exact
    groups = ("self_attn.q_proj", "self_attn.out_proj", "fc1", "fc2")  # a group is named by its first linear
    assert set(report.alphas) == {f"model.decoder.layers.{i}.{g}" for i in range(2) for g in groups}
    assert all(0 <= a < 1 for a in report.alphas.values())
    assert set(report.blocks[0].seconds) == {"statistics", "scale search", "clip search"}


def test_bfloat16_search_replays_a_copy_and_finds_the_float32_losses():
    # The half-precision search replays a bfloat16 copy of the attention/MLP: the block itself is left in
    # float32 and unchanged before the fold, and each α's loss is the float32 loss up to bfloat16 rounding.
    model = _outlier_llama()
    calibration = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    x, args, kwargs = pipeline.capture_block_inputs(model, calibration, batch_size=2)
    block = surgery.decoder_blocks(model)[0]
    reports = {}
    for dtype in (None, torch.bfloat16):
        ctx = pipeline.BlockContext(0, "model.layers.0", copy.deepcopy(block), x, args, kwargs)
        reports[dtype] = awq.awq_block(ctx, 3, group_size=32, n_grid=10, clip=False, search_dtype=dtype)
        assert all(p.dtype == torch.float32 for p in ctx.block.parameters())
    exact, half = (reports[d].searches for d in (None, torch.bfloat16))
    assert exact.keys() == half.keys()
    for name in exact:
        a, b = exact[name].losses, half[name].losses
        assert not torch.equal(a, b) or name.endswith("down_proj")  # down_proj's loss is the Gram form, float32
        torch.testing.assert_close(b, a, rtol=0.1, atol=1e-3 * float(a.max()))
        assert abs(exact[name].alpha - half[name].alpha) <= 0.1 + 1e-9, name


def test_a_search_dtype_that_is_not_floating_point_is_refused():
    with pytest.raises(ValueError, match="search_dtype must be None"):
        awq.awq_quantize_model(tiny_llama(), torch.zeros(2, 8, dtype=torch.long), search_dtype=torch.int8)


def _outlier_llama():
    # A tiny Llama whose attention and MLP inputs carry a few large channels, as real LLMs do.
    model = tiny_llama()
    for block in surgery.decoder_blocks(model):
        for norm in (block.input_layernorm, block.post_attention_layernorm):
            norm.weight.data[[3, 17]] = 12.0
    return model


def test_awq_quantize_model_clips_stores_and_beats_rtn_on_outliers(tmp_path):
    calibration = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    probe = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    reference = _outlier_llama()
    logits = reference(probe).logits
    model = _outlier_llama()
    report = awq.awq_quantize_model(model, calibration, 3, group_size=32, progress=False)
    clipped = set(report.clip_ratios)
    assert not any(name.endswith(("q_proj", "k_proj")) for name in clipped)  # q/k are never clipped
    assert {n for n in clipped if n.startswith("model.layers.0.")} == {
        f"model.layers.0.{n}"
        for n in ("self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    }
    for ratio in report.clip_ratios.values():
        assert ratio.min() >= 0.55 - 1e-6 and ratio.max() <= 1 + 1e-6
    for unclipped, best in (e for b in report.blocks for e in b.clip_errors.values()):
        assert best <= unclipped * (1 + 1e-6)
    rtn = _outlier_llama()
    gptq.quantize_model(rtn, None, n_bits=3, group_size=32, method="rtn", progress=False)
    awq_error = (model(probe).logits - logits).pow(2).mean()
    rtn_error = (rtn(probe).logits - logits).pow(2).mean()
    assert awq_error < 0.7 * rtn_error
    saved = serialization.save_quantized(report.quantized, tmp_path / "awq.safetensors")
    expected = sum(  # per row: packed 3-bit codes, a float32 scale per group, packed 3-bit zero points
        r.codes.shape[0] * (-(-r.codes.shape[1] * 3 // 8) + 4 * r.scale.shape[1] + -(-r.scale.shape[1] * 3 // 8))
        for r in report.quantized.layers.values()
    )
    assert saved.quantized_bytes == expected
    loaded = serialization.load_quantized(tmp_path / "awq.safetensors", tiny_llama())
    for name, linear in surgery.find_linears(model).items():
        assert torch.equal(surgery.get_module(loaded.model, name).weight, linear.weight), name
    torch.testing.assert_close(loaded.model(probe).logits, model(probe).logits)


def test_awq_then_gptq_quantizes_the_scaled_weights():
    calibration = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    model = _outlier_llama()
    awq.awq_transform_model(model, calibration, 3, group_size=32, progress=False)
    norm_after_awq = model.model.layers[0].input_layernorm.weight.clone()
    assert not torch.equal(norm_after_awq, _outlier_llama().model.layers[0].input_layernorm.weight)
    transformed = copy.deepcopy(model)
    quantized = gptq.quantize_model(model, calibration, n_bits=3, group_size=32, progress=False)
    assert torch.equal(model.model.layers[0].input_layernorm.weight, norm_after_awq)  # GPTQ keeps the fold
    for name, record in quantized.layers.items():
        W = surgery.get_module(transformed, name).weight
        assert record.weight.shape == W.shape and (record.weight - W).abs().max() < W.abs().max()
        assert torch.equal(surgery.get_module(model, name).weight, record.weight)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(group_size=24), "group_size=24 does not divide the 64 inputs of mlp.down_proj|does not divide the 32"),
        (dict(group_size=0), "group_size must be a positive int"),
        (dict(n_bits=1), "n_bits must be an int from 2 to 8"),
        (dict(n_grid=1), "n_grid must be an int >= 2"),
        (dict(clip="yes"), "clip must be True or False"),
    ],
)
def test_bad_options_fail_before_any_forward_pass(kwargs, message):
    model = tiny_llama()
    calls = []
    model.model.embed_tokens.register_forward_hook(lambda *a: calls.append(1))
    options = dict(n_bits=4, group_size=32) | kwargs
    with pytest.raises(ValueError, match=message):
        awq.awq_quantize_model(model, torch.zeros(2, 8, dtype=torch.long), progress=False, **options)
    assert not calls


@pytest.mark.parametrize("shape", [(0, 16), (4, 0)])
def test_calibration_without_tokens_is_refused(shape):
    with pytest.raises(ValueError, match="calibration holds no tokens"):
        awq.awq_quantize_model(tiny_llama(), torch.zeros(shape, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="int64 tensor of token ids"):
        awq.awq_quantize_model(tiny_llama(), torch.zeros(2, 8), progress=False)


def test_grid_errors():
    with pytest.raises(ValueError, match="does not divide the 48 input columns"):
        awq.pseudo_quantize(torch.randn(4, 48), 4, 64)
    with pytest.raises(ValueError, match="n_grid must be a positive int"):
        awq.search_scale([torch.randn(4, 8)], torch.rand(8), lambda ws: 0.0, group_size=8, n_grid=0)


@pytest.mark.slow
def test_awq_beats_rtn_on_real_course_model_activations(course_model):
    """One real block (block 5), searched on calibration text and scored on held-out text."""
    from quantcourse import data
    from quantcourse.models import load_model

    model, tokenizer = load_model()
    calibration = data.calibration_samples(tokenizer, 8, 256, seed=0)
    held_out = data.eval_tokens(tokenizer)[: 4 * 256].reshape(4, 256)
    blocks = surgery.decoder_blocks(model)
    index = 5

    def context(tokens):
        inputs, args, kwargs = pipeline.capture_block_inputs(model, tokens, batch_size=4)
        for i in range(index):
            inputs = pipeline.BlockContext(i, "", blocks[i], inputs, args, kwargs).run()
        return pipeline.BlockContext(index, f"model.layers.{index}", blocks[index], inputs, args, kwargs)

    calib_ctx, eval_ctx = context(calibration), context(held_out)
    y_float = eval_ctx.run()

    def rounded_error():
        for linear in surgery.find_linears(blocks[index]).values():
            linear.weight.data = awq.pseudo_quantize(linear.weight.data, 3, 64)
        out = eval_ctx.run()
        return sum((a - b).pow(2).sum().item() for a, b in zip(out, y_float, strict=True))

    float_state = copy.deepcopy(blocks[index].state_dict())
    rtn_error = rounded_error()
    blocks[index].load_state_dict(float_state)
    report = awq.awq_block(calib_ctx, 3, group_size=64)
    groups = ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj")  # no v -> o under grouped-query attention
    assert set(report.searches) == {f"model.layers.{index}.{g}" for g in groups}
    awq_error = rounded_error()
    assert awq_error < 0.9 * rtn_error, (awq_error, rtn_error)
