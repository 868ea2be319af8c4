"""The course text: calibration and held-out evaluation tokens.

Offline (the default) the text is Python's own documentation, ``pydoc_data.topics``. It ships
with every CPython, but differs between releases (3.11.2 and 3.11.7 already differ), so the
package carries a snapshot of it (CPython 3.11.7's, ``resources/pydoc_topics.json.xz``, 90 kB)
and every reader, on any Python, gets the same ~91k tokens and the same numbers. Its topics are joined in
name order, each paragraph kept once (many
topics repeat whole sections of others, e.g. the ``def`` grammar appears under several topics,
and without this a fifth of the held-out text would also be in the calibration text), and cut
at paragraph breaks into chunks of about 4,000 characters; every fifth chunk is held out for
evaluation. Both parts then span the whole documentation, hold 80/20 of the text (a few topics
are huge, so splitting by topic would not), share no paragraph, and the split never changes.

Online, ``dataset="wikitext2"`` gives WikiText-2 (train for calibration, test for evaluation)
through the ``datasets`` package, as the papers use.
"""

from __future__ import annotations

import json
import lzma
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Literal

import torch

__all__ = [
    "DATASETS",
    "course_text",
    "load_text",
    "token_stream",
    "calibration_samples",
    "eval_tokens",
    "WordChoiceItems",
    "word_choice_items",
]

Split = Literal["calibration", "evaluation"]
DATASETS = ("pydoc", "wikitext2")
EVAL_EVERY = 5  # every 5th chunk (20 %) is held out
CHUNK_CHARS = 4000


PYDOC_SNAPSHOT = "pydoc_topics.json.xz"


@cache
def _pydoc_topics() -> tuple[tuple[str, str], ...]:
    # The snapshot was written from ``pydoc_data.topics.topics`` (a dict of topic name -> text).
    snapshot = resources.files("quantcourse.resources").joinpath(PYDOC_SNAPSHOT)
    with lzma.open(snapshot.open("rb"), "rt", encoding="utf-8") as f:
        topics = json.load(f)["topics"]
    return tuple(sorted(topics.items()))


@cache
def course_text() -> str:
    """All of ``pydoc_data.topics``, topics in name order, each paragraph once, separated by blank lines."""
    paragraphs = (p.strip("\n") for _, body in _pydoc_topics() for p in body.split("\n\n"))
    return "\n\n".join(dict.fromkeys(p for p in paragraphs if p.strip()))  # dict keeps first occurrences in order


def _chunks(text: str) -> list[str]:
    chunks, current = [], []
    size = 0
    for paragraph in text.split("\n\n"):
        current.append(paragraph)
        size += len(paragraph)
        if size >= CHUNK_CHARS:
            chunks.append("\n\n".join(current))
            current, size = [], 0
    if current:
        chunks.append("\n\n".join(current))
    return chunks


@cache
def load_text(split: Split = "calibration", dataset: str = "pydoc") -> str:
    """The raw text of one split.

    Args:
        split: ``"calibration"`` or ``"evaluation"`` (held out, never seen during calibration).
        dataset: ``"pydoc"`` (offline default) or ``"wikitext2"`` (needs the network and ``datasets``).
    """
    if split not in ("calibration", "evaluation"):
        raise ValueError(f"split must be 'calibration' or 'evaluation', got {split!r}")
    if dataset == "pydoc":
        held_out = split == "evaluation"
        chunks = _chunks(course_text())
        return "\n\n".join(c for i, c in enumerate(chunks) if (i % EVAL_EVERY == EVAL_EVERY - 1) == held_out)
    if dataset == "wikitext2":
        try:
            from datasets import load_dataset
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                "dataset='wikitext2' needs the 'datasets' package: pip install 'quantcourse[online]'"
            ) from e
        hf_split = "train" if split == "calibration" else "test"
        rows = load_dataset("wikitext", "wikitext-2-raw-v1", split=hf_split)["text"]
        return "\n\n".join(rows)  # as the GPTQ reference code joins it
    raise ValueError(f"unknown dataset {dataset!r}: choose one of {DATASETS}")


def _tokenizer_key(tokenizer) -> str:
    return f"{getattr(tokenizer, 'name_or_path', '')}:{type(tokenizer).__name__}:{len(tokenizer)}"


_TOKEN_CACHE: dict[tuple[str, str, str], torch.Tensor] = {}


def token_stream(tokenizer, split: Split = "calibration", dataset: str = "pydoc") -> torch.Tensor:
    """The whole split tokenized once (cached per process): int64 tensor ``[n_tokens]``.

    Every call returns a fresh copy, so a caller that modifies it cannot corrupt the cache.
    """
    key = (_tokenizer_key(tokenizer), split, dataset)
    if key not in _TOKEN_CACHE:
        text = load_text(split, dataset)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
        _TOKEN_CACHE[key] = ids.long()
    return _TOKEN_CACHE[key].clone()


