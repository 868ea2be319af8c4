"""GPTQ: quantize a linear layer column by column, feeding each column's error forward.

Chapter 6 (GPTQ) teaches this module. Paper: Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate
Post-Training Quantization for Generative Pre-trained Transformers", ICLR 2023 (arXiv:2210.17323).
Reference code: IST-DASLab/gptq (``gptq.py``, ``quant.py``), whose behaviour this module reproduces.

For one linear layer with weight ``W [out, in]`` and calibration inputs ``X [tokens, in]``, GPTQ
looks for codes on the quantization grid that keep the layer's outputs close::

    minimise  ||X Wᵀ - X Ŵᵀ||² / N  =  ½ tr((W - Ŵ) H (W - Ŵ)ᵀ),   H = 2 XᵀX / N

It quantizes one input column at a time and spreads that column's rounding error over the
columns not yet quantized, with the update of Optimal Brain Surgeon (OBS) restricted to one
row of ``H⁻¹`` (Eq. 2-3 of the paper). Three tricks make it fast: every row of ``W`` uses the same
column order, so one ``H⁻¹`` serves all rows; updates are applied lazily, 128 columns at a time;
and the rows of ``H⁻¹`` that the updates need are the rows of its upper Cholesky factor.

Faithfulness to the reference (``fasterquant(blocksize=128, percdamp=.01, groupsize=-1,
actorder=False, static_groups=False)``), step by step:

1. Dead inputs (``diag(H) == 0``: the input never fired): ``H[i, i] = 1`` and ``W[:, i] = 0``.
2. ``act_order``: columns in descending order of ``diag(H)``; codes are returned in the original order.
3. Damping: ``H += damp * mean(diag(H)) * I`` with ``damp = 0.01``.
4. ``U = cholesky(cholesky_inverse(cholesky(H)), upper=True)``: the upper Cholesky factor of ``H⁻¹``.
5. Per column ``i`` (in the chosen order), with ``d = U[i, i]``: ``q = quant(w)``,
   ``err = (w - q) / d``, ``W[:, i:] -= err ⊗ U[i, i:]``; loss ``+= (w - q)² / d² / 2``.
   Inside a lazy block of ``block_size`` columns the update touches only the block; after the block,
   ``W[:, end:] -= Err @ U[block, end:]``.
6. Group parameters (``group_size``): *dynamic* groups (the default) compute a group's scale and zero
   point when its first column comes up, from ``W`` as updated by all earlier lazy blocks (the reference
   reads ``W``, not the block's working copy, so with ``group_size < block_size`` a group starting inside
   a block does not see that block's earlier updates; we reproduce this). ``static_groups`` computes every
   group's parameters from the (dead-column-zeroed) original ``W`` before anything else, in the original
   column order, so that act-order keeps groups contiguous. Per-channel parameters (no ``group_size``) come
   from the original ``W`` before step 1, as in the reference.
7. The grid is the reference's ``quant.py`` grid, see :func:`quantcourse.weights.weight_qparams`.

What ``n`` counts in ``H``: the reference averages over calibration *sequences*
(``H = 2/N_seq Σ xxᵀ``); :func:`accumulate_hessian` takes ``X [tokens, in]`` and averages over
*tokens* (``H = 2/N_tok Σ xxᵀ``), which is the reference's ``H`` divided by the sequence length. The
quantized weights do not change (damping is relative to ``mean(diag(H))`` and every update is a ratio
of entries of ``H⁻¹``); only ``loss`` scales, and with our ``H`` it reads as "squared output error per
token, summed over outputs".
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
from torch import nn

from . import surgery
from .pipeline import check_calibration, run_blockwise
from .primitives import MIN_BITS, check_float_tensor, check_n_bits
from .weights import QuantizedModel, QuantizedWeight, check_weight, dequantize_codes, group_qparams, rtn_quantize

__all__ = [
    "accumulate_hessian",
    "gptq_quantize",
    "hessian_error",
    "HessianCollector",
    "obq_reference",
    "GPTQConfig",
    "quantize_model",
]

DAMP = 0.01  # percdamp of the reference
BLOCK_SIZE = 128  # blocksize of the reference
F = TypeVar("F", bound=Callable)


def accumulate_hessian(H: torch.Tensor | None, n_seen: int, X: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Add a batch of inputs to the running mean ``H = 2/N Σ x xᵀ`` (N counts tokens: rows of ``X``).

    ``H_new = H * n/(n + m) + 2/(n + m) * XᵀX`` for a batch of ``m`` rows, as the reference's
    ``add_batch`` (which counts sequences instead; see the module docstring).

    Args:
        H: float ``[in, in]`` so far, or ``None`` before the first batch.
        n_seen: how many rows (tokens) ``H`` already averages over.
        X: float ``[tokens, in]`` (or ``[..., in]``, flattened): the inputs of the linear layer.

    Returns:
        ``(H_new, n_seen + tokens)``; ``H_new`` is a new float32 tensor (float64 if ``X`` is).
    """
    check_float_tensor(X, "X")
    X = X.reshape(-1, X.shape[-1])
    dtype = torch.float64 if X.dtype == torch.float64 else torch.float32
    m = X.shape[0]
    if H is None:
        H = torch.zeros(X.shape[1], X.shape[1], dtype=dtype, device=X.device)
    if H.shape != (X.shape[1], X.shape[1]):
        raise ValueError(
            f"H has shape {tuple(H.shape)} but X has {X.shape[1]} features: "
            f"H must be [{X.shape[1]}, {X.shape[1]}] (one Hessian per linear layer)"
        )
    n = n_seen + m
    Xs = X.to(dtype) * (2.0 / n) ** 0.5  # scale before the product, as the reference does
    return H.to(dtype) * (n_seen / n) + Xs.T @ Xs, n


