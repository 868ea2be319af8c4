"""quantcourse.evaluate: perplexity against a direct computation, SQNR, relative and layer errors."""

import hashlib
import math

import pytest
import torch
from tiny_models import VOCAB, one_thread, tiny_llama, tiny_opt  # noqa: F401  (one_thread: autouse fixture)

from quantcourse import data, evaluate


def _direct_perplexity(model, tokens, seq_len, n_windows):
    """exp(mean NLL), one window at a time, from log_softmax and gather."""
    nlls = []
    for i in range(n_windows):
        window = tokens[i * seq_len : (i + 1) * seq_len]
        with torch.no_grad():
            logp = torch.log_softmax(model(window[None]).logits[0].double(), dim=-1)  # [seq_len, vocab]
        nlls.append(-logp[:-1].gather(1, window[1:, None]).squeeze(1))
    return math.exp(torch.cat(nlls).mean().item())


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


def _tokens(n, seed=0):
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def test_perplexity_equals_direct_computation(llama):
    tokens = _tokens(5 * 16 + 7)
    ppl = evaluate.perplexity(llama, tokens, seq_len=16, n_windows=5, batch_size=2)
    assert ppl == pytest.approx(_direct_perplexity(llama, tokens, 16, 5), rel=1e-5)
    # a random model is about as good as a uniform guess over the vocabulary
    assert 0.5 * VOCAB < ppl < 2 * VOCAB


def test_perplexity_all_windows_and_batch_size_invariance(llama):
    tokens = _tokens(4 * 16 + 3)
    all_windows = evaluate.perplexity(llama, tokens, seq_len=16, n_windows=None, batch_size=3)
    assert all_windows == pytest.approx(
        evaluate.perplexity(llama, tokens, seq_len=16, n_windows=4, batch_size=1), rel=1e-6
    )
    assert all_windows == pytest.approx(_direct_perplexity(llama, tokens, 16, 4), rel=1e-5)


def test_window_nll_holds_each_window_and_perplexity_is_their_mean(llama):
    tokens = _tokens(3 * 16)
    nll = evaluate.window_nll(llama, tokens, seq_len=16, n_windows=3, batch_size=2)
    assert nll.shape == (3,) and nll.dtype == torch.float64
    for i in range(3):  # each entry is that window's own perplexity, in log space
        alone = evaluate.perplexity(llama, tokens[i * 16 : (i + 1) * 16], seq_len=16, n_windows=1)
        assert math.exp(nll[i].item()) == pytest.approx(alone, rel=1e-5)
    assert math.exp(nll.mean().item()) == pytest.approx(_direct_perplexity(llama, tokens, 16, 3), rel=1e-5)


def test_perplexity_change_is_the_paired_ratio_with_its_standard_error():
    base = torch.tensor([2.0, 2.5, 3.0, 2.2], dtype=torch.float64)
    change, noise = evaluate.perplexity_change(base, base + torch.tensor([0.1, 0.3, 0.1, 0.3]))
    assert change == pytest.approx(math.exp(0.2) - 1)
    # standard error of the differences (std 0.11547 / sqrt 4), scaled by exp(0.2)
    assert noise == pytest.approx(math.exp(0.2) * 0.2 / math.sqrt(3) / 2)
    assert evaluate.perplexity_change(base, base) == (0.0, 0.0)
    with pytest.raises(ValueError, match="same windows"):
        evaluate.perplexity_change(base, base[:3])


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: a uniform distribution
    assert evaluate.perplexity(model, _tokens(64), seq_len=16, n_windows=4) == pytest.approx(VOCAB, rel=1e-6)


def test_perplexity_uses_eval_mode_and_restores_it():
    model = tiny_opt()  # OPT has dropout
    model.config.dropout = 0.5
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5
    model.train()
    tokens = _tokens(64)
    a = evaluate.perplexity(model, tokens, seq_len=16, n_windows=4)
    b = evaluate.perplexity(model, tokens, seq_len=16, n_windows=4)
    assert a == b and model.training


def test_perplexity_too_many_windows(llama):
    with pytest.raises(ValueError, match="100 tokens hold 6 windows of 16; asked for 7"):
        evaluate.perplexity(llama, _tokens(100), seq_len=16, n_windows=7)


def test_perplexity_rejects_2d_tokens(llama):
    with pytest.raises(ValueError, match="tokens must be a 1-D integer tensor"):
        evaluate.perplexity(llama, _tokens(64).reshape(4, 16), seq_len=16)


def test_perplexity_rejects_short_seq_len(llama):
    with pytest.raises(ValueError, match="seq_len must be an int >= 2"):
        evaluate.perplexity(llama, _tokens(64), seq_len=1)


def test_perplexity_rejects_bad_batch_size(llama):
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        evaluate.perplexity(llama, _tokens(64), seq_len=16, batch_size=0)


def test_sqnr_and_relative_error_by_hand():
    x = torch.ones(100)
    x_hat = x + 0.1  # noise power 1 % of the signal
    assert evaluate.sqnr_db(x, x_hat) == pytest.approx(20.0)
    assert evaluate.relative_error(x, x_hat) == pytest.approx(0.1)
    assert evaluate.sqnr_db(x, x) == math.inf
    assert evaluate.relative_error(x, x) == 0


