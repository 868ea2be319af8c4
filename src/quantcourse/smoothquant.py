"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights, then run W8A8.

Chapter 8 teaches it. LLM activations have a few input channels whose magnitude is 10-100x the
others' in every token; one per-tensor (or per-token) int8 grid then spends its 255 levels on those
channels and rounds everything else to a handful of values. Weights have no such outliers. SmoothQuant
divides each input channel ``j`` of a linear layer's input by a factor ``s_j`` and multiplies the
matching weight column by it, which leaves the product unchanged::

    Y = X W^T = (X diag(s)^-1) (W diag(s))^T,     s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

``alpha`` sets how much of the difficulty moves to the weights: with 1 all of it (every smoothed input
channel then peaks at exactly 1 and the weight columns carry the activation ranges), with 0 none and
more (every weight column then peaks at 1 and the activations carry the weight ranges too); 0.5
splits it evenly (both peak at ``sqrt(max|X_j| max|W_j|)``). The division of ``X``
costs nothing at run time: it is folded into the weight (and bias) of the norm that produces ``X``.
So only linears fed by a norm can be smoothed: q/k/v (attention norm) and gate/up (FFN norm) in a
Llama block; o_proj and down_proj are quantized as they are, as in the authors' code.

The pieces, as in mit-han-lab/smoothquant:

- statistics (``calibration.py``): :class:`ActMaxCollector` keeps the running max ``|x|`` of every
  input channel of every linear over the calibration tokens; :func:`collect_act_scales` runs it on a
  whole model;
- factors and fold (``smooth.py``): :func:`weight_channel_absmax`, :func:`smoothing_factors`,
  :func:`fold_smoothing` (norm weight and bias ``/= s``, weight columns ``*= s``); :func:`smooth_model`
  applies them to every norm-fed group that :func:`quantcourse.surgery.scale_groups` names;
- W8A8 (``fake_quant.py``): :func:`quantize_w8a8` swaps every linear for an activation-quantized one
  of :mod:`quantcourse.activations`: symmetric absmax int8 weights per output channel (or per tensor),
  activations per token (dynamic), per tensor (dynamic) or per tensor with a range fixed from the
  calibration statistics (static). The paper's efficiency levels O1/O2/O3 are these three activation
  modes with per-tensor weights (:data:`PAPER_LEVELS`);
- the integer path: :func:`int8_matmul` (int8 x int8 -> int32, ``torch._int_mm`` where it runs, an
  exact integer fallback elsewhere) and :class:`Int8Linear`, whose output is the int32 accumulator
  times the per-token and per-channel scales: the fake-quantized result up to float rounding.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from . import surgery
from .activations import ActivationQuantizer, QuantizedLinear
from .granularity import PerChannel, PerTensor, PerToken
from .pipeline import check_calibration as check_token_batches
from .primitives import QParams, check_float_tensor, choose_qparams, quantize
from .progress import progress_bar

__all__ = [
    "CLAMP_MIN",
    "PAPER_LEVELS",
    "ActMaxCollector",
    "Int8Linear",
    "SmoothQuantReport",
    "SmoothReport",
    "channel_absmax",
    "check_alpha",
    "collect_act_scales",
    "fold_smoothing",
    "int8_matmul",
    "int8_linear",
    "outlier_ratio",
    "quantize_per_token_int8",
    "quantize_weight_int8",
    "quantize_w8a8",
    "smooth_model",
    "smooth_norm_linears",
    "smoothing_factors",
    "smoothquant_model",
    "static_act_qparams",
    "weight_channel_absmax",
]

# The reference clamps both the weight maxima and the factors to at least 1e-5 (smooth.py), and
# every absmax before dividing by 127 (fake_quant.py).
CLAMP_MIN = 1e-5
QMAX = 127  # symmetric int8: codes in [-127, 127], as the reference's q_max = 2**7 - 1

ActMode = Literal["per_token", "per_tensor", "static"]
WeightMode = Literal["per_channel", "per_tensor"]
ACT_MODES: tuple[str, ...] = ("per_token", "per_tensor", "static")
WEIGHT_MODES: tuple[str, ...] = ("per_channel", "per_tensor")

