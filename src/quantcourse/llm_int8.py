"""LLM.int8(): vector-wise int8 matrix multiplication with a mixed-precision decomposition for outliers.

Chapter 9 teaches this (Dettmers, Lewis, Belkada and Zettlemoyer, "LLM.int8(): 8-bit Matrix Multiplication
for Transformers at Scale", NeurIPS 2022). A linear layer ``Y = X Wᵀ`` is computed in two parts:

1. **Vector-wise int8.** Every row of ``X`` (one token) and every row of ``W`` (one output channel) gets its
   own absmax scale; the int8 codes are multiplied into an exact int32 accumulator, which is dequantized
   with the outer product of the two scale vectors.
2. **Mixed-precision decomposition.** The few input *columns* (hidden dimensions) where some ``|x| >=
   threshold`` (6.0 in the paper) are taken out of the int8 product and multiplied in floating point with
   the dequantized weight columns; the two results are added.

The functions equal bitsandbytes' functional ops byte for byte (``int8_vectorwise_quant``,
``int8_linear_matmul``, ``int8_mm_dequant``, ``int8_mixed_scaled_mm``): same codes, scales, outlier columns
and outputs, which the tests check on fresh random inputs. :class:`Int8Linear` is the module
(``from_float``), :func:`quantize_model_int8` swaps a model's linears through :mod:`quantcourse.surgery`,
and :func:`outlier_stats` measures the paper's outlier features on a model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from . import surgery
from .evaluate import _describe
from .progress import progress_bar

__all__ = [
    "THRESHOLD",
    "Int8Rows",
    "vectorwise_quantize",
    "vectorwise_dequantize",
    "outlier_columns",
    "int8_matmul",
    "dequantize_matmul",
    "int8_linear",
    "Int8Linear",
    "quantize_model_int8",
    "OutlierStats",
    "outlier_stats",
    "plot_outliers",
]

THRESHOLD = 6.0
"""The paper's outlier threshold (also ``BitsAndBytesConfig.llm_int8_threshold``'s default)."""

# bitsandbytes' literals, kept so that the results agree to the last bit: 1/127 for one dequantization, and
# "1/127²" for a product of two, which bitsandbytes writes 6.200124e-05 while 1/127² = 6.2000124e-05 (a digit
# slipped: its products come out 1.8e-5 relatively too large, far below int8's own rounding).
_DEQUANT = 7.874015718698502e-3
_DEQUANT_PRODUCT = 6.200124e-05
# float32 holds every integer up to 2^24 = 1024 * 128 * 128: an int8 dot product over at most 1024 terms never
# leaves that range, so float32 matrix products of 1024-column slices are exact int32 results.
_EXACT_K = 1024


@dataclass(frozen=True)
class Int8Rows:
    """A matrix quantized row by row: ``x[r, c] ≈ codes[r, c] * absmax[r] / 127``.

    Attributes:
        codes: int8 ``[rows, cols]``, in ``[-127, 127]``; outlier columns are 0.
        absmax: float32 ``[rows]``, each row's largest ``|x|`` (outliers left out when a threshold was given).
        outlier_cols: int64 ``[n_outliers]``, the sorted columns where some ``|x| >= threshold``; ``None``
            when no threshold was given.
    """

    codes: torch.Tensor
    absmax: torch.Tensor
    outlier_cols: torch.Tensor | None = None


def _check_float_matrix(x: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{what} must be a float tensor (float32, float16 or bfloat16), got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{what} must have a non-empty last dimension, got shape {tuple(x.shape)}")


def _not_finite(what: str) -> ValueError:
    return ValueError(f"{what} holds NaN or infinite values; absmax scales of such rows are undefined")


def _check_threshold(threshold: float) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold):
        raise TypeError(f"threshold must be a number (0 turns the decomposition off), got {threshold!r}")
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0 (0 turns the decomposition off), got {threshold}")


def outlier_columns(x: torch.Tensor, threshold: float = THRESHOLD) -> torch.Tensor:
    """The columns (input features) of ``x`` ``[..., cols]`` where some ``|x| >= threshold``: int64 ``[n]``, sorted.

    One outlier anywhere in the batch sends its whole column to the floating-point part of
    :func:`int8_linear`: columns, not single values, because a matrix product is split along its inner
    dimension.
    """
    _check_float_matrix(x, "x")
    _check_threshold(threshold)
    if not torch.isfinite(x).all():
        raise _not_finite("x")
    if threshold == 0:
        return torch.empty(0, dtype=torch.int64, device=x.device)
    return torch.nonzero((x.abs() >= threshold).reshape(-1, x.shape[-1]).any(dim=0)).flatten()


def vectorwise_quantize(x: torch.Tensor, threshold: float = 0.0) -> Int8Rows:
    """Absmax int8 per row of ``x`` ``[..., cols]`` (flattened to ``[rows, cols]``), as bitsandbytes does.

    ``codes = round(x * (127 / absmax_row))``. With ``threshold > 0`` the values with ``|x| >= threshold``
    are left out of the row absmax and the outlier *columns* get code 0 in every row (their values go
    through the floating-point path). As in bitsandbytes, the other values of an outlier column still count
    in their row's absmax. A row of zeros gets scale 0 and codes 0.

    Equal to ``bitsandbytes.functional.int8_vectorwise_quant(x, threshold)`` for 2-D ``x`` of any float
    dtype (bitsandbytes quantizes fp16 activations; the arithmetic runs in float32 either way).

    Args:
        x: float ``[..., cols]``: activations ``[tokens, in]`` or a weight ``[out, in]``.
        threshold: outlier magnitude; 0 turns the decomposition off (bitsandbytes' default, while the paper
            and ``BitsAndBytesConfig`` use :data:`THRESHOLD`).
    """
    _check_float_matrix(x, "x")
    _check_threshold(threshold)
    x = x.reshape(-1, x.shape[-1])  # [rows, cols]
    outlier_cols = None
    if threshold > 0:
        outliers = x.abs() >= threshold
        outlier_cols = torch.nonzero(outliers.any(dim=0)).flatten()
        if torch.isinf(x[:, outlier_cols]).any():  # an infinity is an "outlier" too: check the few columns
            raise _not_finite("x")
        x = x.masked_fill(outliers, 0)  # outliers do not stretch their row's scale
    absmax = x.abs().amax(dim=1).float()  # [rows]; NaN or inf here if x holds one (checked on [rows] only)
    if not torch.isfinite(absmax).all():
        raise _not_finite("x")
    # The reciprocal first, then the product, in float32: bitsandbytes' rounding order. A zero row gets
    # factor 0 (bitsandbytes computes 0 * inf = NaN there, which its cast to int8 happens to turn into 0).
    inv = torch.where(absmax > 0, 127.0 / absmax, 0.0)  # [rows]
    codes = torch.round(x * inv.unsqueeze(-1)).to(torch.int8)
    if outlier_cols is not None:
        codes[:, outlier_cols] = 0
    return Int8Rows(codes, absmax, outlier_cols)


def vectorwise_dequantize(codes: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """float32 ``codes * absmax / 127`` row by row: ``[rows, cols]`` from int8 ``[rows, cols]`` and ``[rows]``.

    Equal to ``bitsandbytes.functional.int8_vectorwise_dequant``.
    """
    if codes.dtype != torch.int8:
        raise TypeError(f"codes must be int8 (from vectorwise_quantize), got {codes.dtype}")
    if absmax.numel() != codes.shape[0]:
        raise ValueError(f"absmax has {absmax.numel()} scales for {codes.shape[0]} rows of codes")
    return codes * absmax.float().reshape(-1, 1) * _DEQUANT


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The exact int32 product ``a @ bᵀ`` of int8 ``a`` ``[m, k]`` and int8 ``b`` ``[n, k]``: int32 ``[m, n]``.

    Equal to ``bitsandbytes.functional.int8_linear_matmul``. Integer matrix units compute this directly
    (int8 tensor cores, AVX-512 VNNI), which torch exposes as ``torch._int_mm``; elsewhere it is float32
    products of 1024-column slices, each exact (its sums stay below 2^24), added in int32.
    """
    for t, what in ((a, "a"), (b, "b")):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int8 or t.dim() != 2:
            raise TypeError(f"{what} must be a 2-D int8 tensor, got {_describe(t)}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"inner dimensions differ: a is {tuple(a.shape)}, b is {tuple(b.shape)} (a @ b.T)")
    if _int_mm_fits(a, b):
        return torch._int_mm(a, b.T)
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.int32, device=a.device)
    for start in range(0, a.shape[1], _EXACT_K):
        part = slice(start, start + _EXACT_K)
        out += (a[:, part].float() @ b[:, part].float().T).to(torch.int32)
    return out


