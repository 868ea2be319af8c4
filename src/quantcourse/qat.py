"""Quantization-aware training: the straight-through estimator, LSQ, fake-quantized layers, prepare/convert.

Chapter 5 (Quantization-aware training) teaches these.

``round`` has zero gradient almost everywhere, so a network that rounds in its forward pass cannot
learn through it. The **straight-through estimator** (STE, Bengio et al. 2013) keeps the rounded
forward and pretends the backward is the identity: gradient 1 where the value was inside the
quantization range, 0 where it was clipped. **LSQ** (Esser et al., ICLR 2020) also learns the step
size ``s``: with ``Q_N, Q_P`` the code range,

    v_hat = round(clip(v / s, -Q_N, Q_P)) * s
    d v_hat / d s = -v/s + round(v/s)  inside,   -Q_N  below,   Q_P  above

and the gradient of ``s`` is multiplied by ``g = 1 / sqrt(N * Q_P)`` (``N`` = weights of the layer, or
features of one input) so that steps and weights learn at similar rates. **LSQ+** (Bhalgat et al.
2020) adds a learned offset ``beta`` for asymmetric activations:
``v_hat = round(clip((v - beta) / s, 0, 2^b - 1)) * s + beta``.

The gradient tricks here are custom ``torch.autograd.Function`` s: their forward is exactly
``round(x)`` or ``x`` (the often-copied ``(x.round() - x).detach() + x`` is not always bit-exact), so
the fake-quantized model and the converted integer model (:func:`convert`) compute the same numbers.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from . import surgery
from .activations import fake_quantize_per_token
from .granularity import Granularity, PerChannel, PerGroup, PerTensor
from .primitives import SCALE_EPS, QParams, check_n_bits, dequantize, quantize

__all__ = [
    "RoundSTE",
    "round_ste",
    "GradScale",
    "grad_scale",
    "lsq_fake_quantize",
    "lsq_init_scale",
    "LSQQuantizer",
    "QATLinear",
    "IntWeightLinear",
    "prepare",
    "convert",
]


class RoundSTE(torch.autograd.Function):
    """``round(x)`` forward, identity backward: the straight-through estimator."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest (half to even) with a straight-through gradient of 1 (chapter 5)."""
    return RoundSTE.apply(x)


