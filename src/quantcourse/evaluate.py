"""How good is a quantized model: perplexity, SQNR, relative error, per-layer output error.

Every chapter reports these numbers; chapter 3 introduces them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .progress import progress_bar

if TYPE_CHECKING:
    from .data import WordChoiceItems

__all__ = [
    "perplexity",
    "window_nll",
    "perplexity_change",
    "ChoiceAccuracy",
    "choice_accuracy",
    "sqnr_db",
    "relative_error",
    "layer_output_error",
]


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    *,
    seq_len: int = 512,
    n_windows: int | None = 8,
    batch_size: int = 4,
    progress: bool = False,
) -> float:
    """Perplexity over non-overlapping windows of ``tokens``, as the GPTQ paper measures it.

    Each window of ``seq_len`` tokens is scored independently (no context carried over); the
    result is ``exp`` of the mean next-token negative log-likelihood over all scored tokens.

    Args:
        model: a causal LM returning ``.logits`` ``[batch, seq_len, vocab]``.
        tokens: int64 ``[n_tokens]``, e.g. :func:`quantcourse.data.eval_tokens`.
        seq_len: window length.
        n_windows: how many windows from the start (``None``: all that fit).
        batch_size: windows per forward pass.
        progress: show a tqdm bar.
    """
    nll = window_nll(model, tokens, seq_len=seq_len, n_windows=n_windows, batch_size=batch_size, progress=progress)
    return math.exp(nll.mean().item())  # every window scores seq_len - 1 tokens: the mean of means is the mean


@torch.no_grad()
def window_nll(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    *,
    seq_len: int = 512,
    n_windows: int | None = 8,
    batch_size: int = 4,
    progress: bool = False,
) -> torch.Tensor:
    """Mean next-token negative log-likelihood of each window: float64 ``[n_windows]``.

    The windows of :func:`perplexity` (which is ``exp(window_nll(...).mean())``), kept apart so that
    the spread between windows can say how much of a difference between two models is noise (see
    :func:`perplexity_change`). Arguments as for :func:`perplexity`.
    """
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1 or tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"tokens must be a 1-D integer tensor such as data.eval_tokens(tokenizer), got {_describe(tokens)}"
        )
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2 (a window needs a next token to predict), got {seq_len!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    available = len(tokens) // seq_len
    n = available if n_windows is None else n_windows
    if n < 1 or n > available:
        raise ValueError(f"{len(tokens)} tokens hold {available} windows of {seq_len}; asked for {n_windows}")
    device = next(model.parameters()).device
    windows = tokens[: n * seq_len].reshape(n, seq_len).long()  # [n, seq_len]
    nll = []
    was_training = model.training
    model.eval()  # no dropout while scoring; the mode is restored below
    try:
        for start in progress_bar(range(0, n, batch_size), desc="perplexity", disable=not progress, leave=False):
            batch = windows[start : start + batch_size].to(device)  # [b, seq_len]
            logits = model(batch, use_cache=False).logits.float()  # [b, seq_len, vocab]
            token_nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2), batch[:, 1:], reduction="none"
            )  # [b, seq_len - 1]
            nll.append(token_nll.double().mean(dim=1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(nll)


def perplexity_change(base_nll: torch.Tensor, nll: torch.Tensor) -> tuple[float, float]:
    """How much a model's perplexity differs from a baseline's on the same windows, and the noise in it.

    Args:
        base_nll: float ``[n_windows]`` from :func:`window_nll` of the baseline model.
        nll: float ``[n_windows]`` of the other model, on the same windows.
    Returns:
        ``(change, noise)``: the relative change of perplexity, ``exp(mean(nll - base_nll)) - 1``
        (0.05 = 5 % higher), and one standard error of it from the window-to-window spread of the
        paired differences (0 with a single window). A change within about two standard errors of 0
        is not a measured difference on this text.
    """
    if base_nll.shape != nll.shape or base_nll.dim() != 1:
        raise ValueError(
            f"need two 1-D tensors of per-window NLLs on the same windows, got {_describe(base_nll)} "
            f"and {_describe(nll)}"
        )
    diff = nll.double() - base_nll.double()  # [n_windows]
    mean = diff.mean().item()
    stderr = diff.std().item() / math.sqrt(len(diff)) if len(diff) > 1 else 0.0
    return math.expm1(mean), math.exp(mean) * stderr  # d exp(m) = exp(m) dm


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"shape {tuple(t.shape)} and dtype {t.dtype}"
    return type(t).__name__


def _check_pair(x: torch.Tensor, x_hat: torch.Tensor) -> None:
    if x.shape != x_hat.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(x_hat.shape)}")


def sqnr_db(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(||x||² / ||x - x̂||²)`` in dB (∞ if exact).

    Each extra bit of a uniform quantizer adds about 6.02 dB.
    """
    _check_pair(x, x_hat)
    noise = (x.double() - x_hat.double()).pow(2).sum().item()
    signal = x.double().pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


