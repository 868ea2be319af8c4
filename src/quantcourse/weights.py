"""Weight-only quantization, whatever the method: the grid, round-to-nearest, and the record every method returns.

GPTQ (chapter 6), AWQ, NF4 and any other weight-only method end in the same place: integer codes per
weight, a scale and a zero point per group of input columns, and the dequantized weight the model runs
with. This module holds that record (:class:`QuantizedWeight`), how to turn it back into floats
(:func:`dequantize_codes`), the integer grid GPTQ's reference code defines (:func:`weight_qparams`),
the round-to-nearest baseline on that grid (:func:`rtn_quantize`), and the record of a whole quantized
model (:class:`QuantizedModel`) that :mod:`quantcourse.serialization` stores. It imports no method: a
method module imports it.

Layout of one quantized ``[out, in]`` weight::

    codes       uint8   [out, in]        each in [0, 2**n_bits - 1], original column order
    scale       float32 [out, n_groups]  one per row and group of input columns
    zero_point  int32   [out, n_groups]
    g_idx       int64   [in]             the group of each input column (arange(in) // group_size
                                         unless a method reorders columns, as GPTQ's act-order does)
    codebook    float32 [2**n_bits]      optional: the value each code stands for (NF4, FP4); without
                                         it a code stands for itself (an integer grid)

    weight[o, i] = scale[o, g_idx[i]] * (level(codes[o, i]) - zero_point[o, g_idx[i]])
    level(c) = c (integer grid) or codebook[c]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .granularity import Granularity, PerChannel, PerGroup
from .primitives import QParams, check_float_tensor, check_n_bits, choose_qparams

__all__ = [
    "QuantizedWeight",
    "QuantizedModel",
    "dequantize_codes",
    "weight_qparams",
    "group_qparams",
    "consecutive_g_idx",
    "check_weight",
    "rtn_quantize",
]


def consecutive_g_idx(
    in_features: int, group_size: int | None, device: torch.device | str | None = None
) -> torch.Tensor:
    """int64 ``[in_features]``: ``arange(in) // group_size`` (all zeros per channel, ``group_size=None``)."""
    return torch.arange(in_features, device=device) // (group_size or in_features)


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight matrix quantized by any weight-only method: codes, their parameters, and the dequantized weight.

    Attributes:
        weight: ``[out, in]``, the dtype of the original weight: the dequantized weight
            ``scale[:, g_idx] * (level(codes) - zero_point[:, g_idx])`` (see the module docstring).
        codes: uint8 ``[out, in]`` in the original column order, each in ``[0, 2**n_bits - 1]``.
        scale: float32 ``[out, n_groups]`` (``n_groups == 1`` per channel).
        zero_point: int32 ``[out, n_groups]``.
        n_bits, group_size, symmetric: the settings used (``group_size=None``: per channel).
        g_idx: int64 ``[in]``: the group of each input column. Optional when constructing: ``None`` means
            consecutive groups, ``arange(in) // group_size``, and is filled in.
        perm: int64 ``[in]``: the order a method quantized the columns in (GPTQ's act-order); ``None``
            when not reordered or not recorded.
        loss: the method's own objective, if it reports one (GPTQ: ``Σ (w - q)² / d² / 2``); ``None`` otherwise.
        codebook: float32 ``[2**n_bits]``, the value of each code for a non-uniform format (NF4, FP4);
            ``None`` for an integer grid.
    """

    weight: torch.Tensor
    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    n_bits: int
    group_size: int | None
    symmetric: bool
    g_idx: torch.Tensor = None  # type: ignore[assignment]  # filled in by __post_init__
    perm: torch.Tensor | None = None
    loss: float | None = None
    codebook: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.g_idx is None:
            g_idx = consecutive_g_idx(self.codes.shape[1], self.group_size, self.codes.device)
            object.__setattr__(self, "g_idx", g_idx)

    @property
    def has_consecutive_groups(self) -> bool:
        """Whether ``g_idx`` is ``arange(in) // group_size`` (then it need not be stored)."""
        expected = consecutive_g_idx(self.codes.shape[1], self.group_size, self.g_idx.device)
        return torch.equal(self.g_idx, expected)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``scale[:, g_idx] * (level(codes) - zero_point[:, g_idx])`` as ``dtype``: equals ``weight``."""
        return dequantize_codes(self.codes, self.scale, self.zero_point, self.g_idx, dtype, codebook=self.codebook)


def dequantize_codes(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    g_idx: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    *,
    codebook: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantize ``codes [out, in]`` with per-group ``scale``/``zero_point [out, n_groups]`` and ``g_idx [in]``.

    Computes in float32 (float64 when ``dtype`` is float64), then casts to ``dtype``. With a
    ``codebook [2**n_bits]`` a code stands for ``codebook[code]`` instead of itself.
    """
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    levels = codes.to(compute) if codebook is None else codebook.to(device=codes.device, dtype=compute)[codes.long()]
    q = levels - zero_point[:, g_idx].to(compute)
    return (scale[:, g_idx].to(compute) * q).to(dtype)


def weight_qparams(
    W: torch.Tensor, n_bits: int, *, symmetric: bool = False, granularity: Granularity = PerChannel(0)
) -> QParams:
    """Scale and zero point on the weight grid of GPTQ's reference (``quant.py`` ``Quantizer.find_params``).

    Both schemes use unsigned codes ``0 .. 2**n_bits - 1`` and dequantize as ``scale * (q - zero)``:

    * asymmetric (the reference's default): exactly :func:`quantcourse.choose_qparams` with
      ``symmetric=False`` (range widened to contain 0, ``scale = (max - min) / (2^b - 1)``,
      ``zero = round(-min / scale)``), except that an all-zero row gets the range ``[-1, 1]`` as in
      the reference instead of the library's tiny scale;
    * symmetric: ``scale = 2·absmax / (2^b - 1)`` and ``zero = 2^(b-1)`` (8 at 4 bits), so the grid
      spans ``[-2^(b-1), 2^(b-1) - 1]`` steps: all ``2^b`` levels, one more negative than positive. The
      library's own symmetric scheme (``choose_qparams(symmetric=True)``: signed codes, ``zero = 0``,
      ``2^b - 1`` levels, ``scale = absmax / (2^(b-1) - 1)``) is a different grid, which GPTQ does not use.
      A quirk kept from the reference: a row with no negative value keeps ``min = 0``, so its scale is
      ``max / (2^b - 1)`` while the zero point stays at the middle.

    Returned as a zero-point :class:`~quantcourse.QParams` (``symmetric=False``, since the codes are
    unsigned), so :func:`quantcourse.quantize` and :func:`quantcourse.dequantize` apply unchanged.

    Args:
        W: float ``[out, cols]``.
        n_bits: 2..8.
        symmetric: the reference's ``--sym``.
        granularity: ``PerChannel(0)`` (one row each) or ``PerGroup(g)``.
    """
    check_n_bits(n_bits)
    maxq = 2**n_bits - 1
    if symmetric:
        check_float_tensor(W, "W")
        granularity.check(W)
        Wf = W.detach().float()
        lo = granularity.reduce(Wf, torch.amin).clamp(max=0)
        hi = torch.maximum(-lo, granularity.reduce(Wf, torch.amax).clamp(min=0))
        scale = torch.where(lo < 0, hi + hi, hi) / maxq  # [-hi, hi], or [0, hi] when nothing is negative
        zero_point = torch.full_like(scale, 2 ** (n_bits - 1))
    else:
        qp = choose_qparams(W, n_bits, symmetric=False, granularity=granularity)
        scale, zero_point = qp.scale, qp.zero_point.float()
    # An all-zero row gets the range [-1, 1], computed as the reference computes it.
    all_zero = granularity.reduce(W.detach().abs().float(), torch.amax) == 0
    one = torch.ones((), device=W.device)
    scale_1 = (one + one) / maxq
    zero_1 = torch.full_like(one, 2 ** (n_bits - 1)) if symmetric else torch.round(one / scale_1)
    scale = torch.where(all_zero, scale_1, scale)
    zero_point = torch.where(all_zero, zero_1, zero_point)
    return QParams(scale.float(), zero_point.to(torch.int32), n_bits, False, granularity)


def check_weight(
    W: torch.Tensor, n_bits: int, group_size: int | None = None, allow_partial_group: bool = False
) -> None:
    """Raise ``ValueError`` unless ``W`` is a finite float ``[out, in]`` that ``group_size`` can split.

    Args:
        W: the weight.
        n_bits: 2..8.
        group_size: columns per group, or ``None`` (per channel). Must divide ``in`` unless
            ``allow_partial_group=True`` (a shorter last group, as GPTQ's reference silently accepts).
    """
    check_float_tensor(W, "W")
    if W.dim() != 2:
        raise ValueError(f"W must be a 2-D weight [out, in], got shape {tuple(W.shape)}")
    check_n_bits(n_bits)
    if group_size is None:
        return
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int or None (per channel), got {group_size!r}")
    if W.shape[1] % group_size and not allow_partial_group:
        divisors = [g for g in (16, 32, 64, 128, 256) if W.shape[1] % g == 0]
        raise ValueError(
            f"group_size={group_size} does not divide the {W.shape[1]} input columns of W: choose a divisor "
            f"(e.g. {divisors}) or pass allow_partial_group=True to accept a shorter last group, as the "
            "reference code silently does"
        )


def group_qparams(
    W: torch.Tensor, n_bits: int, *, symmetric: bool = False, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every group's ``(scale float32, zero_point int32)``, each ``[out, n_groups]``, from ``W [out, in]``.

    Groups are consecutive runs of ``group_size`` columns of ``W`` as given (``None``: one group, per
    channel); a shorter last group gets its own parameters. The grid is :func:`weight_qparams`.
    """
    if group_size is None:
        qp = weight_qparams(W, n_bits, symmetric=symmetric)
        return qp.scale, qp.zero_point
    full = W.shape[1] - W.shape[1] % group_size
    parts = []
    if full:
        parts.append(weight_qparams(W[:, :full], n_bits, symmetric=symmetric, granularity=PerGroup(group_size)))
    if full < W.shape[1]:  # a shorter last group (allow_partial_group=True)
        parts.append(weight_qparams(W[:, full:], n_bits, symmetric=symmetric))
    return torch.cat([p.scale for p in parts], 1), torch.cat([p.zero_point for p in parts], 1)


def rtn_quantize(
    W: torch.Tensor,
    n_bits: int,
    *,
    group_size: int | None = None,
    symmetric: bool = False,
    allow_partial_group: bool = False,
) -> QuantizedWeight:
    """Round-to-nearest on the weight grid (:func:`weight_qparams`): the baseline every table compares with.

    Equal to :func:`quantcourse.gptq.gptq_quantize` with ``H = I`` (no correlations, nothing to compensate).

    Args:
        W: float ``[out, in]``; not modified.
        n_bits: 2..8.
        group_size: columns sharing a scale (``None``: one per output row). Must divide ``in`` unless
            ``allow_partial_group=True``.
        symmetric: the reference's symmetric grid (see :func:`weight_qparams`); asymmetric by default.
        allow_partial_group: accept a shorter last group when ``group_size`` does not divide ``in``.

    Returns:
        :class:`QuantizedWeight` with ``loss=None`` and ``perm=None``; ``.weight`` has ``W``'s shape and dtype.
    """
    check_weight(W, n_bits, group_size, allow_partial_group)
    scale, zero = group_qparams(W.detach(), n_bits, symmetric=symmetric, group_size=group_size)
    g_idx = consecutive_g_idx(W.shape[1], group_size, W.device)
    s, z = scale[:, g_idx], zero[:, g_idx].float()
    codes = torch.clamp(torch.round(W.detach().float() / s) + z, 0, 2**n_bits - 1).to(torch.uint8)
    weight = dequantize_codes(codes, scale, zero, g_idx, W.dtype)
    return QuantizedWeight(weight, codes, scale, zero, n_bits, group_size, symmetric, g_idx=g_idx)


@dataclass(frozen=True)
class QuantizedModel:
    """A model whose linear layers were quantized, with what is needed to store it.

    Attributes:
        model: the model; its quantized linears hold the dequantized weights.
        layers: per qualified linear name, the codes and parameters (:class:`QuantizedWeight`).
        config: the settings used (method, n_bits, group_size, ...), JSON-serializable.
        seconds: wall time of the whole quantization.
        layer_seconds: per linear name, the time spent quantizing that layer alone.
    """

    model: nn.Module
    layers: dict[str, QuantizedWeight]
    config: dict[str, Any]
    seconds: float = 0.0
    layer_seconds: dict[str, float] = field(default_factory=dict)