class GradScale(torch.autograd.Function):
    """Identity forward, gradient multiplied by ``g`` backward (LSQ's gradient scale)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, g: float) -> torch.Tensor:
        ctx.g = g
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.g, None


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """``x`` unchanged, whose gradient is scaled by ``g``."""
    return GradScale.apply(x, g)


def lsq_fake_quantize(
    v: torch.Tensor, scale: torch.Tensor, *, qn: int, qp: int, g: float, offset: torch.Tensor | None = None
) -> torch.Tensor:
    """LSQ (and LSQ+ with ``offset``): ``round(clip((v - beta) / s, -qn, qp)) * s + beta``.

    Gradients, all by autograd through :func:`round_ste` and :func:`grad_scale` (Esser et al. 2020,
    eq. 3; with ``u = (v - beta) / s``): ``v`` gets 1 inside the range and 0 outside; ``s`` gets
    ``-u + round(u)`` inside, ``-qn`` below, ``qp`` above, times ``g``; ``beta`` gets 0 inside and 1
    outside, times ``g``.

    Args:
        v: float tensor; ``scale`` (and ``offset``) must broadcast against it.
        qn, qp: the code range ``[-qn, qp]``: ``2^(b-1), 2^(b-1) - 1`` signed, ``0, 2^b - 1`` unsigned.
        g: gradient scale, ``1 / sqrt(N * qp)``.
    """
    s = grad_scale(scale, g)
    if offset is not None:
        beta = grad_scale(offset, g)
        return round_ste(torch.clamp((v - beta) / s, -qn, qp)) * s + beta
    return round_ste(torch.clamp(v / s, -qn, qp)) * s


def lsq_init_scale(
    v: torch.Tensor, qp: int, granularity: Granularity = PerTensor(), *, method: str = "lsq"
) -> torch.Tensor:
    """Initial step size, one per ``granularity`` parameter.

    ``method="lsq"``: the paper's ``2 * mean|v| / sqrt(Q_P)`` (meant for training from scratch or for
    long fine-tuning); ``"minmax"``: ``max|v| / Q_P``, the round-to-nearest grid of chapter 3, the
    better start when the training budget is short (QAT then starts from the PTQ model).
    """
    if method not in ("lsq", "minmax"):
        raise ValueError(f"method must be 'lsq' or 'minmax', got {method!r}")
    v = v.detach().abs().float()
    if method == "minmax":
        return (granularity.reduce(v, torch.amax) / qp).clamp(min=SCALE_EPS)
    return (2 * granularity.reduce(v, torch.mean) / math.sqrt(qp)).clamp(min=SCALE_EPS)


class LSQQuantizer(nn.Module):
    """A learned-step-size fake quantizer (LSQ), with an optional learned offset (LSQ+).

    Signed (``offset=False``): codes ``-2^(b-1) .. 2^(b-1) - 1``. With ``offset=True`` the codes are
    ``0 .. 2^b - 1`` and ``beta`` shifts the grid (for activations that are not centred at 0).
    The step starts at ``2 mean|v| / sqrt(Q_P)`` (LSQ+: ``s = (max - min) / (2^b - 1)``, ``beta = min``)
    on the first tensor seen, unless ``init`` is given.

    Args:
        n_bits: 2..8.
        granularity: ``PerTensor()`` (activations), ``PerChannel(0)`` or ``PerGroup(g)`` (weights).
        param_shape: shape of ``scale`` (``granularity.param_shape`` of the tensors to quantize).
        offset: learn ``beta`` too (LSQ+).
        init: a tensor to initialize from now (a weight); otherwise the first forward input.
        init_method: ``"lsq"`` or ``"minmax"`` (see :func:`lsq_init_scale`).
    """

    def __init__(
        self,
        n_bits: int,
        *,
        granularity: Granularity = PerTensor(),
        param_shape: tuple[int, ...] = (),
        offset: bool = False,
        init: torch.Tensor | None = None,
        init_method: str = "lsq",
    ) -> None:
        super().__init__()
        check_n_bits(n_bits)
        self.n_bits, self.granularity, self.init_method = n_bits, granularity, init_method
        self.qn, self.qp = (0, 2**n_bits - 1) if offset else (2 ** (n_bits - 1), 2 ** (n_bits - 1) - 1)
        self.scale = nn.Parameter(torch.ones(param_shape))
        self.offset = nn.Parameter(torch.zeros(param_shape)) if offset else None
        self.register_buffer("initialized", torch.tensor(False))
        if init is not None:
            self.initialize(init)

    @torch.no_grad()
    def initialize(self, v: torch.Tensor) -> None:
        """Set the step (and offset) from ``v`` as LSQ (LSQ+) prescribes."""
        if self.offset is None:
            self.scale.copy_(lsq_init_scale(v, self.qp, self.granularity, method=self.init_method))
        else:
            lo, hi = self.granularity.reduce(v.float(), torch.amin), self.granularity.reduce(v.float(), torch.amax)
            self.scale.copy_(((hi - lo) / self.qp).clamp(min=SCALE_EPS))
            self.offset.copy_(lo)
        self.initialized.fill_(True)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            self.initialize(v)
        # N: the weights of the layer, or the features of one input example (LSQ's N_W and N_F)
        n = v.numel() if v.dim() < 2 or not isinstance(self.granularity, PerTensor) else v[0].numel()
        g = 1.0 / math.sqrt(n * self.qp)
        vg, scale = self.granularity.broadcast(v, self.scale)
        offset = None if self.offset is None else self.granularity.broadcast(v, self.offset)[1]
        return lsq_fake_quantize(vg, scale, qn=self.qn, qp=self.qp, g=g, offset=offset).reshape(v.shape)

    def qparams(self) -> QParams:
        """The learned grid as ``QParams`` (weights: signed codes stored as ``uint8`` with zero point ``2^(b-1)``)."""
        if self.offset is not None:
            raise ValueError(
                "an LSQ+ offset is not an integer zero point: convert keeps offset quantizers "
                "(activations) as fake quantizers; use offset=False for weights"
            )
        scale = self.scale.detach().clone()
        zero_point = torch.full_like(scale, self.qn, dtype=torch.int32)
        return QParams(scale, zero_point, self.n_bits, False, self.granularity)


def _quantize_input(x: torch.Tensor, a_bits: int | None, a_mode: str, act_quantizer: nn.Module | None) -> torch.Tensor:
    """The activation fake quantization of a QAT layer (identity when ``a_bits`` is None)."""
    if a_bits is None:
        return x
    if a_mode == "dynamic":
        return fake_quantize_per_token(x, a_bits)
    return act_quantizer(x)


class QATLinear(nn.Module):
    """A linear layer that trains through fake-quantized weights (LSQ) and activations.

    ``y = fq_a(x) @ fq_w(W).T + b``. Weights: LSQ per channel (``w_group_size=None``) or per group of
    input columns. Activations: ``None`` (not quantized), ``"lsq"`` (a learned per-tensor step),
    ``"lsq+"`` (learned step and offset) or ``"dynamic"`` (per-token min-max, STE).
    ``weight`` and ``bias`` are the float layer's own parameters (not copies).
    """

    def __init__(
        self,
        linear: nn.Linear,
        *,
        w_bits: int = 4,
        w_group_size: int | None = None,
        a_bits: int | None = None,
        a_mode: str = "lsq",
        w_init: str = "lsq",
    ) -> None:
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        granularity = PerChannel(0) if w_group_size is None else PerGroup(w_group_size)
        granularity.check(self.weight)
        self.weight_quantizer = LSQQuantizer(
            w_bits,
            granularity=granularity,
            param_shape=granularity.param_shape(self.weight.shape),
            init=self.weight,
            init_method=w_init,
        )
        if a_mode not in ("lsq", "lsq+", "dynamic"):
            raise ValueError(f"a_mode must be 'lsq', 'lsq+' or 'dynamic', got {a_mode!r}")
        self.a_bits, self.a_mode = a_bits, a_mode
        self.act_quantizer = (
            LSQQuantizer(a_bits, offset=a_mode == "lsq+") if a_bits is not None and a_mode != "dynamic" else None
        )
        if a_bits is not None:
            check_n_bits(a_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _quantize_input(x, self.a_bits, self.a_mode, self.act_quantizer)
        return F.linear(x, self.weight_quantizer(self.weight), self.bias)


class IntWeightLinear(nn.Module):
    """A linear layer that stores integer weight codes and their ``QParams``; its forward dequantizes.

    What :func:`convert` makes of a :class:`QATLinear`: codes ``uint8 [out, in]`` (``uint8`` holds the
    signed LSQ range shifted by the zero point ``2^(b-1)``, as GPTQ stores 4-bit codes), ``scale``
    shaped per channel or per group; the activation quantizer is kept as it was trained.
    """

    def __init__(self, qat: QATLinear) -> None:
        super().__init__()
        qparams = qat.weight_quantizer.qparams()
        self.register_buffer("codes", quantize(qat.weight.detach(), qparams))
        self.register_buffer("scale", qparams.scale)
        self.register_buffer("zero_point", qparams.zero_point)
        self.n_bits, self.granularity = qparams.n_bits, qparams.granularity
        self.bias = None if qat.bias is None else nn.Parameter(qat.bias.detach().clone(), requires_grad=False)
        self.a_bits, self.a_mode, self.act_quantizer = qat.a_bits, qat.a_mode, qat.act_quantizer
        if self.act_quantizer is not None:
            self.act_quantizer.requires_grad_(False)

    @property
    def qparams(self) -> QParams:
        return QParams(self.scale, self.zero_point, self.n_bits, False, self.granularity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _quantize_input(x, self.a_bits, self.a_mode, self.act_quantizer)
        return F.linear(x, dequantize(self.codes, self.qparams, x.dtype), self.bias)


def prepare(
    model: nn.Module,
    *,
    w_bits: int = 4,
    w_group_size: int | None = None,
    a_bits: int | None = None,
    a_mode: str = "lsq",
    w_init: str = "lsq",
    include_head: bool = False,
    names=lambda name: True,
) -> nn.Module:
    """Float model -> fake-quantized trainable model: every selected ``nn.Linear`` becomes a :class:`QATLinear`.

    In place (the linear layers are swapped through :mod:`quantcourse.surgery`); returns ``model``.
    Weight steps are initialized from the weights now (``w_init``: ``"lsq"`` or ``"minmax"``, see
    :func:`lsq_init_scale`); activation steps on the first batch.
    """
    check_n_bits(w_bits)
    return surgery.replace_linears(
        model,
        lambda name, linear: QATLinear(
            linear, w_bits=w_bits, w_group_size=w_group_size, a_bits=a_bits, a_mode=a_mode, w_init=w_init
        ),
        include_head=include_head,
        names=names,
    )


def convert(model: nn.Module) -> nn.Module:
    """Fake-quantized model -> integer weights: every :class:`QATLinear` becomes an :class:`IntWeightLinear`.

    In place; returns ``model``. Its outputs equal the fake-quantized model's (same codes, same scales).
    """
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, QATLinear)]
    if not found:
        raise ValueError("convert found no QATLinear layers: call quantcourse.qat.prepare(model) (and train) first")
    for name, module in found:
        surgery.set_module(model, name, IntWeightLinear(module))
    return model
