"""LLM.int8() (quantcourse.llm_int8): byte equality with bitsandbytes' functional ops, the decomposition
against a float reference, the module and model swap, the outlier analysis, errors."""

import math

import pytest
import torch
from tiny_models import VOCAB, one_thread, tiny_llama, tiny_opt  # noqa: F401  (one_thread: autouse fixture)
from torch import nn

from quantcourse import llm_int8, surgery
from quantcourse.llm_int8 import (
    Int8Linear,
    Int8Rows,
    dequantize_matmul,
    int8_linear,
    int8_matmul,
    outlier_columns,
    outlier_stats,
    quantize_model_int8,
    vectorwise_dequantize,
    vectorwise_quantize,
)

bnb_F = pytest.importorskip("bitsandbytes.functional")
bnb_ops = torch.ops.bitsandbytes

DISTRIBUTIONS = ("normal", "heavy", "outlier_cols", "zeros", "tiny", "huge")


def activations(rows, cols, *, seed, kind="normal", dtype=torch.float16):
    """Random inputs of several shapes of trouble: Student-t tails, LLM-like outlier columns (a few hidden
    dimensions 10-60x larger in most tokens), exact zeros (whole rows and columns too), tiny and huge scales."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    if kind == "heavy":
        chi2 = torch.randn(3, rows, cols, generator=gen, dtype=torch.float64).pow(2).sum(0)
        x = x / (chi2 / 3).sqrt()
    elif kind == "outlier_cols":
        cols_hit = torch.randperm(cols, generator=gen)[: max(1, cols // 100)]
        hit_rows = torch.rand(rows, len(cols_hit), generator=gen) < 0.7
        x[:, cols_hit] += hit_rows * torch.empty(rows, len(cols_hit), dtype=torch.float64).uniform_(
            10, 60, generator=gen
        )
    elif kind == "zeros":
        x[torch.rand(rows, cols, generator=gen) < 0.3] = 0
        x[rows // 2] = 0
        x[:, cols // 3] = 0
    elif kind == "tiny":
        x = x * 1e-3
    elif kind == "huge":
        x = x * 300
    return x.to(dtype)


def bnb_quant(x, threshold):
    # bitsandbytes zeroes the outliers of its argument in place and restores them: hand it a copy.
    return bnb_F.int8_vectorwise_quant(x.clone(), threshold=threshold)


def shapes(seed, n):
    gen = torch.Generator().manual_seed(seed)
    return [
        (int(torch.randint(1, 300, (1,), generator=gen)), int(torch.randint(1, 700, (1,), generator=gen)))
        for _ in range(n)
    ]


@pytest.mark.parametrize("kind", DISTRIBUTIONS)
@pytest.mark.parametrize("threshold", [0.0, 6.0, 1.5, 0.1])
def test_vectorwise_quantize_equals_bitsandbytes(kind, threshold):
    for seed, (rows, cols) in enumerate(shapes(hash((kind, threshold)) % 1000, 4)):
        for dtype in (torch.float16, torch.float32, torch.bfloat16):
            x = activations(rows, cols, seed=seed, kind=kind, dtype=dtype)
            ours = vectorwise_quantize(x, threshold)
            codes, absmax, cols_bnb = bnb_quant(x, threshold)
            assert torch.equal(ours.codes, codes), (kind, threshold, rows, cols, dtype)
            assert torch.equal(ours.absmax, absmax), (kind, threshold, rows, cols, dtype)
            if threshold == 0:
                assert ours.outlier_cols is None and cols_bnb is None
            else:
                assert torch.equal(ours.outlier_cols, cols_bnb), (kind, threshold, rows, cols, dtype)


def test_vectorwise_quantize_hand_example():
    x = torch.tensor([[1.0, -2.0, 0.5, 8.0], [0.25, 0.5, -1.0, 0.0]])
    q = vectorwise_quantize(x)
    assert q.absmax.tolist() == [8.0, 1.0]
    assert q.codes.tolist() == [[16, -32, 8, 127], [32, 64, -127, 0]]
    q6 = vectorwise_quantize(x, 6.0)  # 8.0 is an outlier: column 3 leaves, row 0's scale becomes 2
    assert q6.outlier_cols.tolist() == [3]
    assert q6.absmax.tolist() == [2.0, 1.0]
    assert q6.codes.tolist() == [[64, -127, 32, 0], [32, 64, -127, 0]]


def test_vectorwise_round_trip_error_is_half_a_step_per_row():
    x = activations(64, 256, seed=3, kind="heavy", dtype=torch.float32)
    q = vectorwise_quantize(x)
    err = (vectorwise_dequantize(q.codes, q.absmax) - x).abs()
    step = q.absmax / 127
    assert (err <= step[:, None] * 0.5 * (1 + 1e-5)).all()
    assert q.codes.abs().max() == 127 and q.codes.min() >= -127


def test_vectorwise_quantize_flattens_leading_dims_and_keeps_input():
    x = activations(24, 40, seed=1, kind="outlier_cols", dtype=torch.float32).reshape(2, 12, 40)
    before = x.clone()
    q3 = vectorwise_quantize(x, 6.0)
    q2 = vectorwise_quantize(x.reshape(24, 40), 6.0)
    assert torch.equal(x, before)
    assert torch.equal(q3.codes, q2.codes) and torch.equal(q3.absmax, q2.absmax)
    assert q3.codes.shape == (24, 40)


def test_vectorwise_dequantize_equals_bitsandbytes():
    for seed, (rows, cols) in enumerate(shapes(7, 5)):
        q = vectorwise_quantize(activations(rows, cols, seed=seed, kind="heavy"))
        assert torch.equal(vectorwise_dequantize(q.codes, q.absmax), bnb_F.int8_vectorwise_dequant(q.codes, q.absmax))


def test_outlier_columns_are_the_columns_bitsandbytes_decomposes():
    x = activations(50, 300, seed=5, kind="outlier_cols")
    assert torch.equal(outlier_columns(x, 6.0), bnb_quant(x, 6.0)[2])
    assert outlier_columns(x, 0.0).numel() == 0
    assert outlier_columns(x, 1e4).numel() == 0


def random_codes(m, k, *, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)


@pytest.mark.parametrize("k", [1, 7, 576, 1024, 1025, 1536, 4096, 5000])
def test_int8_matmul_is_exact_and_equals_bitsandbytes(k):
    a, b = random_codes(33, k, seed=k), random_codes(17, k, seed=k + 1)
    exact = (a.long() @ b.long().T).to(torch.int32)
    got = int8_matmul(a, b)
    assert got.dtype == torch.int32
    assert torch.equal(got, exact)
    if k > 1:  # bitsandbytes' CPU path (torch._int_mm on AVX-512) returns garbage for k == 1; ours stays exact
        assert torch.equal(got, bnb_F.int8_linear_matmul(a, b))


def test_int8_matmul_float_path_is_exact(monkeypatch):
    monkeypatch.setattr(llm_int8, "_int_mm_fits", lambda a, b: False)
    for k in (1, 1024, 1025, 3000):
        a, b = random_codes(9, k, seed=k), random_codes(5, k, seed=k + 7)
        assert torch.equal(int8_matmul(a, b), (a.long() @ b.long().T).to(torch.int32))
    a = torch.full((3, 3000), -128, dtype=torch.int8)
    assert int8_matmul(a, a).unique().tolist() == [3000 * 128 * 128]


def test_int8_matmul_worst_case_sums_are_exact():
    # All -128 * -128: the largest sums an int8 product can reach, over more columns than one float32 slice.
    a = torch.full((3, 3000), -128, dtype=torch.int8)
    assert int8_matmul(a, a).unique().tolist() == [3000 * 128 * 128]


def test_dequantize_matmul_equals_bitsandbytes():
    for seed, (m, n) in enumerate(shapes(11, 5)):
        k = 64 + seed
        xq = vectorwise_quantize(activations(m, k, seed=seed, kind="heavy"))
        wq = vectorwise_quantize(activations(n, k, seed=seed + 50))
        acc = int8_matmul(xq.codes, wq.codes)
        bias = torch.randn(n)
        ours = dequantize_matmul(acc, xq.absmax, wq.absmax, bias)
        assert torch.equal(
            ours, bnb_ops.int8_mm_dequant.default(acc, xq.absmax, wq.absmax, dtype=torch.float32, bias=bias)
        )
        assert torch.equal(ours.half(), bnb_F.int8_mm_dequant(acc, xq.absmax, wq.absmax, bias=bias))
        no_bias = dequantize_matmul(acc, xq.absmax, wq.absmax, dtype=torch.float16)
        assert torch.equal(no_bias, bnb_F.int8_mm_dequant(acc, xq.absmax, wq.absmax))


@pytest.mark.parametrize("kind", ["normal", "outlier_cols", "heavy", "zeros"])
@pytest.mark.parametrize("x_dtype", [torch.float16, torch.float32])
def test_int8_linear_equals_bitsandbytes_mixed_scaled_mm(kind, x_dtype):
    for seed, (tokens, d_in) in enumerate(shapes(hash(kind) % 1000 + 3, 3)):
        d_out = 8 + 13 * seed
        x = activations(tokens, d_in, seed=seed, kind=kind, dtype=torch.float32).to(x_dtype)
        W = activations(d_out, d_in, seed=seed + 100, dtype=torch.float32) * 0.05
        bias = torch.randn(d_out).to(x_dtype)
        wq = vectorwise_quantize(W.half())
        ours = int8_linear(x, wq, bias, 6.0)
        # bitsandbytes' MatMul8bitLt forward, by its functional ops: quantize the fp16 input, then the mixed matmul.
        CA, SCA, cols = bnb_F.int8_vectorwise_quant(x.half(), threshold=6.0)
        theirs, _ = bnb_ops.int8_mixed_scaled_mm(x, CA, wq.codes, SCA, wq.absmax, cols, bias)
        assert ours.dtype == x_dtype
        assert torch.equal(ours, theirs), (kind, tokens, d_in, x_dtype)
        plain = int8_linear(x, wq, bias, 0.0)
        theirs0 = bnb_ops.int8_scaled_mm.default(
            *bnb_F.int8_vectorwise_quant(x.half())[:1],
            wq.codes,
            bnb_F.int8_vectorwise_quant(x.half())[1],
            wq.absmax,
            bias=bias,
            dtype=x_dtype,
        )
        assert torch.equal(plain, theirs0)


def test_decomposition_is_close_to_float_and_beats_plain_int8_on_outliers():
    x = activations(128, 512, seed=2, kind="outlier_cols", dtype=torch.float32)
    W = activations(256, 512, seed=9, dtype=torch.float32) * 0.05
    wq = vectorwise_quantize(W.half())
    W_hat = vectorwise_dequantize(wq.codes, wq.absmax)
    exact = x.double() @ W_hat.double().T  # the weight error is common to both; compare the activation part
    err_mixed = ((int8_linear(x, wq, None, 6.0).double() - exact).norm() / exact.norm()).item()
    err_plain = ((int8_linear(x, wq, None, 0.0).double() - exact).norm() / exact.norm()).item()
    assert err_mixed < 5e-3
    assert err_mixed < err_plain / 4
    # With every column an outlier the product is float (the weight is still the int8 one).
    all_float = int8_linear(x, wq, None, 1e-6, quant_dtype=None)
    torch.testing.assert_close(all_float.double(), exact, rtol=1e-5, atol=1e-5)


def test_int8_linear_handles_leading_dims():
    x = activations(30, 64, seed=4, kind="outlier_cols", dtype=torch.float32)
    wq = vectorwise_quantize(torch.randn(16, 64).half())
    assert torch.equal(int8_linear(x.reshape(3, 10, 64), wq).reshape(30, 16), int8_linear(x, wq))


def test_int8linear_from_float_matches_the_functional_ops():
    linear = nn.Linear(96, 40)
    layer = Int8Linear.from_float(linear)
    assert layer.codes.dtype == torch.int8 and layer.codes.shape == (40, 96) and layer.threshold == 6.0
    q = vectorwise_quantize(linear.weight.detach().half())
    assert torch.equal(layer.codes, q.codes) and torch.equal(layer.absmax, q.absmax)
    x = activations(20, 96, seed=1, kind="outlier_cols", dtype=torch.float32)
    assert torch.equal(layer(x), int8_linear(x, q, linear.bias.detach(), 6.0))
    with torch.no_grad():
        ref = linear(x)
    assert ((layer(x) - ref).norm() / ref.norm()).item() < 0.01
    assert "threshold=6.0" in repr(layer)
    assert layer.dequantized_weight().shape == (40, 96)


def test_quantize_model_int8_swaps_every_linear_but_the_head():
    for make in (tiny_llama, tiny_opt):
        model = make()
        ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref = model(ids).logits
        n_linears = len(surgery.find_linears(model))
        quantize_model_int8(model)
        swapped = [m for m in model.modules() if isinstance(m, Int8Linear)]
        assert len(swapped) == n_linears and not surgery.find_linears(model)
        with torch.no_grad():
            got = model(ids).logits
        assert ((got - ref).norm() / ref.norm()).item() < 0.02


def planted_llama():
    """A tiny Llama whose norms blow up hidden dimension 3 (and 5, in block 0 only): an outlier feature."""
    model = tiny_llama()
    with torch.no_grad():
        for i, block in enumerate(surgery.decoder_blocks(model)):
            for norm in (block.input_layernorm, block.post_attention_layernorm):
                norm.weight[3] = 40.0
                if i == 0:
                    norm.weight[5] = 40.0
    return model


def test_outlier_stats_finds_the_planted_feature():
    model = planted_llama()
    batches = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1)).split(2)
    stats = outlier_stats(model, batches, progress=False)
    # Per block: the attention input (q, k, v), the attention output (o), the FFN input (gate, up); the FFN
    # contraction (down) is not a hidden-width input.
    assert [len(names) for names in stats.layers] == [3, 1, 2] * 2
    assert stats.layers[0] == (
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.k_proj",
        "model.layers.0.self_attn.v_proj",
    )
    assert stats.layers[2] == ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj")
    assert stats.n_tokens == 128 and stats.max_abs.shape == (6, 32) and stats.token_share.shape == (6, 32)
    # Dimension 5 reaches 6 in 2 of 6 hidden states (33% >= 25%), dimension 3 in 4 of 6.
    assert stats.layer_share()[3].item() == pytest.approx(4 / 6)
    assert stats.layer_share()[5].item() == pytest.approx(2 / 6)
    assert stats.outlier_features().tolist() == [3, 5]
    assert stats.outlier_features(min_layer_share=0.5).tolist() == [3]
    per_layer = stats.columns_per_layer()
    assert per_layer[0] >= 2 and per_layer[3] >= 1
    # The token shares agree with a direct count on one hidden state.
    x = []
    handle = surgery.get_module(model, "model.layers.1.self_attn.q_proj").register_forward_pre_hook(
        lambda m, a: x.append(a[0].reshape(-1, 32))
    )
    with torch.no_grad():
        for b in batches:
            model(b)
    handle.remove()
    direct = (torch.cat(x).abs() >= 6).float().mean(0)
    torch.testing.assert_close(stats.token_share[3], direct)
    assert not any(h for m in model.modules() for h in m._forward_pre_hooks.values())


def test_plot_outliers_returns_a_figure():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    stats = outlier_stats(planted_llama(), [torch.randint(0, VOCAB, (2, 16))], progress=False)
    fig = llm_int8.plot_outliers(stats, top=4)
    assert len(fig.axes) == 3


def test_errors_say_what_is_wrong():
    with pytest.raises(TypeError, match="float tensor"):
        vectorwise_quantize(torch.ones(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="NaN"):
        vectorwise_quantize(torch.tensor([[1.0, math.nan]]))
    for threshold in (0.0, 6.0):
        for bad in (math.nan, math.inf, -math.inf):
            with pytest.raises(ValueError, match="NaN or infinite"):
                vectorwise_quantize(torch.tensor([[1.0, 2.0], [bad, 0.5]]), threshold)
    with pytest.raises(ValueError, match="NaN or infinite"):
        outlier_columns(torch.tensor([[1.0, math.nan]]))
    with pytest.raises(ValueError, match="NaN or infinite"):
        int8_linear(torch.tensor([[1.0, math.inf]]), vectorwise_quantize(torch.randn(3, 2)))
    with pytest.raises(ValueError, match=">= 0"):
        vectorwise_quantize(torch.ones(2, 3), -1.0)
    with pytest.raises(TypeError, match="threshold must be a number"):
        vectorwise_quantize(torch.ones(2, 3), "6")
    with pytest.raises(ValueError, match="non-empty"):
        vectorwise_quantize(torch.ones(2, 0))
    with pytest.raises(TypeError, match="2-D int8"):
        int8_matmul(torch.ones(2, 3), torch.ones(2, 3, dtype=torch.int8))
    with pytest.raises(ValueError, match="inner dimensions"):
        int8_matmul(torch.ones(2, 3, dtype=torch.int8), torch.ones(2, 4, dtype=torch.int8))
    with pytest.raises(TypeError, match="int32"):
        dequantize_matmul(torch.ones(2, 2), torch.ones(2), torch.ones(2))
    with pytest.raises(ValueError, match="scales do not fit"):
        dequantize_matmul(torch.ones(2, 2, dtype=torch.int32), torch.ones(3), torch.ones(2))
    with pytest.raises(TypeError, match="int8"):
        vectorwise_dequantize(torch.ones(2, 2), torch.ones(2))
    wq = vectorwise_quantize(torch.randn(4, 8))
    with pytest.raises(ValueError, match="features"):
        int8_linear(torch.randn(2, 9), wq)
    with pytest.raises(TypeError, match="Int8Rows"):
        int8_linear(torch.randn(2, 8), torch.randn(4, 8))
    with pytest.raises(TypeError, match="nn.Linear"):
        Int8Linear.from_float(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="threshold must be > 0"):
        outlier_stats(tiny_llama(), [torch.zeros(1, 4, dtype=torch.long)], threshold=0.0)
    with pytest.raises(ValueError, match="no batches"):
        outlier_stats(tiny_llama(), [], progress=False)
    assert isinstance(wq, Int8Rows)


@pytest.mark.slow
def test_course_model_int8_perplexity_is_close_to_float(course_model):
    from quantcourse import data
    from quantcourse.evaluate import perplexity
    from quantcourse.models import load_model

    model, tokenizer = load_model()
    tokens = data.eval_tokens(tokenizer)
    ref = perplexity(model, tokens, seq_len=128, n_windows=2)
    quantize_model_int8(model)
    got = perplexity(model, tokens, seq_len=128, n_windows=2)
    assert abs(got - ref) / ref < 0.05


def test_hidden_tests_can_forbid_bitsandbytes_ops():
    from quantcourse.grading.hidden import ShortcutUsed, forbid

    x = torch.randn(4, 8).half()
    with forbid("torch.ops.bitsandbytes.int8_vectorwise_quant", "bitsandbytes.functional.int8_vectorwise_quant"):
        with pytest.raises(ShortcutUsed, match="write it yourself"):
            torch.ops.bitsandbytes.int8_vectorwise_quant(x, 0.0)
        with pytest.raises(AssertionError, match="write it yourself"):
            bnb_F.int8_vectorwise_quant(x)
    assert torch.equal(bnb_F.int8_vectorwise_quant(x)[0], vectorwise_quantize(x).codes)
    assert torch.equal(torch.ops.bitsandbytes.int8_vectorwise_quant(x, 0.0)[0], vectorwise_quantize(x).codes)