def relative_error(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """``||x - x̂||_F / ||x||_F``."""
    _check_pair(x, x_hat)
    return ((x.double() - x_hat.double()).norm() / x.double().norm().clamp_min(1e-300)).item()


def layer_output_error(W: torch.Tensor, W_hat: torch.Tensor, X: torch.Tensor) -> float:
    """Relative error of a linear layer's output on real inputs: ``||X Wᵀ - X Ŵᵀ||_F / ||X Wᵀ||_F``.

    Args:
        W, W_hat: ``[out, in]`` original and quantized weights.
        X: ``[tokens, in]`` inputs the layer actually sees.
    """
    _check_pair(W, W_hat)
    if X.shape[-1] != W.shape[1]:
        raise ValueError(f"X has {X.shape[-1]} features but W expects {W.shape[1]}")
    X = X.reshape(-1, X.shape[-1]).double()
    return relative_error(X @ W.double().T, X @ W_hat.double().T)


@dataclass(frozen=True)
class ChoiceAccuracy:
    """The result of :func:`choice_accuracy`.

    Attributes:
        accuracy: the share of items whose right word scores highest among the choices.
        standard_error: of ``accuracy``, from the spread of the per-window accuracies (items of one
            window share their text, so they are not independent draws; this is wider than the binomial
            ``√(p(1-p)/n)``).
        correct: bool ``[n_items]``, per item (compare two models item by item: :meth:`paired_difference`).
        window: int64 ``[n_items]``, each item's window.
    """

    accuracy: float
    standard_error: float
    correct: torch.Tensor
    window: torch.Tensor

    def paired_difference(self, other: ChoiceAccuracy) -> tuple[float, float]:
        """``(accuracy - other.accuracy, its standard error)`` on the same items, from per-window differences."""
        if not torch.equal(self.window, other.window):
            raise ValueError("the two results are on different items: score both models on the same WordChoiceItems")
        return _window_mean_and_se((self.correct.double() - other.correct.double()), self.window)


def _window_mean_and_se(values: torch.Tensor, window: torch.Tensor) -> tuple[float, float]:
    """Mean of ``values [n_items]`` and its standard error over windows (ratio estimator, clustered)."""
    n_windows = int(window.max()) + 1
    totals = torch.zeros(n_windows, dtype=torch.float64).index_add_(0, window, values)
    counts = torch.bincount(window, minlength=n_windows).double()
    mean = float(totals.sum() / counts.sum())
    if n_windows < 2:
        return mean, float("nan")
    residual = totals - mean * counts  # each window's deviation, weighted by its number of items
    se = math.sqrt(float(residual.square().sum()) * n_windows / (n_windows - 1)) / float(counts.sum())
    return mean, se


@torch.no_grad()
def choice_accuracy(model: torch.nn.Module, items: WordChoiceItems, *, batch_size: int = 4) -> ChoiceAccuracy:
    """Accuracy of ``model`` on next-word multiple-choice items (:func:`quantcourse.data.word_choice_items`).

    One forward pass per window of ``items.windows [n_windows, seq_len]`` scores all of that window's
    items: an item is right when the logit of its right word (``items.choices[:, 0]``) at its position
    is strictly the largest among its choices.
    """
    if len(items) == 0:
        raise ValueError("items holds no item: build them with quantcourse.data.word_choice_items")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    device = next(model.parameters()).device
    scores = torch.empty(items.choices.shape, dtype=torch.float32)  # [n_items, n_choices]
    was_training = model.training
    model.eval()  # no dropout while scoring; the mode is restored below
    try:
        for start in range(0, len(items.windows), batch_size):
            batch = items.windows[start : start + batch_size].to(device)  # [b, seq_len]
            logits = model(batch, use_cache=False).logits.cpu()  # [b, seq_len, vocab]
            in_batch = ((items.window >= start) & (items.window < start + batch_size)).nonzero().squeeze(1)
            rows = logits[items.window[in_batch] - start, items.position[in_batch]]  # [items in batch, vocab]
            scores[in_batch] = rows.gather(1, items.choices[in_batch]).float()
    finally:
        model.train(was_training)
    correct = scores[:, 0] > scores[:, 1:].amax(1)
    accuracy, se = _window_mean_and_se(correct.double(), items.window)
    return ChoiceAccuracy(accuracy, se, correct, items.window)