def _int_mm_fits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``torch._int_mm`` is fast and right here: on CUDA within its shape rules; on a CPU only with
    AVX-512 (elsewhere it is a slow scalar loop), and never for k == 1, where it returns wrong sums."""
    (m, k), n = a.shape, b.shape[0]
    if a.device.type == "cuda":
        return m > 16 and k >= 16 and k % 8 == 0 and n >= 16 and n % 8 == 0
    return a.device.type == "cpu" and k > 1 and torch.backends.cpu.get_cpu_capability() == "AVX512"


def dequantize_matmul(
    acc: torch.Tensor,
    row_absmax: torch.Tensor,
    col_absmax: torch.Tensor,
    bias: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``acc * row_absmax ⊗ col_absmax / 127² + bias``: the float result of an int8 product.

    With bitsandbytes' constant for ``1/127²`` (``6.200124e-05``, 1.8e-5 relatively above the exact value).

    Args:
        acc: int32 ``[m, n]`` from :func:`int8_matmul`.
        row_absmax: float32 ``[m]``, the activation rows' scales.
        col_absmax: float32 ``[n]``, the weight rows' (output channels') scales.
        bias: ``[n]`` or ``None``.
        dtype: the result's dtype (bitsandbytes' ``int8_mm_dequant`` returns float16; it computes in float32
            and so does this, so ``.half()`` of this result equals it).
    """
    if acc.dtype != torch.int32:
        raise TypeError(f"acc must be the int32 result of int8_matmul, got {acc.dtype}")
    if row_absmax.numel() != acc.shape[0] or col_absmax.numel() != acc.shape[-1]:
        raise ValueError(
            f"scales do not fit the product {tuple(acc.shape)}: {row_absmax.numel()} row scales, "
            f"{col_absmax.numel()} column scales"
        )
    scale = row_absmax.float().reshape(-1, 1) * col_absmax.float().reshape(1, -1)  # [m, n]
    out = acc * scale * _DEQUANT_PRODUCT
    if bias is not None:
        out += bias
    return out.to(dtype)


