"""The quantization primitives: choose parameters, quantize, dequantize, fake-quantize.

Chapter 2 (Absmax and zero-point quantization) teaches these; chapter 3 adds granularity.
Every later chapter builds on them. All four are pure: they never modify their inputs.

Symmetric (absmax), ``n_bits`` = b::

    qmax = 2^(b-1) - 1,  qmin = -qmax,  scale = absmax / qmax,  zero_point = 0
    q = clamp(round(x / scale), qmin, qmax)

Asymmetric (zero-point), with the range widened to contain 0 so that 0 is exact::

    qmin = 0,  qmax = 2^b - 1,  scale = (max - min) / qmax,  zero_point = round(-min / scale)
    q = clamp(round(x / scale) + zero_point, qmin, qmax)

and in both cases ``dequantize(q) = (q - zero_point) * scale``. ``round`` is torch's
round-half-to-even, the same as ``torch.fake_quantize_per_*_affine``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .granularity import Granularity, PerTensor

__all__ = ["QParams", "choose_qparams", "quantize", "dequantize", "fake_quantize", "check_float_tensor", "check_n_bits"]

MIN_BITS, MAX_BITS = 2, 8
# A scale of exactly 0 (an all-zero group) would make x / scale = NaN; any tiny positive
# scale maps that group to its zero point and back to exactly 0.
SCALE_EPS = torch.finfo(torch.float32).eps


@dataclass(frozen=True)
class QParams:
    """Quantization parameters of one tensor.

    Attributes:
        scale: float32, shaped by ``granularity`` (see :mod:`quantcourse.granularity`).
        zero_point: int32, same shape as ``scale``; all zeros when ``symmetric``.
        n_bits: bits per code, 2..8.
        symmetric: absmax (True) or zero-point (False) scheme.
        granularity: which elements share a scale.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    n_bits: int
    symmetric: bool
    granularity: Granularity

    @property
    def qmin(self) -> int:
        return -(2 ** (self.n_bits - 1) - 1) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.n_bits - 1) - 1 if self.symmetric else 2**self.n_bits - 1

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.int8 if self.symmetric else torch.uint8


def check_n_bits(n_bits: int) -> None:
    """Raise ``ValueError`` unless ``n_bits`` is an int in [2, 8]."""
    if isinstance(n_bits, bool) or not isinstance(n_bits, int) or not MIN_BITS <= n_bits <= MAX_BITS:
        raise ValueError(f"n_bits must be an int from {MIN_BITS} to {MAX_BITS}, got {n_bits!r}")


def check_float_tensor(x: torch.Tensor, name: str = "x") -> None:
    """Raise a clear error unless ``x`` is a finite floating-point tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}; convert it with {name}.float()")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}): there is nothing to quantize")
    if not torch.isfinite(x).all():
        n_bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} contains {n_bad} NaN or Inf values: quantization needs finite inputs; "
                         "find where they come from (torch.isfinite) before quantizing")


def choose_qparams(
    x: torch.Tensor, n_bits: int, *, symmetric: bool = True, granularity: Granularity = PerTensor()
) -> QParams:
    """Compute scale and zero point from the range of ``x``.

    Args:
        x: float tensor of any shape (a weight ``[out, in]`` or activations ``[..., hidden]``).
        n_bits: 2..8.
        symmetric: absmax scheme if True, zero-point scheme otherwise.
        granularity: ``PerTensor()``, ``PerChannel(axis)``, ``PerToken()`` or ``PerGroup(g)``.

    Returns:
        ``QParams`` with float32 ``scale`` and int32 ``zero_point`` shaped by ``granularity``.
    """
    check_float_tensor(x)
    check_n_bits(n_bits)
    if not isinstance(granularity, Granularity):
        raise TypeError(f"granularity must be PerTensor(), PerChannel(axis), PerToken() or PerGroup(g), got {granularity!r}")
    granularity.check(x)
    xf = x.detach().float()
    if symmetric:
        qmax = 2 ** (n_bits - 1) - 1
        absmax = granularity.reduce(xf.abs(), torch.amax)
        scale = (absmax / qmax).clamp(min=SCALE_EPS)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        qmax = 2**n_bits - 1
        lo = granularity.reduce(xf, torch.amin).clamp(max=0)
        hi = granularity.reduce(xf, torch.amax).clamp(min=0)
        scale = ((hi - lo) / qmax).clamp(min=SCALE_EPS)
        zero_point = torch.round(-lo / scale).clamp(0, qmax).to(torch.int32)
    return QParams(scale, zero_point, n_bits, symmetric, granularity)


def quantize(x: torch.Tensor, qparams: QParams) -> torch.Tensor:
    """Map ``x`` to integer codes: ``clamp(round(x / scale) + zero_point, qmin, qmax)``.

    Returns an int8 tensor (symmetric) or uint8 tensor (asymmetric) of ``x``'s shape.
    """
    check_float_tensor(x)
    qparams.granularity.check(x)
    g = qparams.granularity
    scale = g.expand(qparams.scale, x)
    zero_point = g.expand(qparams.zero_point, x)
    q = torch.round(x.detach().float() / scale) + zero_point
    return q.clamp(qparams.qmin, qparams.qmax).to(qparams.code_dtype)


def dequantize(q: torch.Tensor, qparams: QParams, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Map integer codes back to floats: ``(q - zero_point) * scale``, as ``dtype``."""
    if not isinstance(q, torch.Tensor) or q.is_floating_point() or q.dtype == torch.bool:
        raise TypeError(f"q must be an integer tensor of codes (from quantize), got "
                        f"{q.dtype if isinstance(q, torch.Tensor) else type(q).__name__}")
    g = qparams.granularity
    g.check(q)
    scale = g.expand(qparams.scale, q)
    zero_point = g.expand(qparams.zero_point, q)
    return ((q.to(torch.int32) - zero_point).float() * scale).to(dtype)


def fake_quantize(
    x: torch.Tensor, n_bits: int, *, symmetric: bool = True, granularity: Granularity = PerTensor()
) -> torch.Tensor:
    """Quantize and dequantize in one step: the float values the integer model would compute with.

    Returns a tensor of ``x``'s shape and dtype.
    """
    qparams = choose_qparams(x, n_bits, symmetric=symmetric, granularity=granularity)
    return dequantize(quantize(x, qparams), qparams, dtype=x.dtype)
