"""Activation quantization: static (calibrated once) or dynamic (per token, at run time); WxAy models.

Chapter 4 (PTQ calibration) teaches these. Weights are known before the model runs; activations
are not. Two ways to give them a grid:

- **static**: run calibration batches through the model, let an observer
  (:mod:`quantcourse.calibration`) watch each layer's input and fix one range per tensor (or per
  channel) for good: no work at run time, but every future input must fit that range;
- **dynamic**: compute the range of every token when it arrives (``PerToken()``): each token gets
  its own scale, at the cost of a min/max reduction per token at run time.

:func:`quantize_model_w_a` turns a model into a fake-quantized ``WxAy`` model (weights fake-quantized
per channel or per group, activations static or dynamic) and :func:`restore_float_linears` undoes it.
Fake quantization means the values are rounded to the integer grid but the arithmetic stays float:
it measures the accuracy of the integer model, not its speed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn import functional as F

from . import surgery
from .calibration import Observer, make_observer
from .granularity import Granularity, PerChannel, PerGroup, PerTensor, PerToken
from .primitives import QParams, check_n_bits, choose_qparams, fake_quantize, fake_quantize_ste
from .progress import progress_bar

__all__ = [
    "fake_quantize_per_token",
    "ActivationQuantizer",
    "QuantizedLinear",
    "calibrate_linear_inputs",
    "quantize_model_w_a",
    "restore_float_linears",
]


def fake_quantize_per_token(x: torch.Tensor, n_bits: int, *, symmetric: bool = True) -> torch.Tensor:
    """Dynamic per-token fake quantization, differentiable with the straight-through estimator.

    Each token (each row of the last dimension) gets its own range, computed from ``x`` as it arrives:
    ``fake_quantize_ste(x, choose_qparams(x, n_bits, granularity=PerToken()))``.

    Args:
        x: float ``[..., hidden]``; not modified.
        n_bits: 2..8.
        symmetric: absmax (default) or zero-point ranges.

    Returns:
        a tensor of ``x``'s shape and dtype; its gradient is 1 inside each token's range (everywhere,
        since the range is the token's own).
    """
    return fake_quantize_ste(x, choose_qparams(x.detach(), n_bits, symmetric=symmetric, granularity=PerToken()))


class ActivationQuantizer(nn.Module):
    """Fake-quantizes activations ``[..., hidden]``: statically with fixed ``QParams``, or dynamically per token.

    Build it with :meth:`static` or :meth:`dynamic`. The forward is differentiable with the
    straight-through estimator (chapter 5), so the same module serves PTQ and QAT experiments.
    """

    def __init__(
        self,
        n_bits: int,
        *,
        qparams: QParams | None = None,
        symmetric: bool = True,
        granularity: PerToken | PerTensor = PerToken(),
    ) -> None:
        super().__init__()
        check_n_bits(n_bits)
        if not isinstance(granularity, (PerToken, PerTensor)):
            raise ValueError(
                f"dynamic activation ranges are per token (PerToken()) or per tensor (PerTensor()), got {granularity!r}"
            )
        self.n_bits, self.qparams, self.symmetric, self.granularity = n_bits, qparams, symmetric, granularity

    @classmethod
    def static(cls, qparams: QParams) -> ActivationQuantizer:
        """Always use ``qparams`` (e.g. ``observer.qparams(8)``), whatever the input."""
        if not isinstance(qparams, QParams):
            raise TypeError(
                f"static activation quantization needs QParams (from an observer), got {type(qparams).__name__}"
            )
        return cls(qparams.n_bits, qparams=qparams, symmetric=qparams.symmetric)

    @classmethod
    def dynamic(
        cls, n_bits: int, *, symmetric: bool = True, granularity: PerToken | PerTensor = PerToken()
    ) -> ActivationQuantizer:
        """Compute the range when the input arrives: per token (``PerToken()``) or per tensor (``PerTensor()``)."""
        return cls(n_bits, symmetric=symmetric, granularity=granularity)

    @property
    def is_static(self) -> bool:
        return self.qparams is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_static:
            qp = self.qparams
            if qp.scale.dim() and tuple(qp.scale.shape) != qp.granularity.param_shape(x.shape):
                shape = qp.granularity.param_shape(x.shape)  # per-channel ranges fitted to this input's rank
                qp = QParams(
                    qp.scale.reshape(shape), qp.zero_point.reshape(shape), qp.n_bits, qp.symmetric, qp.granularity
                )
            return fake_quantize_ste(x, qp)
        if isinstance(self.granularity, PerToken):
            return fake_quantize_per_token(x, self.n_bits, symmetric=self.symmetric)
        return fake_quantize_ste(
            x, choose_qparams(x.detach(), self.n_bits, symmetric=self.symmetric, granularity=self.granularity)
        )

    def extra_repr(self) -> str:
        kind = "per token" if isinstance(self.granularity, PerToken) else "per tensor"
        return f"n_bits={self.n_bits}, {'static' if self.is_static else 'dynamic ' + kind}"


class QuantizedLinear(nn.Module):
    """A linear layer with fake-quantized weights (fixed) and fake-quantized inputs: ``fq(x) @ fq(W).T + b``.

    Keeps the float layer it came from (``.linear``) so that :func:`restore_float_linears` can put it back.

    Args:
        linear: the float layer.
        w_bits: weight bits; weights are symmetric, per output channel or per group of ``w_group_size``
            input columns.
        w_granularity: overrides that choice, e.g. ``PerTensor()`` (SmoothQuant's O1-O3 levels).
        act: how inputs are quantized (``None``: not at all).
    """

    def __init__(
        self,
        linear: nn.Linear,
        *,
        w_bits: int = 8,
        w_group_size: int | None = None,
        act: ActivationQuantizer | None = None,
        w_granularity: Granularity | None = None,
    ) -> None:
        super().__init__()
        self.linear, self.act = linear, act
        granularity = PerChannel(0) if w_group_size is None else PerGroup(w_group_size)
        if w_granularity is not None:
            if w_group_size is not None:
                raise ValueError("give w_group_size or w_granularity, not both")
            granularity = w_granularity
        self.register_buffer("weight", fake_quantize(linear.weight.detach(), w_bits, granularity=granularity))
        self.w_bits, self.w_group_size = w_bits, w_group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x if self.act is None else self.act(x), self.weight, self.linear.bias)


@torch.no_grad()
def calibrate_linear_inputs(
    model: nn.Module,
    calibration_batches: Iterable[torch.Tensor],
    observer: str | Callable[[], Observer] = "minmax",
    *,
    include_head: bool = False,
    progress: bool = True,
) -> dict[str, Observer]:
    """Run the calibration batches through ``model`` and let one observer watch each linear layer's input.

    Every ``nn.Linear`` (found by :func:`quantcourse.surgery.find_linears`) feeds its input to its
    observer through :func:`quantcourse.surgery.record_inputs`; the hooks are removed afterwards, even
    on error. The model is not changed.

    Args:
        model: a causal LM (or any module whose linears should be watched).
        calibration_batches: token ids ``[batch, seq]`` (e.g. ``data.calibration_samples(...).split(4)``).
        observer: a name from :data:`quantcourse.calibration.OBSERVERS` or a zero-argument factory.

    Returns:
        ``{linear name: observer}``.
    """
    factory = (lambda: make_observer(observer)) if isinstance(observer, str) else observer
    linears = surgery.find_linears(model, include_head=include_head)
    observers = {name: factory() for name in linears}
    device = next(model.parameters()).device
    with surgery.record_inputs(linears, lambda name, linear, x: observers[name].update(x), flatten=False):
        for batch in progress_bar(list(calibration_batches), desc="calibrating", disable=not progress, leave=False):
            model(batch.to(device))
    return observers


def quantize_model_w_a(
    model: nn.Module,
    calibration_batches: Iterable[torch.Tensor] | None = None,
    *,
    w_bits: int = 8,
    a_bits: int = 8,
    observer: str | Callable[[], Observer] = "minmax",
    dynamic: bool = False,
    w_group_size: int | None = None,
    a_symmetric: bool = True,
    observers: dict[str, Observer] | None = None,
    include_head: bool = False,
    progress: bool = True,
) -> nn.Module:
    """Turn ``model`` into a fake-quantized ``W{w_bits}A{a_bits}`` model, in place; returns it.

    Static (default): the inputs of every linear layer are calibrated on ``calibration_batches`` with
    ``observer`` (or taken from ``observers``, the result of :func:`calibrate_linear_inputs`, to reuse
    one calibration for several bit widths) and quantized per tensor. ``dynamic=True``: per-token
    ranges at run time, no calibration data needed. Undo with :func:`restore_float_linears`.
    """
    check_n_bits(w_bits)
    check_n_bits(a_bits)
    if dynamic and (calibration_batches is not None or observers is not None):
        raise ValueError(
            "dynamic=True computes each token's range at run time, so calibration_batches and observers would be "
            "ignored: drop them, or use dynamic=False for static ranges from them"
        )
    if w_group_size is not None and (
        isinstance(w_group_size, bool) or not isinstance(w_group_size, int) or w_group_size < 1
    ):
        raise ValueError(f"w_group_size must be a positive int or None (per channel), got {w_group_size!r}")
    for name, linear in surgery.find_linears(model, include_head=include_head).items():
        if w_group_size is not None and linear.in_features % w_group_size:
            raise ValueError(
                f"w_group_size={w_group_size} does not divide the {linear.in_features} inputs of {name}: choose a "
                "divisor of every layer's input width (64 for the course model), or None for per channel"
            )
    if not dynamic and observers is None:
        if calibration_batches is None:
            raise ValueError(
                "static activation quantization needs calibration_batches (or observers=...); "
                "pass dynamic=True for per-token ranges without calibration"
            )
        observers = calibrate_linear_inputs(
            model, calibration_batches, observer, include_head=include_head, progress=progress
        )

    def make(name: str, linear: nn.Linear) -> QuantizedLinear:
        if dynamic:
            act = ActivationQuantizer.dynamic(a_bits, symmetric=a_symmetric)
        else:
            act = ActivationQuantizer.static(observers[name].qparams(a_bits, symmetric=a_symmetric))
        return QuantizedLinear(linear, w_bits=w_bits, w_group_size=w_group_size, act=act)

    return surgery.replace_linears(model, make, include_head=include_head)


def restore_float_linears(model: nn.Module) -> nn.Module:
    """Put every :class:`QuantizedLinear`'s float layer back, in place; returns ``model``."""
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]:
        surgery.set_module(model, name, module.linear)
    return model