def int8_linear(
    x: torch.Tensor,
    weight: Int8Rows,
    bias: torch.Tensor | None = None,
    threshold: float = THRESHOLD,
    *,
    quant_dtype: torch.dtype | None = torch.float16,
) -> torch.Tensor:
    """LLM.int8()'s ``x @ Wᵀ + b``: vector-wise int8 for the regular columns, floating point for the outliers.

    The input columns where some ``|x| >= threshold`` are zeroed in the int8 product and multiplied in
    ``x``'s dtype with the dequantized weight columns; the two parts are added. ``threshold=0``: all int8.
    Equal to bitsandbytes' ``MatMul8bitLt`` forward (``int8_vectorwise_quant`` of the fp16 input, then
    ``int8_mixed_scaled_mm``).

    Args:
        x: float ``[..., in]``.
        weight: the weight ``[out, in]`` quantized per output row (``vectorwise_quantize(W.half())``).
        bias: ``[out]`` or ``None``.
        threshold: outlier magnitude (the paper's 6.0 by default).
        quant_dtype: the dtype ``x`` is cast to before it is quantized (bitsandbytes: float16); ``None``
            quantizes ``x`` as it is.

    Returns:
        ``[..., out]`` in ``x``'s dtype.
    """
    _check_float_matrix(x, "x")
    if not isinstance(weight, Int8Rows):
        raise TypeError(f"weight must be Int8Rows (vectorwise_quantize(W)), got {type(weight).__name__}")
    if x.shape[-1] != weight.codes.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features but the weight expects {weight.codes.shape[1]}")
    x2 = x.reshape(-1, x.shape[-1])  # [tokens, in]
    xq = vectorwise_quantize(x2 if quant_dtype is None else x2.to(quant_dtype), threshold)
    acc = int8_matmul(xq.codes, weight.codes)  # [tokens, out] int32
    out = dequantize_matmul(acc, xq.absmax, weight.absmax, bias, dtype=x.dtype)
    cols = xq.outlier_cols
    if cols is not None and cols.numel():
        # The outlier columns in floating point, against the same (dequantized int8) weight columns.
        w_cols = vectorwise_dequantize(weight.codes[:, cols], weight.absmax).to(x.dtype)  # [out, n_outliers]
        out = out.addmm(x2[:, cols], w_cols.T)
    return out.reshape(*x.shape[:-1], out.shape[-1])