# SmoothQuant paper, Table 2: every level quantizes weights per tensor; the activations are
# per-token dynamic (O1), per-tensor dynamic (O2) or per-tensor static (O3).
PAPER_LEVELS: dict[str, dict[str, str]] = {
    "O1": {"weights": "per_tensor", "activations": "per_token"},
    "O2": {"weights": "per_tensor", "activations": "per_tensor"},
    "O3": {"weights": "per_tensor", "activations": "static"},
}


# ----------------------------------------------------------------------------------------------
# checks


def check_alpha(alpha: float) -> float:
    """Return ``alpha`` as a float; raise ``ValueError`` unless it is a number in [0, 1]."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(
            f"alpha (the migration strength) must be a number in [0, 1], got {alpha!r}: 0 leaves the "
            "activations as they are, 1 moves all of their range into the weights; the paper uses 0.5, "
            "the authors' scripts 0.8-0.9 for Llama-2/3 and Mistral"
        )
    return float(alpha)


def _check_mode(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def _check_channel_vector(t: torch.Tensor, name: str, n: int | None = None) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or not t.is_floating_point():
        raise ValueError(
            f"{name} must be a 1-D float tensor [in_features], got "
            f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}"
        )
    if n is not None and t.numel() != n:
        raise ValueError(f"{name} has {t.numel()} channels, but the layers have {n} input features")
    if not torch.isfinite(t).all() or (t < 0).any():
        raise ValueError(f"{name} must hold finite, non-negative maxima; got min {t.min().item():.3g}")


# ----------------------------------------------------------------------------------------------
# activation statistics (the reference's calibration.py)


def channel_absmax(x: torch.Tensor) -> torch.Tensor:
    """Max ``|x|`` of every channel (last dim) over all tokens: ``[..., in]`` -> float32 ``[in]``."""
    check_float_tensor(x, "x")
    x = x.detach().reshape(-1, x.shape[-1])
    # max(amax, -amin): two reductions and no |x| copy of the activations
    return torch.maximum(x.amax(dim=0), x.amin(dim=0).neg()).float()


class ActMaxCollector:
    """Running per-input-channel max ``|x|`` of chosen linear layers, fed batch by batch.

    Linears that read the same tensor (q/k/v, gate/up) are handed the same object in one forward
    pass; the collector reduces it once and gives them the same maxima.

    Attributes:
        maxima: ``{name: float32 [in_features]}``, on the CPU.
        n_tokens: ``{name: tokens seen}``.
    """

    def __init__(self) -> None:
        self.maxima: dict[str, torch.Tensor] = {}
        self.n_tokens: dict[str, int] = {}
        self._last: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)

    def update(self, name: str, x: torch.Tensor) -> None:
        """Fold a batch of inputs ``x [..., in]`` of layer ``name`` into its running max.

        Also usable as :func:`quantcourse.surgery.record_inputs`' ``on_input(name, module, x)`` through
        :meth:`on_input`.
        """
        if x is self._last[0]:
            batch_max = self._last[1]
        else:
            batch_max = channel_absmax(x).cpu()
            self._last = (x, batch_max)
        old = self.maxima.get(name)
        self.maxima[name] = batch_max.clone() if old is None else torch.maximum(old, batch_max)
        self.n_tokens[name] = self.n_tokens.get(name, 0) + x.numel() // x.shape[-1]

    def on_input(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        """The ``on_input`` callback of :func:`quantcourse.surgery.record_inputs`."""
        self.update(name, x)

    def reset_shared(self) -> None:
        """Forget the last input (call between forward passes so no stale tensor is kept alive)."""
        self._last = (None, None)


def _check_calibration(calibration: torch.Tensor, batch_size: int) -> None:
    check_token_batches(calibration, batch_size)  # int64 [n_samples, seq_len], positive batch size
    if calibration.numel() == 0:
        raise ValueError(
            f"calibration holds no tokens (shape {tuple(calibration.shape)}): the activation maxima need at "
            "least one sequence, e.g. quantcourse.data.calibration_samples(tokenizer, 32, 512)"
        )


@torch.no_grad()
def collect_act_scales(
    model: nn.Module,
    calibration: torch.Tensor,
    *,
    batch_size: int = 8,
    include_head: bool = False,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Per-input-channel max ``|x|`` of every linear layer's input over ``calibration``.

    One forward pass of the float model per batch, with hooks on its linears (the reference's
    ``get_act_scales``). The model is not changed.

    Args:
        model: a causal LM.
        calibration: int64 token ids ``[n_samples, seq_len]``.
        batch_size: sequences per forward pass.
        include_head: also watch ``lm_head``.
        progress: show a progress bar over the batches.

    Returns:
        ``{linear name: float32 [in_features]}`` on the CPU.
    """
    _check_calibration(calibration, batch_size)
    linears = surgery.find_linears(model, include_head=include_head)
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layers to collect statistics for")
    collector = ActMaxCollector()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for batch in progress_bar(
            calibration.split(batch_size), desc="activation maxima", disable=not progress, leave=False
        ):
            with surgery.record_inputs(linears, collector.on_input):
                model(input_ids=batch.to(device), use_cache=False)
            collector.reset_shared()
    finally:
        model.train(was_training)
    return collector.maxima