def calibration_samples(
    tokenizer, n_samples: int = 32, seq_len: int = 512, *, seed: int = 0, dataset: str = "pydoc"
) -> torch.Tensor:
    """Random windows of the calibration split, as the GPTQ reference code draws them.

    Returns:
        int64 tensor ``[n_samples, seq_len]``; the same seed gives the same windows.
    """
    for name, value in (("n_samples", n_samples), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    ids = token_stream(tokenizer, "calibration", dataset)
    if len(ids) <= seq_len:
        raise ValueError(
            f"the calibration text has {len(ids)} tokens, not more than seq_len={seq_len}; use a shorter seq_len"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len, (n_samples,), generator=gen)  # [n_samples]
    return ids[starts[:, None] + torch.arange(seq_len)]  # [n_samples, seq_len]


def eval_tokens(tokenizer, dataset: str = "pydoc") -> torch.Tensor:
    """The held-out split, tokenized: int64 tensor ``[n_tokens]``."""
    return token_stream(tokenizer, "evaluation", dataset)


@dataclass(frozen=True)
class WordChoiceItems:
    """A next-word multiple-choice task built from held-out text (:func:`word_choice_items`).

    Every item asks: after this context, which of ``n_choices`` whole words comes next? The context is
    the window up to and including ``position``; the right word is ``choices[:, 0]``, the others are
    distractors drawn from the same text's words by their frequency, so that chance is ``1 / n_choices``
    and a model cannot win by preferring common words.

    Attributes:
        windows: int64 ``[n_windows, seq_len]`` token ids; one forward pass scores every item of a window.
        window: int64 ``[n_items]``, the window of each item.
        position: int64 ``[n_items]``, the last context position; the answer is token ``position + 1``.
        choices: int64 ``[n_items, n_choices]`` token ids, the right word first.
    """

    windows: torch.Tensor
    window: torch.Tensor
    position: torch.Tensor
    choices: torch.Tensor

    def __len__(self) -> int:
        return len(self.window)


def _whole_words(tokenizer, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two masks over the vocabulary: the token is a whole word (space, 3+ ASCII letters); it starts with a letter."""
    vocab = int(ids.max()) + 1
    word, letter = torch.zeros(vocab, dtype=torch.bool), torch.zeros(vocab, dtype=torch.bool)
    for i in ids.unique().tolist():
        text = tokenizer.decode([i])
        word[i] = text.startswith(" ") and len(text) >= 4 and text[1:].isalpha() and text[1:].isascii()
        letter[i] = text[:1].isalpha()
    return word, letter


def word_choice_items(
    tokenizer,
    *,
    n_windows: int = 8,
    seq_len: int = 256,
    n_choices: int = 4,
    min_context: int = 32,
    seed: int = 0,
    dataset: str = "pydoc",
) -> WordChoiceItems:
    """Next-word multiple-choice items from the held-out split: a small task accuracy beside perplexity.

    An item is every position of the first ``n_windows`` windows (after ``min_context`` tokens of context)
    whose next token is a whole word: it begins with a space, has three or more ASCII letters, and the
    token after it does not continue it with letters. Its distractors are ``n_choices - 1`` other such
    words, drawn without replacement with probability proportional to their count in the split, seeded.

    Returns:
        :class:`WordChoiceItems`; score a model with :func:`quantcourse.evaluate.choice_accuracy`.
    """
    for name, value in (("n_windows", n_windows), ("seq_len", seq_len), ("n_choices", n_choices)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 2 - (name == "n_windows"):
            raise ValueError(f"{name} must be an int >= {2 - (name == 'n_windows')}, got {value!r}")
    if not 0 <= min_context < seq_len - 1:
        raise ValueError(f"min_context must be in [0, seq_len - 1), got {min_context} with seq_len={seq_len}")
    ids = token_stream(tokenizer, "evaluation", dataset)
    if len(ids) < n_windows * seq_len + 1:
        raise ValueError(f"the held-out text has {len(ids)} tokens, fewer than {n_windows} windows of {seq_len} + 1")
    word, letter = _whole_words(tokenizer, ids)
    stream = ids[: n_windows * seq_len + 1]
    nxt, after = stream[1:].reshape(n_windows, seq_len), stream[2:]
    after = torch.cat([after, after[-1:]]).reshape(n_windows, seq_len)  # the token after each answer
    ok = word[nxt] & ~letter[after]
    ok[:, :min_context] = False
    ok[:, -1] = False  # the answer must lie inside the window
    window, position = ok.nonzero(as_tuple=True)
    answers = nxt[window, position]
    counts = torch.bincount(ids[1:][word[ids[1:]] & ~letter[torch.cat([ids[2:], ids[-1:]])]], minlength=len(word))
    pool = counts.nonzero().squeeze(1)
    if len(pool) < n_choices:
        raise ValueError(
            f"the held-out text has only {len(pool)} distinct whole words, fewer than n_choices={n_choices}"
        )
    weights = counts[pool].double().expand(len(answers), -1).clone()
    weights[answers[:, None] == pool[None, :]] = 0  # never the right word as its own distractor
    gen = torch.Generator().manual_seed(seed)
    distractors = pool[torch.multinomial(weights, n_choices - 1, replacement=False, generator=gen)]
    return WordChoiceItems(
        stream[:-1].reshape(n_windows, seq_len), window, position, torch.cat([answers[:, None], distractors], 1)
    )