class Int8Linear(nn.Module):
    """A linear layer in LLM.int8(): int8 weight rows (one absmax each), int8 activations, outliers in float.

    Holds ``codes`` (int8 ``[out, in]``), ``absmax`` (float32 ``[out]``) and ``bias``; 8 bits per weight
    plus one float per row. Build it with :meth:`from_float`.
    """

    def __init__(
        self,
        codes: torch.Tensor,
        absmax: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        threshold: float = THRESHOLD,
        quant_dtype: torch.dtype | None = torch.float16,
    ) -> None:
        super().__init__()
        _check_threshold(threshold)
        if codes.dtype != torch.int8 or codes.dim() != 2:
            raise TypeError(f"codes must be a 2-D int8 tensor [out, in], got {_describe(codes)}")
        self.register_buffer("codes", codes)
        self.register_buffer("absmax", absmax.float())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.threshold, self.quant_dtype = float(threshold), quant_dtype
        self.out_features, self.in_features = codes.shape

    @classmethod
    def from_float(
        cls, linear: nn.Linear, threshold: float = THRESHOLD, *, quant_dtype: torch.dtype | None = torch.float16
    ) -> Int8Linear:
        """Quantize ``linear`` (its weight cast to ``quant_dtype`` first, as bitsandbytes' ``Int8Params``)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_float needs an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        q = vectorwise_quantize(w if quant_dtype is None else w.to(quant_dtype))
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(q.codes, q.absmax, bias, threshold=threshold, quant_dtype=quant_dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """float32 ``[out, in]``: the weight this layer multiplies with."""
        return vectorwise_dequantize(self.codes, self.absmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = Int8Rows(self.codes, self.absmax)
        return int8_linear(x, weight, self.bias, self.threshold, quant_dtype=self.quant_dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, threshold={self.threshold}"


def quantize_model_int8(
    model: nn.Module,
    threshold: float = THRESHOLD,
    *,
    include_head: bool = False,
    quant_dtype: torch.dtype | None = torch.float16,
) -> nn.Module:
    """Swap every linear layer of ``model`` for an :class:`Int8Linear`, in place; returns ``model``.

    The output head stays in float unless ``include_head`` (bitsandbytes and transformers skip it too).
    """
    _check_threshold(threshold)
    return surgery.replace_linears(
        model,
        lambda name, linear: Int8Linear.from_float(linear, threshold, quant_dtype=quant_dtype),
        include_head=include_head,
    )


@dataclass
class OutlierStats:
    """Where a model's hidden states reach ``|x| >= threshold``, per hidden state and hidden dimension.

    The hidden states are the inputs of the linear layers whose input is the model's hidden width
    (attention projections, the attention output and the FFN expansion: the paper's choice; the FFN
    contraction, whose input is the FFN's own width, is left out). Linears fed the same tensor (q, k and v;
    gate and up) share one hidden state.

    Attributes:
        layers: per hidden state, the names of the linear layers it feeds (in the order the model runs).
        threshold: the outlier magnitude.
        n_tokens: token positions seen.
        max_abs: float32 ``[n_layers, hidden]``, the largest ``|x|`` per hidden state and dimension.
        token_share: float32 ``[n_layers, hidden]``, the share of tokens with ``|x| >= threshold``.
        any_layer_share: float32 ``[hidden]``, the share of tokens at which a dimension reaches the
            threshold in at least one hidden state.
    """

    layers: list[tuple[str, ...]]
    threshold: float
    n_tokens: int
    max_abs: torch.Tensor
    token_share: torch.Tensor
    any_layer_share: torch.Tensor

    def columns_per_layer(self) -> torch.Tensor:
        """int64 ``[n_layers]``: how many dimensions reach the threshold in each hidden state (the number of
        columns the decomposition sends to floating point for these tokens)."""
        return (self.max_abs >= self.threshold).sum(dim=1)

    def layer_share(self) -> torch.Tensor:
        """float32 ``[hidden]``: the share of hidden states in which each dimension reaches the threshold."""
        return (self.max_abs >= self.threshold).float().mean(dim=0)

    def outlier_features(self, min_layer_share: float = 0.25, min_token_share: float = 0.06) -> torch.Tensor:
        """The paper's outlier features (section 4.1): the dimensions that reach the threshold in at least
        ``min_layer_share`` of the hidden states and at at least ``min_token_share`` of the token positions.
        int64 ``[n]``, sorted."""
        keep = (self.layer_share() >= min_layer_share) & (self.any_layer_share >= min_token_share)
        return torch.nonzero(keep).flatten()


@torch.no_grad()
def outlier_stats(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    threshold: float = THRESHOLD,
    *,
    progress: bool = True,
) -> OutlierStats:
    """Run token batches ``[batch, seq]`` through ``model``; measure its outlier features (see :class:`OutlierStats`).

    :func:`quantcourse.surgery.record_inputs` watches the inputs of the linear layers (found by
    :func:`quantcourse.surgery.find_linears`); its hooks are removed afterwards, even on error. The model is
    not changed.
    """
    _check_threshold(threshold)
    if threshold == 0:
        raise ValueError("threshold must be > 0: every value has |x| >= 0")
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    linears = surgery.find_linears(model)
    if hidden is None:
        raise ValueError("the model has no config.hidden_size: pass a transformers causal LM")
    watched = {name: lin for name, lin in linears.items() if lin.in_features == hidden}
    if not watched:
        raise ValueError(f"no linear layer of {type(model).__name__} takes the hidden width {hidden} as input")
    layer_of: dict[str, int] = {}  # linear name -> hidden-state index, fixed during the first batch
    layers: list[list[str]] = []
    max_abs: list[torch.Tensor] = []
    counts: list[torch.Tensor] = []
    step: dict = {"last": None, "any": None}

    def on_input(name: str, module: nn.Module, X: torch.Tensor) -> None:
        # X [tokens, hidden]: record_inputs hands linears fed the same tensor (q/k/v, gate/up) the same object.
        shared = X is step["last"]
        step["last"] = X
        if name not in layer_of:
            if shared:
                layer_of[name] = len(layers) - 1
                layers[-1].append(name)
            else:
                layer_of[name] = len(layers)
                layers.append([name])
                max_abs.append(torch.zeros(hidden))
                counts.append(torch.zeros(hidden, dtype=torch.int64))
        if shared:
            return  # counted for the first linear of this hidden state
        i = layer_of[name]
        x = X.float().abs()
        big = x >= threshold  # [tokens, hidden]
        max_abs[i] = torch.maximum(max_abs[i], x.amax(dim=0).cpu())
        counts[i] += big.sum(dim=0).cpu()
        step["any"] = big if step["any"] is None else step["any"] | big

    n_tokens, any_counts = 0, torch.zeros(hidden, dtype=torch.int64)
    device = next(model.parameters()).device
    try:
        with surgery.record_inputs(watched, on_input):
            for batch in progress_bar(list(batches), desc="outliers", disable=not progress, leave=False):
                step["last"], step["any"] = None, None
                model(batch.to(device), use_cache=False)
                n_tokens += batch.numel()
                any_counts += step["any"].sum(dim=0).cpu()
    finally:
        step["last"] = step["any"] = None
    if n_tokens == 0:
        raise ValueError("no batches: pass token ids [batch, seq], e.g. data.calibration_samples(...).split(4)")
    return OutlierStats(
        layers=[tuple(names) for names in layers],
        threshold=float(threshold),
        n_tokens=n_tokens,
        max_abs=torch.stack(max_abs),
        token_share=torch.stack(counts).float() / n_tokens,
        any_layer_share=any_counts.float() / n_tokens,
    )


def plot_outliers(stats: OutlierStats, *, top: int = 24):
    """Two panels: dimensions reaching the threshold per hidden state, and a heatmap of ``max |x|`` for the
    ``top`` dimensions that reach it most often. Returns the matplotlib figure."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import MaxNLocator

    per_layer = stats.columns_per_layer()
    order = torch.argsort(stats.layer_share() + stats.any_layer_share, descending=True)[:top]
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [1, 1.6]})
    ax0.bar(range(len(per_layer)), per_layer.numpy(), color="C3")
    ax0.set_xlabel("hidden state (input of attention / attention output / FFN, in model order)")
    ax0.set_ylabel(f"dimensions with some |x| ≥ {stats.threshold:g}")
    ax0.set_title("Outlier columns per layer input")
    ax0.yaxis.set_major_locator(MaxNLocator(integer=True))
    image = ax1.imshow(
        stats.max_abs[:, order].T.clamp_min(1e-3).numpy(),
        aspect="auto",
        cmap="magma",
        norm=LogNorm(vmin=0.1, vmax=max(float(stats.max_abs.max()), 1.0)),
        interpolation="nearest",
    )
    ax1.set_yticks(range(len(order)), [str(int(d)) for d in order])
    ax1.set_xlabel("hidden state")
    ax1.set_ylabel("hidden dimension")
    ax1.set_title(f"max |x| of the {len(order)} dimensions most often ≥ {stats.threshold:g}")
    fig.colorbar(image, ax=ax1, label="max |x|")
    fig.tight_layout()
    return fig
