"""quantcourse.data: a deterministic, disjoint ~80/20 split of the course text; seeded calibration windows."""

import pytest
import torch

from quantcourse import data


class ByteTokenizer:
    """One token per UTF-8 byte: fast, deterministic, enough to test the plumbing."""

    name_or_path = "bytes"

    def __len__(self):
        return 256

    def __call__(self, text, return_tensors="pt", add_special_tokens=False):
        ids = torch.tensor(list(text.encode("utf-8")), dtype=torch.int64)[None]
        return type("Encoding", (), {"input_ids": ids})()


TOK = ByteTokenizer()


def test_split_is_about_80_20_and_covers_the_text():
    calibration, evaluation = data.load_text("calibration"), data.load_text("evaluation")
    share = len(evaluation) / (len(calibration) + len(evaluation))
    assert 0.18 < share < 0.22
    chunks = data._chunks(data.course_text())
    assert sum(len(c) for c in chunks) + 2 * (len(chunks) - 1) == len(data.course_text())


def test_split_is_disjoint():
    chunks = data._chunks(data.course_text())
    held_out = chunks[data.EVAL_EVERY - 1 :: data.EVAL_EVERY]
    calibration = data.load_text("calibration")
    assert data.load_text("evaluation") == "\n\n".join(held_out)
    # no held-out chunk appears in the calibration text
    assert not any(chunk in calibration for chunk in held_out if len(chunk) > 200)


def test_split_is_deterministic():
    text = data.load_text("evaluation")
    for cached in (data.load_text, data.course_text, data._pydoc_topics):
        cached.cache_clear()
    assert data.load_text("evaluation") == text


def test_unknown_split():
    with pytest.raises(ValueError, match="split must be 'calibration' or 'evaluation', got 'test'"):
        data.load_text("test")


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'c4'"):
        data.load_text("calibration", dataset="c4")


def test_calibration_samples_are_seeded_windows_of_the_calibration_text():
    a = data.calibration_samples(TOK, 8, 64, seed=0)
    assert a.shape == (8, 64) and a.dtype == torch.int64
    assert torch.equal(a, data.calibration_samples(TOK, 8, 64, seed=0))
    assert not torch.equal(a, data.calibration_samples(TOK, 8, 64, seed=1))
    stream = data.token_stream(TOK, "calibration")
    for row in a:  # each sample is a contiguous window of the calibration stream
        text = bytes(row.tolist())
        assert text in bytes(stream.tolist())


def test_eval_tokens_is_the_held_out_text():
    tokens = data.eval_tokens(TOK)
    assert bytes(tokens.tolist()).decode("utf-8") == data.load_text("evaluation")


def test_token_stream_returns_independent_copies():
    first = data.eval_tokens(TOK)
    first.zero_()
    assert data.eval_tokens(TOK).any()


def test_calibration_samples_rejects_bad_sizes():
    with pytest.raises(ValueError, match="n_samples must be a positive int, got 0"):
        data.calibration_samples(TOK, 0, 64)


def test_calibration_samples_rejects_too_long_windows():
    with pytest.raises(ValueError, match="not more than seq_len=10000000"):
        data.calibration_samples(TOK, 1, 10_000_000)


@pytest.mark.slow
def test_course_tokenizer_split_sizes(course_model):
    _, tokenizer = course_model
    n_eval = len(data.eval_tokens(tokenizer))
    n_cal = len(data.token_stream(tokenizer, "calibration"))
    assert n_eval >= 8 * 512  # the book's perplexity needs 8 windows of 512
    assert 0.15 < n_eval / (n_eval + n_cal) < 0.25
    samples = data.calibration_samples(tokenizer, 4, 512, seed=0)
    assert samples.shape == (4, 512) and int(samples.max()) < len(tokenizer)


class WordTokenizer:
    """Words with their leading space, single spaces and punctuation as tokens (a BPE's whole words, roughly)."""

    name_or_path = "words"
    pattern = __import__("re").compile(r" ?[A-Za-z]+| ?[0-9]+|\s|[^A-Za-z0-9\s]")

    def __init__(self):
        self.pieces = sorted(set(self.pattern.findall(data.course_text())))
        self.index = {p: i for i, p in enumerate(self.pieces)}

    def __len__(self):
        return len(self.pieces)

    def __call__(self, text, return_tensors="pt", add_special_tokens=False):
        ids = torch.tensor([self.index[p] for p in self.pattern.findall(text)], dtype=torch.int64)[None]
        return type("Encoding", (), {"input_ids": ids})()

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids)


@pytest.fixture(scope="module")
def words():
    return WordTokenizer()


def test_word_choice_items_ask_for_the_next_whole_word(words):
    items = data.word_choice_items(words, n_windows=4, seq_len=128, n_choices=4, min_context=16, seed=0)
    assert len(items) > 50 and items.windows.shape == (4, 128) and items.choices.shape == (len(items), 4)
    stream = data.eval_tokens(words)
    assert torch.equal(items.windows.flatten(), stream[: 4 * 128])
    for w, p, choices in zip(items.window.tolist(), items.position.tolist(), items.choices.tolist(), strict=True):
        assert 16 <= p < 127
        answer, after = stream[w * 128 + p + 1], stream[w * 128 + p + 2]
        assert choices[0] == answer  # the right word comes next in the text
        assert len(set(choices)) == 4  # distinct distractors, never the answer itself
        for c in choices:
            text = words.decode([c])
            assert text[0] == " " and text[1:].isalpha() and len(text) >= 4, text
        assert not words.decode([after])[:1].isalpha()  # the word is not continued by the next token
    again = data.word_choice_items(words, n_windows=4, seq_len=128, n_choices=4, min_context=16, seed=0)
    assert torch.equal(again.choices, items.choices)
    other = data.word_choice_items(words, n_windows=4, seq_len=128, n_choices=4, min_context=16, seed=1)
    assert torch.equal(other.choices[:, 0], items.choices[:, 0]) and not torch.equal(other.choices, items.choices)


def test_word_choice_items_reject_bad_sizes(words):
    with pytest.raises(ValueError, match="n_choices must be an int >= 2"):
        data.word_choice_items(words, n_choices=1)
    with pytest.raises(ValueError, match="min_context must be in"):
        data.word_choice_items(words, seq_len=32, min_context=40)
    with pytest.raises(ValueError, match="fewer than"):
        data.word_choice_items(words, n_windows=10**6, seq_len=128)