@pytest.mark.parametrize("n_bits", [4, 6, 8])
def test_sqnr_of_uniform_data_matches_theory(n_bits):
    # x uniform on [-1, 1] and a grid of L levels spanning it: step 2/(L-1), noise step^2/12,
    # signal 1/3, so SQNR = 20 log10(L - 1): about 6.02 dB per bit.
    # Asymmetric uses L = 2^b levels, symmetric drops one (L = 2^b - 1).
    from quantcourse import PerTensor, fake_quantize

    x = torch.rand(200_000, generator=torch.Generator().manual_seed(0)) * 2 - 1
    asym = evaluate.sqnr_db(x, fake_quantize(x, n_bits, symmetric=False, granularity=PerTensor()))
    sym = evaluate.sqnr_db(x, fake_quantize(x, n_bits, symmetric=True, granularity=PerTensor()))
    assert asym == pytest.approx(20 * math.log10(2**n_bits - 1), abs=0.1)
    assert sym == pytest.approx(20 * math.log10(2**n_bits - 2), abs=0.1)


def test_layer_output_error():
    W = torch.randn(16, 32)
    X = torch.randn(2, 10, 32)
    assert evaluate.layer_output_error(W, W, X) == 0
    assert evaluate.layer_output_error(W, 1.1 * W, X) == pytest.approx(0.1)


def test_shape_mismatch():
    with pytest.raises(ValueError, match=r"shapes differ: \(3,\) vs \(4,\)"):
        evaluate.sqnr_db(torch.zeros(3), torch.zeros(4))


def test_layer_output_error_feature_mismatch():
    with pytest.raises(ValueError, match="X has 8 features but W expects 32"):
        evaluate.layer_output_error(torch.randn(16, 32), torch.randn(16, 32), torch.randn(4, 8))


@pytest.mark.slow
def test_course_model_perplexity(course_model):
    from quantcourse import data
    from quantcourse.models import load_model

    model, tokenizer = load_model()
    ppl = evaluate.perplexity(model, data.eval_tokens(tokenizer), seq_len=512, n_windows=8)
    # the shipped snapshot of CPython 3.11.7's pydoc text, paragraphs deduplicated (see quantcourse.data)
    assert hashlib.sha256(data.course_text().encode()).hexdigest()[:16] == "55f2a26a44b7cc28"
    assert ppl == pytest.approx(13.34, abs=0.05)


def _items(n_windows=3, seq_len=16, n_items=20, n_choices=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    windows = torch.randint(0, VOCAB, (n_windows, seq_len), generator=gen)
    flat = torch.randperm(n_windows * (seq_len - 1), generator=gen)[:n_items]  # distinct (window, position)
    window, position = flat // (seq_len - 1), flat % (seq_len - 1)
    choices = torch.stack([torch.randperm(VOCAB, generator=gen)[:n_choices] for _ in range(n_items)])
    return data.WordChoiceItems(windows, window, position, choices)


def test_choice_accuracy_equals_an_item_by_item_loop(llama):
    items = _items()
    result = evaluate.choice_accuracy(llama, items, batch_size=2)
    expected = []
    for w, p, c in zip(items.window, items.position, items.choices, strict=True):
        with torch.no_grad():
            logits = llama(items.windows[w][None]).logits[0, p]
        expected.append(bool(logits[c[0]] > logits[c[1:]].max()))
    assert result.correct.tolist() == expected
    assert result.accuracy == pytest.approx(sum(expected) / len(expected))
    per_window = [
        (sum(e for e, w in zip(expected, items.window.tolist(), strict=True) if w == k), (items.window == k).sum())
        for k in range(3)
    ]
    assert result.standard_error > 0 and math.isfinite(result.standard_error)
    assert sum(c for c, _ in per_window) == sum(expected)
    assert evaluate.choice_accuracy(llama, items, batch_size=3).correct.tolist() == expected  # batch invariant


def test_choice_accuracy_of_a_model_that_knows_the_answer():
    items = _items(n_items=30)

    class Oracle(torch.nn.Module):  # puts the highest logit on the right word of every item
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, ids, use_cache=False):
            logits = torch.zeros(*ids.shape, VOCAB)
            for w, p, c in zip(items.window, items.position, items.choices, strict=True):
                if ids.shape[0] > w and torch.equal(ids[w], items.windows[w]):
                    logits[w, p, c[0]] = 1.0
            return type("Out", (), {"logits": logits})()

    result = evaluate.choice_accuracy(Oracle(), items, batch_size=len(items.windows))
    assert result.accuracy == 1.0 and result.standard_error == 0.0
    uniform = evaluate.choice_accuracy(tiny_llama().eval(), items)
    difference, se = result.paired_difference(uniform)
    assert difference == pytest.approx(1.0 - uniform.accuracy) and se >= 0
    assert result.paired_difference(result) == (0.0, 0.0)


def test_choice_accuracy_refuses_mismatched_or_empty_items(llama):
    items = _items()
    a = evaluate.choice_accuracy(llama, items)
    b = evaluate.choice_accuracy(llama, _items(seed=1))
    with pytest.raises(ValueError, match="different items"):
        a.paired_difference(b)
    empty = data.WordChoiceItems(items.windows, items.window[:0], items.position[:0], items.choices[:0])
    with pytest.raises(ValueError, match="holds no item"):
        evaluate.choice_accuracy(llama, empty)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        evaluate.choice_accuracy(llama, items, batch_size=0)