def _check_layer(
    W: torch.Tensor, H: torch.Tensor | None, n_bits: int, group_size: int | None, allow_partial_group: bool
) -> None:
    check_weight(W, n_bits, group_size, allow_partial_group)
    if H is not None:
        check_float_tensor(H, "H")
        if H.dim() != 2 or H.shape[0] != H.shape[1]:
            raise ValueError(f"H must be a square [in, in] matrix, got shape {tuple(H.shape)}")
        if H.shape[0] != W.shape[1]:
            raise ValueError(
                f"H is {tuple(H.shape)} but W has {W.shape[1]} input columns: "
                f"H must be [{W.shape[1]}, {W.shape[1]}], accumulated from this layer's inputs"
            )


def _one_thread(fn: F) -> F:
    """Run ``fn`` on one intra-op thread, then restore the setting.

    GPTQ's per-column operations touch a few thousand numbers: too small to gain from threads. On a
    busy 2-core machine two threads made them, and LAPACK's Cholesky inverse, 10-50x slower.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        saved = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(saved)

    return wrapper  # type: ignore[return-value]


def _inverse_hessian_factor(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damp·mean(diag H)·I)⁻¹`` (``H`` is not modified)."""
    H = H.clone()
    H.diagonal().add_(damp * H.diagonal().mean())
    try:
        L = torch.linalg.cholesky(H)
        return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except torch.linalg.LinAlgError as e:
        raise ValueError(
            f"H is not positive definite even after damping with damp={damp}: collect more calibration "
            "tokens than input features, or increase damp (e.g. 0.1)"
        ) from e


def _check_gptq_options(group_size: int | None, static_groups: bool, damp: float, block_size: int) -> None:
    if static_groups and group_size is None:
        raise ValueError("static_groups=True needs a group_size: per-channel parameters are already static")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not damp >= 0:
        raise ValueError(f"damp must be >= 0 (a fraction of mean(diag(H)), default 0.01), got {damp!r}")