# ----------------------------------------------------------------------------------------------
# smoothing factors and the fold (the reference's smooth.py)


def weight_channel_absmax(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """Max ``|W_ij|`` of every input column ``j`` over all the weights that share an input.

    Args:
        weights: ``[out_k, in]`` each (same ``in``), e.g. q, k and v.

    Returns:
        float32 ``[in]``, clamped to at least ``CLAMP_MIN`` (1e-5) as the reference does.
    """
    if not weights:
        raise ValueError("weight_channel_absmax needs at least one weight [out, in]")
    n_in = {w.shape[-1] for w in weights}
    if any(w.dim() != 2 for w in weights) or len(n_in) != 1:
        raise ValueError(
            "weights that share an input must all be [out, in] with the same in; got "
            f"{[tuple(w.shape) for w in weights]}"
        )
    col_max = torch.stack([w.detach().abs().amax(dim=0).float() for w in weights])  # [n_linears, in]
    return col_max.amax(dim=0).clamp(min=CLAMP_MIN)


def smoothing_factors(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``, clamped to at least 1e-5.

    Args:
        act_max: float ``[in]``, the calibration max ``|x|`` per input channel.
        weight_max: float ``[in]``, from :func:`weight_channel_absmax`.
        alpha: migration strength in [0, 1].

    Returns:
        float32 ``[in]``. Dividing the input by ``s`` and multiplying the weight columns by ``s`` leaves
        the layer's output unchanged; afterwards channel ``j`` of the input peaks at
        ``max|X_j|^(1-alpha) max|W_j|^(1-alpha)`` and its weight column at ``max|X_j|^alpha max|W_j|^alpha``.
    """
    alpha = check_alpha(alpha)
    _check_channel_vector(act_max, "act_max")
    _check_channel_vector(weight_max, "weight_max", act_max.numel())
    weight_max = weight_max.float().clamp(min=CLAMP_MIN)
    return (act_max.float().pow(alpha) / weight_max.pow(1.0 - alpha)).clamp(min=CLAMP_MIN)


def fold_smoothing(norm: nn.Module, linears: Sequence[nn.Linear], s: torch.Tensor) -> None:
    """Fold ``s`` in place: ``norm.weight /= s`` (and ``norm.bias``), each ``linear.weight[:, j] *= s_j``.

    ``norm`` is a LayerNorm or RMSNorm whose output feeds all of ``linears``; the block then computes
    the same function. The fold itself is :func:`quantcourse.surgery.fold_scales` (shared with AWQ).
    """
    if not surgery.is_norm(norm):
        raise ValueError(
            f"SmoothQuant folds its factors into the norm that produces the linears' input; got a "
            f"{type(norm).__name__}, which is not a LayerNorm/RMSNorm that quantcourse.surgery can fold into"
        )
    if not linears or any(not isinstance(fc, nn.Linear) for fc in linears):
        raise ValueError("fold_smoothing needs a non-empty list of nn.Linear layers fed by the norm")
    _check_channel_vector(s, "s", norm.weight.numel())
    for fc in linears:
        if fc.in_features != norm.weight.numel():
            raise ValueError(f"a linear has {fc.in_features} input features but the norm has {norm.weight.numel()}")
    if (s <= 0).any():
        raise ValueError("smoothing factors must be positive (smoothing_factors clamps them to >= 1e-5)")
    surgery.fold_scales(surgery.ScaleGroup("", norm, tuple(linears), norm), s)


def smooth_norm_linears(
    norm: nn.Module, linears: Sequence[nn.Linear], act_max: torch.Tensor, alpha: float = 0.5
) -> torch.Tensor:
    """The reference's ``smooth_ln_fcs``: factors from ``act_max`` and the linears' weights, folded; returns ``s``."""
    s = smoothing_factors(act_max, weight_channel_absmax([fc.weight for fc in linears]), alpha)
    fold_smoothing(norm, linears, s)
    return s


@dataclass
class SmoothReport:
    """What :func:`smooth_model` did.

    Attributes:
        alpha: the migration strength.
        factors: ``{norm name: s [in]}`` per smoothed group, keyed by the norm it was folded into
            (e.g. ``model.layers.0.input_layernorm``).
        linears: ``{norm name: qualified names of the linears it feeds}``.
        unsmoothed: linears whose input is not produced by a norm (o_proj, down_proj, ...).
    """

    alpha: float
    factors: dict[str, torch.Tensor] = field(default_factory=dict)
    linears: dict[str, list[str]] = field(default_factory=dict)
    unsmoothed: list[str] = field(default_factory=list)


def _norm_fed_groups(model: nn.Module) -> list[tuple[str, surgery.ScaleGroup, list[str]]]:
    """``(norm name, group, qualified names of its linears)`` for every group whose input a norm produces."""
    names = {id(m): n for n, m in model.named_modules()}
    return [
        (names[id(group.prev)], group, [names[id(fc)] for fc in group.linears])
        for block in surgery.decoder_blocks(model)
        for group in surgery.scale_groups(block)
        if surgery.is_norm(group.prev)
    ]


def _check_act_scales(act_scales: Mapping[str, torch.Tensor], needed: Sequence[str]) -> None:
    if not isinstance(act_scales, Mapping):
        raise TypeError(f"act_scales must be the dict collect_act_scales returns, got {type(act_scales).__name__}")
    missing = [n for n in needed if n not in act_scales]
    if missing:
        raise ValueError(
            f"act_scales has no statistics for {len(missing)} linear(s), e.g. {missing[0]!r}: collect them on this "
            "model with collect_act_scales(model, calibration) before smoothing or static quantization"
        )


@torch.no_grad()
def smooth_model(model: nn.Module, act_scales: Mapping[str, torch.Tensor], alpha: float = 0.5) -> SmoothReport:
    """Smooth every norm-fed group of linears of ``model`` in place (the reference's ``smooth_lm``).

    For each group (q/k/v after the attention norm, gate/up after the FFN norm, as
    :func:`quantcourse.surgery.scale_groups` lists them) the factors come from the statistics of the
    group's first linear (they all read the same tensor) and the weight maxima over all of them.
    The float model computes the same function afterwards (up to float rounding).

    Args:
        model: a causal LM whose statistics are ``act_scales``.
        act_scales: from :func:`collect_act_scales` on the unsmoothed model.
        alpha: migration strength in [0, 1].
    """
    alpha = check_alpha(alpha)
    model = surgery.as_plain_linears(model)
    groups = _norm_fed_groups(model)
    _check_act_scales(act_scales, [names[0] for _, _, names in groups])
    report = SmoothReport(alpha)
    smoothed: set[str] = set()
    for norm_name, group, names in groups:
        s = smooth_norm_linears(group.prev, group.linears, act_scales[names[0]], alpha)
        report.factors[norm_name] = s
        report.linears[norm_name] = names
        smoothed.update(names)
    report.unsmoothed = [n for n in surgery.find_linears(model) if n not in smoothed]
    return report


# ----------------------------------------------------------------------------------------------
# W8A8, fake-quantized through quantcourse.activations (the reference's fake_quant.py)


def static_act_qparams(act_max: torch.Tensor, s: torch.Tensor | None = None) -> QParams:
    """Per-tensor static int8 ``QParams`` from a layer's calibration maxima.

    The max over the channels of ``act_max`` (divided by ``s`` when the layer's input was smoothed
    with ``s``: channel ``j`` then peaks at ``act_max_j / s_j`` on the same data) is the per-tensor
    range a min-max observer would have seen, so no second calibration pass is needed.
    """
    _check_channel_vector(act_max, "act_max")
    peak = act_max.float() if s is None else act_max.float() / s.float().to(act_max.device)
    scale = (peak.amax().clamp(min=CLAMP_MIN) / QMAX).reshape(())
    return QParams(scale, torch.zeros((), dtype=torch.int32), 8, True, PerTensor())


def _act_quantizer(activations: str, qparams: QParams | None) -> ActivationQuantizer:
    if activations == "static":
        return ActivationQuantizer.static(qparams)
    granularity = PerToken() if activations == "per_token" else PerTensor()
    return ActivationQuantizer.dynamic(8, granularity=granularity)


def quantize_w8a8(
    model: nn.Module,
    *,
    weights: WeightMode = "per_channel",
    activations: ActMode = "per_token",
    act_scales: Mapping[str, torch.Tensor] | None = None,
    smoothing: SmoothReport | None = None,
    integer: bool = False,
    include_head: bool = False,
    names: Callable[[str], bool] = lambda name: True,
) -> nn.Module:
    """Swap every linear of ``model`` (or those whose qualified name passes ``names``) for a W8A8 one, in place.

    Weights: symmetric absmax int8 per output channel or per tensor. Activations: symmetric absmax
    int8 per token (dynamic), per tensor (dynamic), or per tensor with the range fixed from
    ``act_scales`` (static; pass ``smoothing``, the report of :func:`smooth_model`, when the model was
    smoothed after the statistics were taken, so that the ranges follow the smoothed inputs).

    Args:
        integer: build :class:`Int8Linear` layers (int8 weights, int32 GEMM) instead of the fake-quantized
            :class:`quantcourse.activations.QuantizedLinear`; the outputs agree up to float rounding.

        names: which linears to quantize (the others stay float), e.g. to find which layers hurt.

    Undo the fake-quantized version with :func:`quantcourse.activations.restore_float_linears`; returns ``model``.
    """
    _check_mode("weights", weights, WEIGHT_MODES)
    _check_mode("activations", activations, ACT_MODES)
    model = surgery.as_plain_linears(model)
    selected = [n for n in surgery.find_linears(model, include_head=include_head) if names(n)]
    divisors: dict[str, torch.Tensor] = {}
    if activations == "static":
        if act_scales is None:
            raise ValueError(
                "static activation quantization needs act_scales (collect_act_scales(model, calibration) on the "
                "float model), or choose activations='per_token' / 'per_tensor' (dynamic)"
            )
        _check_act_scales(act_scales, selected)
        if smoothing is not None:
            for group, linear_names in smoothing.linears.items():
                divisors.update({n: smoothing.factors[group] for n in linear_names})
    elif act_scales is not None or smoothing is not None:
        raise ValueError(f"act_scales/smoothing set the static ranges; activations={activations!r} is dynamic")

    def make(name: str, linear: nn.Linear) -> nn.Module:
        qparams = static_act_qparams(act_scales[name], divisors.get(name)) if activations == "static" else None
        if integer:
            return Int8Linear.from_float(linear, weights=weights, activations=activations, static_qparams=qparams)
        w_granularity = PerChannel(0) if weights == "per_channel" else PerTensor()
        return QuantizedLinear(linear, w_bits=8, w_granularity=w_granularity, act=_act_quantizer(activations, qparams))

    return surgery.replace_linears(model, make, include_head=include_head, names=names)


# ----------------------------------------------------------------------------------------------
# the integer path: int8 x int8 -> int32 GEMM, scales applied after


def quantize_per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax int8 codes of every token (row): ``x [..., K]`` -> ``(q int8, scale float32 [..., 1])``.

    ``scale = max|x_row| / 127`` (floored at float32's eps for an all-zero row; the reference floors
    the max at 1e-5 instead, which differs only for rows below 1e-5) and ``q = round(x / scale)``
    (half to even), in [-127, 127]. The codes have ``x``'s shape.
    """
    qp = choose_qparams(x, 8, symmetric=True, granularity=PerToken())
    return quantize(x, qp), qp.scale


def quantize_weight_int8(
    weight: torch.Tensor, weights: WeightMode = "per_channel"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax int8 codes of a weight ``[N, K]``: ``(q int8 [N, K], scale float32 [N, 1] or [])``."""
    _check_mode("weights", weights, WEIGHT_MODES)
    qp = choose_qparams(
        weight, 8, symmetric=True, granularity=PerChannel(0) if weights == "per_channel" else PerTensor()
    )
    return quantize(weight, qp), qp.scale


def _check_int8_operands(a: torch.Tensor, b: torch.Tensor) -> None:
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int8 or t.dim() != 2:
            raise TypeError(
                f"{name} must be a 2-D int8 tensor, got "
                f"{(t.dtype, tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__}"
            )
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a [M, K] and b [N, K] must share K: got {tuple(a.shape)} and {tuple(b.shape)}")


def _int_mm_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ b.T`` in integers. float64 holds every partial sum exactly while
    K * 127 * 128 < 2**53 (K below 5e11), so the BLAS float64 GEMM is an exact integer GEMM here."""
    return (a.double() @ b.double().T).to(torch.int32)


@functools.cache
def _int_mm_works(device_type: str) -> bool:
    """Whether ``torch._int_mm`` runs on this device type (probed once on a small exact case)."""
    if not hasattr(torch, "_int_mm"):
        return False
    a = torch.arange(-64, 64, dtype=torch.int8).reshape(32, 4).repeat(1, 8).to(device_type)  # [32, 32]
    try:
        got = torch._int_mm(a, a.T)  # a @ a.T, b given as the transposed view int8_matmul passes
    except (RuntimeError, NotImplementedError):
        return False
    return bool(torch.equal(got.cpu(), _int_mm_reference(a.cpu(), a.cpu())))


def int8_matmul(
    a: torch.Tensor, b: torch.Tensor, *, backend: Literal["auto", "int_mm", "exact"] = "auto"
) -> torch.Tensor:
    """``a @ b.T`` with int8 inputs and an int32 result: ``a [M, K]``, ``b [N, K]`` -> int32 ``[M, N]``.

    ``backend="auto"`` uses ``torch._int_mm`` (a real int8 GEMM: oneDNN/VNNI on x86 CPUs, cuBLASLt on
    GPUs) when it runs on this device and shape (CUDA needs M > 16 and K, N multiples of 8), otherwise
    the exact integer fallback. Both give identical integers (the products of int8 codes sum exactly in
    int32 for any K below 2**31 / 127**2 = 133,000).
    """
    _check_int8_operands(a, b)
    if backend not in ("auto", "int_mm", "exact"):
        raise ValueError(f"backend must be 'auto', 'int_mm' or 'exact', got {backend!r}")
    M, K = a.shape
    N = b.shape[0]
    shape_ok = a.device.type != "cuda" or (M > 16 and K % 8 == 0 and N % 8 == 0)
    if backend == "exact" or (backend == "auto" and not (shape_ok and _int_mm_works(a.device.type))):
        return _int_mm_reference(a, b)
    return torch._int_mm(a.contiguous(), b.T)  # b.T: a column-major view, which cuBLASLt wants


def int8_linear(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: Literal["auto", "int_mm", "exact"] = "auto",
) -> torch.Tensor:
    """``Y = (x_scale * (x_q @ w_q^T) * w_scale^T) + bias``: the int32 GEMM, then the scales.

    Args:
        x_q: int8 ``[M, K]``; x_scale: float32 ``[M, 1]`` (per token) or ``[]`` (per tensor).
        w_q: int8 ``[N, K]``; w_scale: float32 ``[N, 1]`` (per channel) or ``[]`` (per tensor).
        bias: ``[N]`` or ``None``.

    Returns:
        float32 ``[M, N]``.
    """
    acc = int8_matmul(x_q, w_q, backend=backend)  # int32 [M, N]
    y = acc.float().mul_(x_scale.float()).mul_(w_scale.float().reshape(1, -1) if w_scale.dim() else w_scale.float())
    return y if bias is None else y.add_(bias.float())


class Int8Linear(nn.Module):
    """A W8A8 linear layer that really computes in integers: int8 weights, int8 activations, int32 GEMM.

    Buffers: ``weight_q`` int8 ``[out, in]``, ``weight_scale`` float32 ``[out, 1]`` (per channel) or ``[]``
    (per tensor), ``bias`` (float, or ``None``). Activations are quantized per token or per tensor at
    run time, or with a fixed static scale. The output is in the input's dtype.
    """

    def __init__(
        self,
        weight_q: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        activations: ActMode = "per_token",
        static_qparams: QParams | None = None,
    ) -> None:
        super().__init__()
        _check_mode("activations", activations, ACT_MODES)
        if (activations == "static") != (static_qparams is not None):
            raise ValueError("static_qparams is needed for, and only for, activations='static'")
        self.register_buffer("weight_q", weight_q)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.activations, self.static_qparams = activations, static_qparams
        self.out_features, self.in_features = weight_q.shape

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        *,
        weights: WeightMode = "per_channel",
        activations: ActMode = "per_token",
        static_qparams: QParams | None = None,
    ) -> Int8Linear:
        w_q, w_scale = quantize_weight_int8(linear.weight.detach(), weights)
        return cls(w_q, w_scale, linear.bias, activations=activations, static_qparams=static_qparams)

    def quantize_input(self, x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [M, K]`` -> ``(int8 codes [M, K], scale [M, 1] or [])`` as this layer's mode says."""
        if self.activations == "per_token":
            return quantize_per_token_int8(x2d)
        qp = self.static_qparams
        if qp is None:
            qp = choose_qparams(x2d, 8, symmetric=True, granularity=PerTensor())
        return quantize(x2d, qp), qp.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, x.shape[-1])
        x_q, x_scale = self.quantize_input(x2d)
        y = int8_linear(x_q, x_scale, self.weight_q, self.weight_scale, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        w = "per-channel" if self.weight_scale.dim() else "per-tensor"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, {w} int8 weights, "
            f"{self.activations} int8 activations"
        )


# ----------------------------------------------------------------------------------------------
# the whole method


@dataclass
class SmoothQuantReport:
    """What :func:`smoothquant_model` did: the smoothing, the W8A8 configuration and the time it took."""

    smoothing: SmoothReport | None
    weights: str
    activations: str
    seconds_statistics: float
    seconds_total: float


def smoothquant_model(
    model: nn.Module,
    calibration: torch.Tensor | None = None,
    *,
    alpha: float | None = 0.5,
    weights: WeightMode = "per_channel",
    activations: ActMode = "per_token",
    act_scales: Mapping[str, torch.Tensor] | None = None,
    integer: bool = False,
    batch_size: int = 8,
    progress: bool = True,
) -> SmoothQuantReport:
    """SmoothQuant W8A8 of a causal LM, in place: statistics, smoothing (``alpha``), then W8A8.

    Args:
        model: a Llama-, OPT- or GPT-2-style causal LM (float).
        calibration: int64 ``[n_samples, seq_len]``; not needed when ``act_scales`` is given.
        alpha: migration strength in [0, 1]; ``None`` skips smoothing (plain W8A8).
        weights, activations: as :func:`quantize_w8a8` (see :data:`PAPER_LEVELS` for O1-O3).
        act_scales: statistics of this (unsmoothed) model from :func:`collect_act_scales`, to reuse them.
        integer: :class:`Int8Linear` layers instead of fake quantization.

    All options are checked before any forward pass.
    """
    start = time.perf_counter()
    if alpha is not None:
        alpha = check_alpha(alpha)
    _check_mode("weights", weights, WEIGHT_MODES)
    _check_mode("activations", activations, ACT_MODES)
    needs_stats = alpha is not None or activations == "static"
    if needs_stats and act_scales is None:
        if calibration is None:
            raise ValueError(
                "smoothing and static ranges need calibration token ids [n_samples, seq_len] or act_scales"
            )
        _check_calibration(calibration, batch_size)
        act_scales = collect_act_scales(model, calibration, batch_size=batch_size, progress=progress)
    t_stats = time.perf_counter() - start
    smoothing = smooth_model(model, act_scales, alpha) if alpha is not None else None
    quantize_w8a8(
        model,
        weights=weights,
        activations=activations,
        act_scales=act_scales if activations == "static" else None,
        smoothing=smoothing if activations == "static" else None,
        integer=integer,
    )
    return SmoothQuantReport(smoothing, weights, activations, t_stats, time.perf_counter() - start)


def outlier_ratio(act_max: torch.Tensor) -> float:
    """``max / median`` of a layer's per-channel maxima: how far its outlier channels stand out."""
    _check_channel_vector(act_max, "act_max")
    return float(act_max.max() / act_max.median().clamp(min=math.ulp(0.0)))