@_one_thread
def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    n_bits: int,
    *,
    group_size: int | None = None,
    symmetric: bool = False,
    act_order: bool = False,
    static_groups: bool = False,
    damp: float = DAMP,
    block_size: int = BLOCK_SIZE,
    allow_partial_group: bool = False,
) -> QuantizedWeight:
    """Quantize ``W`` with GPTQ (Algorithm 1 of the paper, as the reference's ``fasterquant``).

    Args:
        W: float ``[out, in]``; not modified. Computation runs in float32 (float64 if ``W`` or ``H`` is).
        H: float ``[in, in]``, ``2 XᵀX / N`` from :func:`accumulate_hessian`; not modified.
        n_bits: 2..8.
        group_size: columns sharing a scale (``None``: one per output row). Must divide ``in`` unless
            ``allow_partial_group=True``.
        symmetric: the reference's symmetric grid (see :func:`quantcourse.weights.weight_qparams`); asymmetric by
            default.
        act_order: quantize columns in descending order of ``diag(H)`` (the reference's ``--act-order``).
        static_groups: fix every group's parameters up front, in the original column order
            (``--static-groups``); needs ``group_size``.
        damp: fraction of ``mean(diag(H))`` added to the diagonal (``percdamp``).
        block_size: columns per lazy batch.
        allow_partial_group: accept a shorter last group when ``group_size`` does not divide ``in``.

    Returns:
        :class:`~quantcourse.weights.QuantizedWeight` with ``perm`` and ``loss`` set; ``.weight`` has ``W``'s
        shape and dtype.
    """
    _check_layer(W, H, n_bits, group_size, allow_partial_group)
    _check_gptq_options(group_size, static_groups, damp, block_size)
    dtype = torch.float64 if torch.float64 in (W.dtype, H.dtype) else torch.float32
    n_cols, maxq = W.shape[1], 2**n_bits - 1
    g = group_size or n_cols
    Wq = W.detach().to(dtype).clone()
    H = H.detach().to(dtype).clone()
    if group_size is None:  # per-channel parameters come from W before dead columns are zeroed
        scale, zero = group_qparams(Wq, n_bits, symmetric=symmetric)
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    Wq[:, dead] = 0
    if static_groups:
        scale, zero = group_qparams(Wq, n_bits, symmetric=symmetric, group_size=group_size)
    perm = torch.argsort(H.diagonal(), descending=True) if act_order else None
    if perm is not None:
        Wq, H = Wq[:, perm], H[perm][:, perm]
    dynamic = group_size is not None and not static_groups
    n_groups = -(-n_cols // g)
    # Work on transposed copies: column i of W is the contiguous row i of Wt, so the per-column
    # updates touch contiguous memory (several times faster on CPU than strided columns).
    Wt = Wq.T.contiguous()  # [in, out], quantization order
    scale_t = torch.empty(n_groups, W.shape[0], dtype=dtype, device=W.device)  # [n_groups, out]
    zero_t = torch.empty_like(scale_t)
    if not dynamic:
        scale_t[:], zero_t[:] = scale.T, zero.T
    col_group = torch.arange(n_cols, device=W.device) // g  # the group of each column, in quantization order
    if static_groups and perm is not None:
        col_group = perm // g
    col_group = col_group.tolist()
    codes_t = torch.empty_like(Wt)
    losses = torch.zeros(n_cols, dtype=dtype, device=W.device)
    U = _inverse_hessian_factor(H, damp)
    for i1 in range(0, n_cols, block_size):
        i2 = min(i1 + block_size, n_cols)
        W1, U1 = Wt[i1:i2].clone(), U[i1:i2, i1:i2]
        d = U1.diagonal().tolist()
        Err1 = torch.empty_like(W1)  # [block, out]: the scaled errors (w - q) / d
        for i in range(i2 - i1):
            col = i1 + i
            if dynamic and col % g == 0:  # a group begins: fix its parameters now, from Wt (not W1)
                s, z = group_qparams(Wt[col : col + g].T, n_bits, symmetric=symmetric)
                scale_t[col // g], zero_t[col // g] = s[:, 0], z[:, 0]
            s, z, w = scale_t[col_group[col]], zero_t[col_group[col]], W1[i]
            q = torch.div(w, s).round_().add_(z).clamp_(0, maxq)  # primitives.quantize, inlined
            codes_t[col] = q
            torch.sub(w, q.sub_(z).mul_(s), out=Err1[i]).div_(d[i])  # (w - dequantized) / d
            W1[i:].addr_(U1[i, i:], Err1[i], alpha=-1)  # OBS update of the block's remaining columns
        losses[i1:i2] = Err1.square().sum(1) / 2
        Wt[i2:].addmm_(U[i1:i2, i2:].T, Err1, alpha=-1)  # the lazy update of every later column
    scale, zero = scale_t.T.float().contiguous(), zero_t.T.to(torch.int32).contiguous()
    codes = codes_t.T
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    g_idx = torch.arange(n_cols, device=W.device) // g
    if dynamic and perm is not None:
        g_idx = torch.empty_like(g_idx).scatter_(0, perm, g_idx)  # column perm[j] is in group j // g
    codes = codes.to(torch.uint8).contiguous()
    weight = dequantize_codes(codes, scale, zero, g_idx, W.dtype)
    return QuantizedWeight(
        weight, codes, scale, zero, n_bits, group_size, symmetric, g_idx=g_idx, perm=perm, loss=losses.sum().item()
    )


def obq_reference(
    W: torch.Tensor,
    H: torch.Tensor,
    n_bits: int,
    *,
    group_size: int | None = None,
    symmetric: bool = False,
    act_order: bool = False,
    static_groups: bool = False,
    damp: float = DAMP,
    block_size: int = BLOCK_SIZE,
) -> tuple[torch.Tensor, float]:
    """GPTQ written the plain way, for teaching and as the tests' reference: OBQ with one shared column order.

    Float64 throughout, an explicit inverse Hessian that loses one row and column per quantized column
    (one step of Gaussian elimination), no Cholesky factor, no lazy batches. :func:`gptq_quantize` returns
    the same codes, and the same loss to rounding. The one trace of lazy batches is the reference's rule
    for dynamic groups: a group's parameters come from ``W`` as it stood when the lazy block holding the
    group's first column began (``snapshot``). Slow: ``O(in³)`` per layer, one small step per column.

    Args:
        W: float ``[out, in]``; not modified.
        H: float ``[in, in]``, as for :func:`gptq_quantize`; not modified.
        n_bits, group_size, symmetric, act_order, static_groups, damp, block_size: as :func:`gptq_quantize`
            (``block_size`` only matters through the dynamic-group rule above).

    Returns:
        ``(codes, loss)``: int64 ``[out, in]`` codes in the original column order, and
        ``Σ (w - q)² / [H_F⁻¹]_qq / 2`` over all quantized weights.
    """
    _check_layer(W, H, n_bits, group_size, True)
    _check_gptq_options(group_size, static_groups, damp, block_size)
    W, H = W.detach().double().clone(), H.detach().double().clone()
    n = W.shape[1]
    g, maxq = group_size or n, 2**n_bits - 1

    def grid(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale, zero = group_qparams(M, n_bits, symmetric=symmetric)
        return scale[:, 0].double(), zero[:, 0].double()

    params = {0: grid(W)} if group_size is None else {}
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if static_groups:
        params = {k: grid(W[:, k * g : (k + 1) * g]) for k in range(-(-n // g))}
    order = torch.argsort(H.diagonal(), descending=True).tolist() if act_order else list(range(n))
    Hinv = torch.linalg.inv(H + damp * H.diagonal().mean() * torch.eye(n, dtype=torch.float64, device=H.device))
    codes = torch.zeros(W.shape, dtype=torch.long, device=W.device)
    loss = 0.0
    for j, col in enumerate(order):
        if j % block_size == 0:
            snapshot = W.clone()
        if group_size is not None and not static_groups and j % g == 0:
            params[j // g] = grid(snapshot[:, order[j : j + g]])
        group = (col // g if static_groups else j // g) if group_size is not None else 0
        scale, zero = params[group]
        q = torch.clamp(torch.round(W[:, col] / scale) + zero, 0, maxq)
        codes[:, col] = q.long()
        err = W[:, col] - scale * (q - zero)
        loss += (err.square().sum() / Hinv[col, col] / 2).item()
        rest = order[j + 1 :]
        W[:, rest] -= torch.outer(err / Hinv[col, col], Hinv[col, rest])  # OBS compensation
        Hinv = Hinv - torch.outer(Hinv[:, col], Hinv[col, :]) / Hinv[col, col]  # remove column col
    return codes, loss


def hessian_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """The layer-output error GPTQ minimises: ``tr((W - Ŵ) H (W - Ŵ)ᵀ)`` (float64).

    With ``H = 2XᵀX/N`` this is ``2/N ||X Wᵀ - X Ŵᵀ||²``: twice the mean squared output error per token.
    """
    check_float_tensor(W_hat, "W_hat")
    _check_layer(W, H, MIN_BITS, None, False)
    if W_hat.shape != W.shape:
        raise ValueError(f"W_hat has shape {tuple(W_hat.shape)}, W has {tuple(W.shape)}: they must match")
    D = W.double() - W_hat.double()
    return torch.einsum("oi,ij,oj->", D, H.double(), D).item()


HESSIAN_ROW_BLOCK = 384  # rows of H per product when only the upper triangle is accumulated


def _add_upper_gram(S: torch.Tensor, X: torch.Tensor) -> None:
    """``S += XᵀX`` on and above the diagonal, in place, by row blocks of about ``HESSIAN_ROW_BLOCK``.

    Row block ``[r0, r1)`` of the upper triangle is ``X[:, r0:r1]ᵀ X[:, r0:]``: one matrix product per
    block, into a view of the preallocated ``S``. With ``k`` blocks this is ``(k + 1) / 2k`` of the full
    product's work (5/8 for the 1536-wide ``down_proj`` input, 3/4 for 576); the entries below the
    diagonal are left stale and filled from the upper ones by :func:`_symmetric_from_upper`.
    """
    d = X.shape[1]
    k = max(1, round(d / HESSIAN_ROW_BLOCK))
    bounds = [d * i // k for i in range(k + 1)]
    for r0, r1 in zip(bounds[:-1], bounds[1:], strict=True):
        S[r0:r1, r0:].addmm_(X[:, r0:r1].T, X[:, r0:])


def _symmetric_from_upper(S: torch.Tensor, factor: float) -> torch.Tensor:
    """``factor * S`` made symmetric from its upper triangle (the lower one is ignored): a new tensor."""
    upper = S.triu()
    return (upper + upper.triu(1).T).mul_(factor)


class HessianCollector:
    """Accumulates one Hessian per linear layer from the pipeline's ``collect(name, linear, X)`` calls.

    Linear layers that the pipeline feeds the very same ``X`` object (q/k/v, gate/up) share one
    Hessian, computed once, whether they are all collected before the first is taken (the pipeline's
    default) or each is taken right after it is collected (``true_sequential``). :meth:`take` hands a
    layer's Hessian over and forgets it.

    The result is :func:`accumulate_hessian`'s ``H = 2/N Σ x xᵀ``, computed faster: the sum ``Σ x xᵀ`` is
    accumulated into one preallocated float32 matrix (float64 for float64 inputs), only on and above
    the diagonal (:func:`_add_upper_gram`), and scaled by ``2/N`` once, in :meth:`take`. The two agree to
    float32 rounding, not bit for bit (the sums are added in another order).
    """

    def __init__(self) -> None:
        self._S: dict[str, torch.Tensor] = {}  # owner -> Σ x xᵀ (upper triangle)
        self._n: dict[str, int] = {}  # owner -> tokens seen
        self._H: dict[str, torch.Tensor] = {}  # owner -> the finished H, while sharers have yet to take it
        self._owner: dict[str, str] = {}
        self._last: tuple[torch.Tensor | None, str] = (None, "")

    def __call__(self, name: str, linear: nn.Linear, X: torch.Tensor) -> None:
        last_X, last_owner = self._last
        if X is not last_X:  # a new input: Hessians already taken by all their sharers can go
            pending = set(self._owner.values())
            self._H = {owner: H for owner, H in self._H.items() if owner in pending}
        if name not in self._owner:
            self._owner[name] = last_owner if X is last_X else name
        owner = self._owner[name]
        if owner == name:
            check_float_tensor(X, "X")
            flat = X.reshape(-1, X.shape[-1])
            if name not in self._S:
                dtype = torch.float64 if X.dtype == torch.float64 else torch.float32
                self._S[name] = torch.zeros(flat.shape[1], flat.shape[1], dtype=dtype, device=X.device)
                self._n[name] = 0
            S = self._S[name]
            if S.shape[0] != flat.shape[1]:
                raise ValueError(f"{name}: X has {flat.shape[1]} features, but earlier batches had {S.shape[0]}")
            _add_upper_gram(S, flat.to(S.dtype))
            self._n[name] += flat.shape[0]
        self._last = (X, owner)

    def sharing(self, name: str) -> list[str]:
        """The layers (collected so far, in collection order) that share ``name``'s Hessian, ``name`` included."""
        owner = self._owner[name]
        return [other for other, o in self._owner.items() if o == owner]

    def take(self, name: str) -> torch.Tensor:
        """The Hessian of layer ``name``, float ``[in, in]``; freed once every layer sharing it has taken it."""
        owner = self._owner.pop(name)
        if owner not in self._H:
            S, n = self._S.pop(owner), self._n.pop(owner)
            self._H[owner] = _symmetric_from_upper(S, 2.0 / n)
        H = self._H[owner]
        if owner not in self._owner.values() and owner != self._last[1]:
            del self._H[owner]
        # else kept: a sharer may be collected only after this layer is quantized (true_sequential's
        # one pass collects and quantizes q, then k, then v on the same X); freed with the next new X
        return H


_GPTQ_ONLY = ("act_order", "static_groups", "damp", "block_size")
FORWARD_DTYPE_NAMES = ("bfloat16", "float16")  # GPTQConfig.forward_dtype: names of pipeline.FORWARD_DTYPES
METHODS = ("gptq", "rtn")


@dataclass(frozen=True)
class GPTQConfig:
    """The settings of :func:`quantize_model`, validated when built: before any forward pass.

    ``act_order``, ``static_groups``, ``damp`` and ``block_size`` only mean something to GPTQ: left at
    ``None`` they take GPTQ's defaults (False, False, 0.01, 128); set with ``method="rtn"`` they are an
    error rather than silently ignored.

    Attributes:
        method: ``"gptq"`` or ``"rtn"``.
        n_bits, group_size, symmetric: the grid (:func:`quantcourse.weights.weight_qparams`); ``group_size``
            must divide every quantized layer's input width (checked by :func:`quantize_model`).
        act_order, static_groups, damp, block_size: see :func:`gptq_quantize`.
        batch_size: calibration sequences per forward pass.
        true_sequential: quantize each layer from the outputs of the quantized layers before it in its
            block, one pass per block (:func:`quantcourse.pipeline.run_blockwise`).
        forward_dtype: ``None``, ``"bfloat16"`` or ``"float16"``: the precision of the calibration
            forward passes (``torch.autocast``); Hessians and the solve stay float32.
    """

    method: Literal["gptq", "rtn"] = "gptq"
    n_bits: int = 4
    group_size: int | None = 64
    symmetric: bool = False
    act_order: bool | None = None
    static_groups: bool | None = None
    damp: float | None = None
    block_size: int | None = None
    batch_size: int = 8
    true_sequential: bool = False
    forward_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {self.method!r}")
        check_n_bits(self.n_bits)
        if self.group_size is not None and (
            isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1
        ):
            raise ValueError(f"group_size must be a positive int or None (per channel), got {self.group_size!r}")
        for name in ("symmetric", "act_order", "static_groups", "true_sequential"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")
        if self.forward_dtype is not None and self.forward_dtype not in FORWARD_DTYPE_NAMES:
            raise ValueError(
                "forward_dtype must be None (float32 forward passes), 'bfloat16' or 'float16', "
                f"got {self.forward_dtype!r}"
            )
        given = [name for name in _GPTQ_ONLY if getattr(self, name) is not None]
        if self.method == "rtn" and self.true_sequential:
            given.append("true_sequential")
        if self.method == "rtn" and self.forward_dtype is not None:
            given.append("forward_dtype")
        if self.method == "rtn" and given:
            raise ValueError(
                f"{', '.join(given)} only apply to method='gptq'; round-to-nearest takes n_bits, group_size and "
                "symmetric: drop them or use method='gptq'"
            )
        defaults = dict(act_order=False, static_groups=False, damp=DAMP, block_size=BLOCK_SIZE)
        for name, default in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        _check_gptq_options(self.group_size, self.static_groups, self.damp, self.block_size)

    def as_dict(self) -> dict[str, Any]:
        """The settings as stored with a quantized model (:attr:`quantcourse.weights.QuantizedModel.config`)."""
        keys = ("method", "n_bits", "group_size", "symmetric", *_GPTQ_ONLY, "true_sequential", "forward_dtype")
        return {key: getattr(self, key) for key in keys}


def _check_layers(model: nn.Module, config: GPTQConfig) -> None:
    """Every quantized linear can take ``config``'s groups: fail before the first forward pass, not at layer 40."""
    block_names = {id(module): name for name, module in model.named_modules()}
    for block in surgery.decoder_blocks(model):
        for name, linear in surgery.find_linears(block, prefix=f"{block_names[id(block)]}.").items():
            try:
                check_weight(linear.weight, config.n_bits, config.group_size)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None


def quantize_model(
    model: nn.Module,
    calibration: torch.Tensor | None,
    *,
    n_bits: int = 4,
    group_size: int | None = 64,
    symmetric: bool = False,
    method: Literal["gptq", "rtn"] = "gptq",
    act_order: bool | None = None,
    static_groups: bool | None = None,
    damp: float | None = None,
    block_size: int | None = None,
    batch_size: int = 8,
    true_sequential: bool = False,
    forward_dtype: str | None = None,
    progress: bool = True,
) -> QuantizedModel:
    """Quantize every linear layer of the decoder blocks, in place, block by block.

    GPTQ runs through :func:`quantcourse.pipeline.run_blockwise`: each block's Hessians come from the
    outputs of the already-quantized blocks before it. ``method="rtn"`` needs no data (``calibration``
    may be ``None``) and rounds every weight to nearest on the same grid. The embeddings and the
    output head stay in float. Every option is checked (:class:`GPTQConfig`, and ``group_size`` against
    every layer's width) before the first forward pass.

    Args:
        model: a Llama-, OPT- or GPT-2-style causal LM (modified in place).
        calibration: int64 ``[n_samples, seq_len]`` token ids, e.g. :func:`quantcourse.data.calibration_samples`.
        n_bits, group_size, symmetric: the grid (see :func:`gptq_quantize`). The default ``group_size=64``
            divides every width of the course model (128 does not divide 576).
        method: ``"gptq"`` or ``"rtn"``.
        act_order, static_groups, damp, block_size: GPTQ only (see :func:`gptq_quantize`); ``None`` takes
            GPTQ's default; an error with ``method="rtn"``.
        batch_size: calibration sequences per forward pass (ignored with ``true_sequential``, which
            runs every sequence in one pass per block).
        true_sequential: GPTQ only. Quantize each layer from inputs that went through the block's
            already-quantized layers ([q,k,v] → [o] → [gate,up] → [down]), as the reference's
            ``--true-sequential`` and transformers' ``GPTQConfig`` default do; one forward pass per
            block instead of two (faster), at the memory of the whole calibration set's activations.
        forward_dtype: GPTQ only. ``"bfloat16"`` or ``"float16"`` runs the calibration forward passes in
            that precision under ``torch.autocast``, as the reference runs them in float16 on a GPU; the
            weights, the Hessians (accumulated in float32 from the half-precision inputs) and the solve
            stay float32. About twice as fast a forward pass on a CPU with bfloat16 instructions, at a
            cost: bfloat16 keeps 8 bits of mantissa where the reference's float16 keeps 11, and on the
            course model at 128 x 512 calibration tokens the perplexity after GPTQ rose by 0.8 % and
            1.6 % (two calibration seeds; ``benchmarks/results/gptq_true_sequential_bfloat16.md``), a
            sixth to a quarter of GPTQ's gain over round-to-nearest. ``None`` (float32): the default.
        progress: a tqdm bar over the blocks.

    Returns:
        :class:`quantcourse.weights.QuantizedModel` (the model, every layer's codes and parameters,
        timings), ready for :func:`quantcourse.serialization.save_quantized`.
    """
    config = GPTQConfig(
        method,
        n_bits,
        group_size,
        symmetric,
        act_order,
        static_groups,
        damp,
        block_size,
        batch_size,
        true_sequential,
        forward_dtype,
    )
    model = surgery.as_plain_linears(model)
    _check_layers(model, config)
    if config.method == "gptq":
        if calibration is None:
            raise ValueError(
                "method='gptq' needs calibration token ids [n_samples, seq_len] (its Hessians come from the "
                "layers' inputs), e.g. quantcourse.data.calibration_samples(tokenizer, 32, 512); method='rtn' "
                "runs without"
            )
        check_calibration(calibration, config.batch_size)
    results: dict[str, QuantizedWeight] = {}
    seconds: dict[str, float] = {}
    hessians = HessianCollector()

    def quantize_linear(name: str, linear: nn.Linear) -> None:
        start = time.perf_counter()
        if config.method == "gptq":
            result = gptq_quantize(
                linear.weight,
                hessians.take(name),
                config.n_bits,
                group_size=config.group_size,
                symmetric=config.symmetric,
                act_order=config.act_order,
                static_groups=config.static_groups,
                damp=config.damp,
                block_size=config.block_size,
            )
        else:
            result = rtn_quantize(
                linear.weight, config.n_bits, group_size=config.group_size, symmetric=config.symmetric
            )
        seconds[name] = time.perf_counter() - start
        linear.weight = nn.Parameter(result.weight, requires_grad=False)
        results[name] = result

    start = time.perf_counter()
    collect: Callable | None = hessians if config.method == "gptq" else None
    run_blockwise(
        model,
        calibration,
        collect=collect,
        quantize_linear=quantize_linear,
        batch_size=config.batch_size,
        true_sequential=config.true_sequential,
        forward_dtype=None if config.forward_dtype is None else getattr(torch, config.forward_dtype),
        progress=progress,
        desc=f"{config.method} {config.n_bits}-bit",
    )
    return QuantizedModel(model, results, config.as_dict(), time.perf_counter() - start, seconds)
