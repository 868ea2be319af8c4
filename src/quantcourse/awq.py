"""AWQ: activation-aware weight quantization, by scaling the weights that matter before rounding.

Chapter 7 (AWQ) teaches this module. Paper: Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan, Han,
"AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration", MLSys 2024
(arXiv:2306.00978). Reference code: mit-han-lab/llm-awq (``awq/quantize/auto_scale.py``,
``auto_clip.py``, ``quantizer.py``, ``pre_quant.py``), whose rules this module follows.

A few input channels of a linear layer see much larger activations than the rest, and the weights
that multiply them matter most. AWQ protects them without mixed precision: it multiplies the input
channels of the weight by ``s > 1`` where activations are large (``W·diag(s)``), so those weights sit
on a relatively finer grid, and divides the layer's input by ``s``, folded exactly into the op before
it (a norm's weight, or the rows of the previous linear: :func:`quantcourse.surgery.fold_scales`).
Per block, following the reference:

1. **Statistics**: run the block on its calibration inputs and keep every linear's input ``X``;
   ``s_X[j] = mean_t |X[t, j]|``, the mean magnitude of input channel ``j``.
2. **Scale search**, per group of linears sharing an input (:func:`quantcourse.surgery.scale_groups`):
   for ``α ∈ {0, 1/n_grid, ..., (n_grid-1)/n_grid}`` (``α = 1`` is never tried), ``s = s_X^α``
   (clamped to ≥ 1e-4) divided by ``√(max s · min s)``; every linear of the group gets
   ``W ← Q(W·diag(s)) / s`` (``Q``: :func:`pseudo_quantize`); the loss is the mean squared
   difference of the *inspected* module's output (the whole attention for q/k/v, the whole MLP for
   gate/up, the layer itself otherwise) against its float output. The α of lowest loss wins. Every
   group of a block is searched on the unscaled block, then all scales are folded.
3. **Clip search**, after scaling, for every linear except q and k: per output channel and group,
   try ``max|w| · (1 - i/n_grid)`` for ``i = 0 .. n_grid/2 - 1`` (down to 0.55·max at 20 steps),
   clamp to ``±max``, pseudo-quantize, and keep the clip with the lowest squared output error of the
   group's partial dot products on 512 strided tokens of the (scaled) inputs.

Quantization is round-to-nearest on the reference's asymmetric grid (:func:`awq_qparams`), or GPTQ
on the scaled and clipped weights (:func:`awq_transform_model`, then :func:`quantcourse.gptq.quantize_model`).

Where this differs from the reference, and why:

- The reference computes block ``i+1``'s inputs from block ``i``'s outputs *before* scaling and
  clipping; here they come through :func:`quantcourse.pipeline.run_blockwise` after both (scaling
  leaves the function unchanged, clipping changes it slightly). Quantization happens after the last
  block, as in the reference (``run_awq`` then ``pseudo_quantize_model_weight``).
- The loss of a group whose inspected module is a single linear (down_proj, o_proj) is computed from
  the Gram matrix ``G = XᵀX`` as ``Σ (ΔW G ⊙ ΔW) / (tokens · out)``, the same number as the mean of
  ``(X ΔWᵀ)²`` in exact arithmetic, without running the layer twenty times.
- The clip search computes the error of the partial outputs as ``X_g (ΔW_g)ᵀ`` rather than as the
  difference of two products (same number, fewer cancellations).
- The reference runs in float16 on a GPU; this module computes in the weights' dtype (float32 here),
  except that ``search_dtype=torch.bfloat16`` replays the inspected modules of the scale search in
  bfloat16 (a copy of each, candidates cast to it, the loss summed in float32): the same half-precision
  search the reference runs, three times faster on a CPU with native bfloat16 matrix units. Statistics,
  folding, clipping and rounding stay in float32 either way.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from . import surgery
from .pipeline import BlockContext, run_blockwise
from .primitives import check_float_tensor, check_n_bits
from .weights import QuantizedModel, QuantizedWeight

__all__ = [
    "N_GRID",
    "MAX_SHRINK",
    "CLIP_TOKENS",
    "awq_qparams",
    "pseudo_quantize",
    "quantize_weight",
    "activation_scale",
    "scales_for_alpha",
    "ScaleSearch",
    "search_scale",
    "module_output_loss",
    "linear_output_loss",
    "search_clip",
    "apply_clip",
    "BlockReport",
    "AWQReport",
    "awq_block",
    "awq_transform_model",
    "awq_quantize_model",
    "round_model",
]

N_GRID = 20  # ratios α = 0, 0.05, ..., 0.95 (auto_scale.py n_grid)
MAX_SHRINK = 0.5  # clip down to (1 - 0.5 + 1/20) = 0.55 of the max (auto_clip.py max_shrink)
CLIP_TOKENS = 512  # tokens the clip search looks at (auto_clip.py n_sample_token)
MIN_SCALE = 1e-4  # s_X^α is clamped to this before normalising (auto_scale.py)
MIN_RANGE = 1e-5  # a group's max - min is clamped to this (quantizer.py)
CLIP_BATCH = 4096  # output channels per clip-search batch, to bound memory (the reference: 256 on a GPU)


# ---------------------------------------------------------------------------------------------------
# The grid: the reference's pseudo_quantize_tensor
# ---------------------------------------------------------------------------------------------------


def _check_grid(W: torch.Tensor, n_bits: int, group_size: int | None) -> None:
    check_float_tensor(W, "W")
    if W.dim() != 2:
        raise ValueError(f"W must be a 2-D weight [out, in], got shape {tuple(W.shape)}")
    check_n_bits(n_bits)
    _check_group_size(group_size)
    if group_size is not None and W.shape[1] % group_size:
        divisors = [g for g in (16, 32, 64, 128, 256) if W.shape[1] % g == 0]
        raise ValueError(
            f"group_size={group_size} does not divide the {W.shape[1]} input columns of W: AWQ's groups "
            f"must tile every row; choose a divisor (e.g. {divisors}) or None for one group per row"
        )


def _check_group_size(group_size: int | None) -> None:
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"group_size must be a positive int or None (one group per row), got {group_size!r}")


def _grouped(W: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """``W [out, in]`` viewed as ``[out, n_groups, group_size]`` (no copy)."""
    return W.reshape(W.shape[0], -1, group_size or W.shape[1])


def awq_qparams(W: torch.Tensor, n_bits: int, group_size: int | None = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's asymmetric grid per group: ``(scale, zero_point)``, each ``[out, n_groups]``.

    ``scale = max(max_g - min_g, 1e-5) / (2^b - 1)`` and ``zero = clamp(-round(min_g / scale), 0, 2^b - 1)``,
    from the group's own minimum and maximum. Unlike GPTQ's grid (:func:`quantcourse.weights.weight_qparams`)
    the range is *not* widened to contain 0: a group of all-positive weights keeps its own minimum, and
    its zero point clamps at 0 (the codes of its largest weights then clamp at ``2^b - 1``, as in the reference).

    Args:
        W: float ``[out, in]``.
        n_bits: 2..8.
        group_size: input columns per group (must divide ``in``); ``None``: one group per row.

    Returns:
        ``scale`` (W's dtype) and ``zero_point`` (int32).
    """
    _check_grid(W, n_bits, group_size)
    scale, zero = _qparams(_grouped(W.detach(), group_size), n_bits)
    return scale, zero.to(torch.int32)


def _qparams(Wg: torch.Tensor, n_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)`` ``[out, n_groups]`` of grouped weights ``[out, n_groups, gs]``; zero in W's dtype."""
    maxq = 2**n_bits - 1
    lo, hi = torch.aminmax(Wg, dim=-1)
    scale = (hi - lo).clamp_(min=MIN_RANGE).div_(maxq)
    zero = lo.div_(scale).round_().neg_().clamp_(0, maxq)  # -round(min / scale), clamped
    return scale, zero


def pseudo_quantize(W: torch.Tensor, n_bits: int, group_size: int | None = 64) -> torch.Tensor:
    """Quantize and dequantize ``W [out, in]`` on the reference's grid (:func:`awq_qparams`), same shape and dtype.

    ``q = clamp(round(w / scale) + zero, 0, 2^b - 1)`` and back: ``(q - zero) · scale``.
    """
    _check_grid(W, n_bits, group_size)
    Wg = _grouped(W.detach(), group_size)
    scale, zero = _qparams(Wg, n_bits)
    s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
    q = torch.div(Wg, s).round_().add_(z).clamp_(0, 2**n_bits - 1)  # the codes, as floats (one buffer)
    return q.sub_(z).mul_(s).reshape(W.shape)


def quantize_weight(W: torch.Tensor, n_bits: int, group_size: int | None = 64) -> QuantizedWeight:
    """Round-to-nearest on AWQ's grid, keeping the integer codes (for storage).

    Returns:
        The shared weight-only record: uint8 ``codes [out, in]``, ``scale [out, n_groups]`` float32,
        ``zero_point`` int32, and ``weight``, bit-identical to :func:`pseudo_quantize` for float32 ``W``.
    """
    scale, zero = awq_qparams(W, n_bits, group_size)
    Wg = _grouped(W.detach().float(), group_size)
    codes = torch.clamp(torch.round(Wg / scale.float().unsqueeze(-1)) + zero.unsqueeze(-1), 0, 2**n_bits - 1)
    codes = codes.reshape(W.shape).to(torch.uint8)
    g_idx = torch.arange(W.shape[1], device=W.device) // (group_size or W.shape[1])
    scale = scale.float()
    weight = (scale[:, g_idx] * (codes.float() - zero[:, g_idx].float())).to(W.dtype)
    return QuantizedWeight(weight, codes, scale, zero, n_bits, group_size, False, g_idx=g_idx)


# ---------------------------------------------------------------------------------------------------
# Step 1: the activation statistic; step 2: the scale search
# ---------------------------------------------------------------------------------------------------


def activation_scale(X: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean magnitude of each input channel: ``s_X[j] = mean_t |X[t, j]|`` (``get_act_scale``).

    Args:
        X: float ``[tokens, in]`` (or ``[..., in]``, flattened), or a list of such batches (the mean is
            over all their tokens).

    Returns:
        float32 ``[in]``.
    """
    batches = [X] if isinstance(X, torch.Tensor) else list(X)
    if not batches:
        raise ValueError("X holds no batches: collect the layer's inputs on at least one calibration batch")
    total, n = None, 0
    for x in batches:
        check_float_tensor(x, "X")
        x = x.reshape(-1, x.shape[-1])
        part = x.abs().sum(0, dtype=torch.float32)
        if total is not None and part.shape != total.shape:
            raise ValueError(f"the batches of X have different widths ({total.shape[0]} and {part.shape[0]})")
        total, n = (part if total is None else total + part), n + x.shape[0]
    return total / n


def scales_for_alpha(s_x: torch.Tensor, alpha: float) -> torch.Tensor:
    """The per-channel scale for one ratio: ``s = max(s_X^α, 1e-4)``, divided by ``√(max s · min s)``.

    The normalisation centres ``s`` around 1 on a log scale (its largest and smallest values are
    reciprocals), so the scaled weights keep their overall magnitude. ``α = 0`` gives ``s = 1``.

    Args:
        s_x: float ``[in]``, from :func:`activation_scale`.
        alpha: the ratio, in ``[0, 1]``.

    Returns:
        ``[in]``, ``s_x``'s dtype.
    """
    check_float_tensor(s_x, "s_x")
    if s_x.dim() != 1:
        raise ValueError(f"s_x must be 1-D [in] (one value per input channel), got shape {tuple(s_x.shape)}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    s = s_x.pow(alpha).clamp(min=MIN_SCALE)
    return s / (s.max() * s.min()).sqrt()


@dataclass(frozen=True)
class ScaleSearch:
    """The outcome of one scale search.

    Attributes:
        alpha: the ratio of lowest loss.
        scales: ``[in]``, :func:`scales_for_alpha` at ``alpha``.
        alphas: the ratios tried, ``[n_grid]``.
        losses: the loss of each, ``[n_grid]`` (float64).
    """

    alpha: float
    scales: torch.Tensor
    alphas: torch.Tensor
    losses: torch.Tensor

    @property
    def loss(self) -> float:
        """The lowest loss."""
        return float(self.losses.min())


LossFn = Callable[[Sequence[torch.Tensor]], float]  # (one candidate weight per linear of the group) -> loss


def search_scale(
    weights: Sequence[torch.Tensor],
    s_x: torch.Tensor,
    loss: LossFn,
    *,
    n_bits: int = 4,
    group_size: int | None = 64,
    n_grid: int = N_GRID,
) -> ScaleSearch:
    """Grid search of α for one group of linears sharing an input (``_search_module_scale``).

    For each ``α = k / n_grid``, ``k = 0 .. n_grid - 1``: ``s = scales_for_alpha(s_x, α)``; each weight
    ``W [out, in]`` of the group becomes ``Q(W·diag(s)) / s``; ``loss`` scores them. The first α of
    lowest loss wins (ties keep the smaller α, as the reference's strict ``<``).

    Args:
        weights: the group's float weights ``[out_k, in]`` (not modified).
        s_x: ``[in]``, the group input's :func:`activation_scale`.
        loss: ``loss(candidates)`` → the inspected module's mean squared output error with those
            weights (:func:`module_output_loss`, :func:`linear_output_loss`).
        n_bits, group_size: the grid (:func:`pseudo_quantize`).
        n_grid: how many ratios.

    Returns:
        :class:`ScaleSearch`.
    """
    if isinstance(n_grid, bool) or not isinstance(n_grid, int) or n_grid < 1:
        raise ValueError(f"n_grid must be a positive int (the reference uses 20), got {n_grid!r}")
    if not weights:
        raise ValueError("weights is empty: a scale group has at least one linear layer")
    for W in weights:
        _check_grid(W, n_bits, group_size)
        if W.shape[1] != s_x.shape[-1]:
            raise ValueError(f"a weight has {W.shape[1]} input columns but s_x has {s_x.shape[-1]} channels")
    alphas = torch.arange(n_grid, dtype=torch.float64) / n_grid
    losses = torch.empty(n_grid, dtype=torch.float64)
    for k in range(n_grid):
        s = scales_for_alpha(s_x, k / n_grid).to(weights[0])
        losses[k] = loss([pseudo_quantize(W * s, n_bits, group_size) / s for W in weights])
    best = int(torch.argmin(losses))  # the first minimum
    return ScaleSearch(best / n_grid, scales_for_alpha(s_x, best / n_grid), alphas, losses)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def module_output_loss(
    linears: Sequence[nn.Linear],
    run: Callable[[], Sequence[torch.Tensor]],
    *,
    reference: Sequence[torch.Tensor] | None = None,
) -> LossFn:
    """A loss for :func:`search_scale` that runs the inspected module with candidate weights swapped in.

    Args:
        linears: the group's layers, in the order :func:`search_scale` receives their weights (candidates
            are cast to each layer's dtype, so a half-precision copy of the module can be searched).
        run: runs the inspected module on its calibration inputs and returns its outputs, one tensor
            per batch (e.g. the whole attention on each batch).
        reference: the module's outputs with its own weights, one per batch, if already at hand (the
            pass that recorded the calls); by default computed now with ``run``.

    Returns:
        ``loss(candidates)``: the mean over every element of all batches of ``(y_float - y)²``, in
        float32 as the reference.
    """
    if reference is None:
        with torch.no_grad():
            reference = [_first(y).detach() for y in run()]
    reference = list(reference)
    n_elements = sum(y.numel() for y in reference)

    @torch.no_grad()
    def loss(candidates: Sequence[torch.Tensor]) -> float:
        saved = [linear.weight.data for linear in linears]
        try:
            for linear, W in zip(linears, candidates, strict=True):
                linear.weight.data = W.to(linear.weight.dtype)
            total = sum(
                float(nn.functional.mse_loss(_first(y).float(), r.float(), reduction="sum"))
                for y, r in zip(run(), reference, strict=True)
            )
        finally:
            for linear, W in zip(linears, saved, strict=True):
                linear.weight.data = W
        return float(total) / n_elements

    return loss


def linear_output_loss(W: torch.Tensor, X: torch.Tensor | Sequence[torch.Tensor]) -> LossFn:
    """A loss for :func:`search_scale` when the inspected module is the linear layer ``W`` itself.

    ``mean((X Wᵀ - X Ŵᵀ)²)``. With more tokens than input features it is computed as
    ``Σ (ΔW G ⊙ ΔW) / (tokens · out)`` from the Gram matrix ``G = XᵀX`` (computed once), the same number
    in exact arithmetic, so each candidate costs one ``[out, in] × [in, in]`` product instead of a pass
    over the tokens; otherwise directly as ``mean((X ΔWᵀ)²)``.

    Args:
        W: float ``[out, in]``, the layer's float weight.
        X: its inputs ``[tokens, in]`` (or a list of batches).
    """
    batches = [x.reshape(-1, x.shape[-1]) for x in ([X] if isinstance(X, torch.Tensor) else X)]
    n = sum(x.shape[0] for x in batches)
    if n == 0:
        raise ValueError("X holds no tokens: collect the layer's inputs on at least one calibration batch")
    Wd = W.detach()
    if n <= W.shape[1]:
        Xc = torch.cat(batches).to(Wd.dtype)

        def direct(candidates: Sequence[torch.Tensor]) -> float:
            (W_hat,) = candidates
            return float((Xc @ (W_hat - Wd).T).square_().mean())

        return direct
    G = sum(x.T.to(Wd.dtype) @ x.to(Wd.dtype) for x in batches)

    def gram(candidates: Sequence[torch.Tensor]) -> float:
        (W_hat,) = candidates
        D = W_hat - Wd
        return float((D @ G).mul_(D).sum()) / (n * W.shape[0])

    return gram


# ---------------------------------------------------------------------------------------------------
# Step 3: the clip search
# ---------------------------------------------------------------------------------------------------


def _clip_tokens(X: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Every ``tokens // n_tokens``-th row, as the reference subsamples (at least every row)."""
    return X[:: max(X.shape[0] // n_tokens, 1)]


@torch.no_grad()
def search_clip(
    W: torch.Tensor,
    X: torch.Tensor,
    n_bits: int = 4,
    group_size: int | None = 64,
    *,
    n_grid: int = N_GRID,
    max_shrink: float = MAX_SHRINK,
    n_tokens: int = CLIP_TOKENS,
) -> torch.Tensor:
    """The clipping threshold of each output channel and group (``auto_clip_layer``).

    For ``i = 0 .. int(max_shrink · n_grid) - 1``: ``m = max|w_g| · (1 - i / n_grid)``; the group is
    clamped to ``[-m, m]`` and pseudo-quantized; the error is the mean over the strided tokens of
    ``(x_g · (ŵ_g - w_g))²``, the squared error of the group's partial dot product. The first ``m``
    of lowest error is kept (``i = 0``, no clipping, unless a tighter range does strictly better).

    Args:
        W: float ``[out, in]``, the (scaled) weight.
        X: float ``[tokens, in]``, its (scaled) inputs; every ``tokens // n_tokens``-th row is used.
        n_bits, group_size: the grid.
        n_grid, max_shrink, n_tokens: the reference's 20, 0.5 and 512.

    Returns:
        ``max_val [out, n_groups]``, W's dtype: clamp each group to ``±max_val`` (:func:`apply_clip`).
    """
    _check_grid(W, n_bits, group_size)
    check_float_tensor(X, "X")
    X = X.reshape(-1, X.shape[-1])
    if X.shape[1] != W.shape[1]:
        raise ValueError(f"X has {X.shape[1]} features but W has {W.shape[1]} input columns")
    if not 0 < max_shrink < 1 or not isinstance(n_grid, int) or n_grid < 1 or int(max_shrink * n_grid) < 1:
        raise ValueError(f"need n_grid >= 1 and 0 < max_shrink < 1 with at least one step, got {n_grid}, {max_shrink}")
    gs = group_size or W.shape[1]
    x = _clip_tokens(X, n_tokens).to(W.dtype)
    xg = x.reshape(x.shape[0], -1, gs).transpose(0, 1)  # [n_groups, tokens, gs]
    best_all = []
    for rows in W.split(CLIP_BATCH):  # every row at once on a CPU; the reference batches 256 to fit a GPU
        Wg = _grouped(rows, gs)  # [co, n_groups, gs]
        org_max = Wg.abs().amax(-1, keepdim=True)  # [co, n_groups, 1]
        best = org_max.clone()
        min_err = torch.full_like(org_max, 1e9)
        for i in range(int(max_shrink * n_grid)):
            max_val = org_max * (1 - i / n_grid)
            clipped = torch.clamp(Wg, -max_val, max_val).reshape(rows.shape)
            delta = (pseudo_quantize(clipped, n_bits, group_size) - rows).reshape(Wg.shape)
            err = torch.bmm(xg, delta.permute(1, 2, 0)).square_().mean(1)  # [n_groups, co]
            err = err.T.unsqueeze(-1)
            better = err < min_err
            min_err = torch.where(better, err, min_err)
            best = torch.where(better, max_val, best)
        best_all.append(best.squeeze(-1))
    return torch.cat(best_all)


def apply_clip(W: torch.Tensor, max_val: torch.Tensor) -> torch.Tensor:
    """``W [out, in]`` with each group clamped to ``±max_val [out, n_groups]`` (a new tensor)."""
    Wg = W.reshape(max_val.shape[0], max_val.shape[1], -1)
    m = max_val.unsqueeze(-1).to(W)
    return torch.clamp(Wg, -m, m).reshape(W.shape)


# ---------------------------------------------------------------------------------------------------
# One block, and the whole model
# ---------------------------------------------------------------------------------------------------


@dataclass
class BlockReport:
    """What AWQ did to one decoder block.

    Attributes:
        index: the block's position.
        searches: per scale-group name (qualified, e.g. ``"model.layers.3.qkv"``), its :class:`ScaleSearch`.
        clips: per clipped linear (qualified name), ``max_val / max|w|`` per output channel and group
            ``[out, n_groups]`` (1 = not clipped).
        clip_errors: per clipped linear, ``(error unclipped, error clipped)``: the mean over channels and
            groups of the clip search's objective.
        seconds: wall time of ``"statistics"`` (the pass that records inputs, and ``s_X``),
            ``"scale search"`` (with the fold) and ``"clip search"``.
    """

    index: int
    searches: dict[str, ScaleSearch] = field(default_factory=dict)
    clips: dict[str, torch.Tensor] = field(default_factory=dict)
    clip_errors: dict[str, tuple[float, float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def _record_block(
    ctx: BlockContext, inspect: dict[str, nn.Module]
) -> tuple[dict[str, list], dict[str, list], dict[str, list]]:
    """Run the block once; return each linear's inputs, each inspected module's calls (args, kwargs) and outputs."""
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in inspect}
    handles = [
        module.register_forward_hook(lambda m, a, out, name=name: outputs[name].append(_first(out).detach()))
        for name, module in inspect.items()
    ]
    try:
        with surgery.record_inputs(surgery.find_linears(ctx.block)) as inputs, surgery.record_calls(inspect) as calls:
            ctx.run()
    finally:
        for handle in handles:
            handle.remove()
    return inputs, calls, outputs


def _cast(value, dtype: torch.dtype):
    """``value`` with every floating-point tensor inside (tuples, lists, dicts) cast to ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


def _replay_loss(group: surgery.ScaleGroup, calls: list, outputs: list, dtype: torch.dtype) -> LossFn:
    """The loss of ``group``'s inspected module replayed on its recorded ``calls``, computed in ``dtype``.

    In the weights' own dtype the module itself is replayed and the recorded ``outputs`` are the reference;
    in another (bfloat16) a copy of the module in that dtype is, and its own outputs with the float weights
    rounded to ``dtype`` are the reference, so both sides carry the same rounding of inputs and weights.
    """
    if dtype == group.linears[0].weight.dtype:
        run = lambda: [group.inspect(*a, **k) for a, k in calls]  # noqa: E731
        return module_output_loss(group.linears, run, reference=outputs)
    module = copy.deepcopy(group.inspect).to(dtype)
    path = {id(m): name for name, m in group.inspect.named_modules()}
    linears = [module.get_submodule(path[id(linear)]) for linear in group.linears]
    calls = [(_cast(a, dtype), _cast(k, dtype)) for a, k in calls]
    return module_output_loss(linears, lambda: [module(*a, **k) for a, k in calls])


def _flat(batches: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in batches])


@torch.no_grad()
def awq_block(
    ctx: BlockContext,
    n_bits: int = 4,
    *,
    group_size: int | None = 64,
    n_grid: int = N_GRID,
    clip: bool = True,
    search_dtype: torch.dtype | None = None,
) -> BlockReport:
    """AWQ's scale and clip search on one decoder block, applied in place (``auto_scale_block``, ``auto_clip_block``).

    The block's weights stay in float: scaled (an exact fold, :func:`quantcourse.surgery.fold_scales`) and clipped.
    Quantize them afterwards (:func:`quantize_weight`, or GPTQ).

    Args:
        ctx: the block and its calibration inputs (:class:`quantcourse.pipeline.BlockContext`).
        n_bits, group_size: the grid the searches aim for.
        n_grid: ratios of the scale search, and steps of the clip search.
        clip: run the clip search.
        search_dtype: the dtype the scale search replays the attention and MLP in; ``None``: the
            weights' own (exact). ``torch.bfloat16`` is the reference's half-precision search, about
            three times faster on a CPU with bfloat16 matrix units (AVX512-BF16, AMX) and on GPUs.
    """
    _check_search_dtype(search_dtype)
    report = BlockReport(ctx.index)
    block, prefix = ctx.block, f"{ctx.name}."
    linears = surgery.find_linears(block)
    name_of = {id(linear): name for name, linear in linears.items()}
    groups = surgery.scale_groups(block)
    inspected = {g.name: g.inspect for g in groups if g.inspect not in g.linears}  # modules run whole
    t0 = time.perf_counter()
    inputs, calls, outputs = _record_block(ctx, inspected)
    X: dict[str, torch.Tensor] = {}  # [tokens, in] per linear; q/k/v (gate/up) share one tensor
    flat: dict[tuple[int, ...], torch.Tensor] = {}
    for name, batches in inputs.items():
        X[name] = flat.setdefault(tuple(id(x) for x in batches), _flat(batches))
    del flat
    stats = {g.name: activation_scale(X[g.name]) for g in groups}  # a group's name is its first linear's
    t1 = time.perf_counter()
    found = []
    for g in groups:
        if g.name in inspected:  # the whole attention or MLP, replayed on the recorded calls
            loss = _replay_loss(g, calls[g.name], outputs[g.name], search_dtype or g.linears[0].weight.dtype)
        else:  # the layer itself: exact quadratic loss from its inputs
            loss = linear_output_loss(g.linears[0].weight, X[g.name])
        search = search_scale(
            [lin.weight for lin in g.linears],
            stats[g.name],
            loss,
            n_bits=n_bits,
            group_size=group_size,
            n_grid=n_grid,
        )
        report.searches[prefix + g.name] = search
        found.append((g, search.scales))
    for g, scales in found:  # all searched on the unscaled block, then folded (apply_scale)
        surgery.fold_scales(g, scales.to(g.linears[0].weight))
        scaled = X[g.name] / scales.to(X[g.name])  # the inputs the scaled layers now see
        for linear in g.linears:
            X[name_of[id(linear)]] = scaled
    t2 = time.perf_counter()
    if clip:
        skip = set(surgery.attention_score_linears(block))
        for name, linear in linears.items():
            if name in skip:
                continue
            W = linear.weight.data
            max_val = search_clip(W, X[name], n_bits, group_size, n_grid=n_grid)
            clipped = apply_clip(W, max_val)
            x = _clip_tokens(X[name], CLIP_TOKENS)
            errors = tuple(_partial_error(w, W, x, n_bits, group_size) for w in (W, clipped))
            linear.weight.data = clipped
            org_max = _grouped(W, group_size or W.shape[1]).abs().amax(-1)
            report.clips[prefix + name] = (max_val / org_max).cpu()
            report.clip_errors[prefix + name] = errors
    t3 = time.perf_counter()
    report.seconds = {"statistics": t1 - t0, "scale search": t2 - t1, "clip search": t3 - t2}
    return report


def _partial_error(W_clipped: torch.Tensor, W: torch.Tensor, x: torch.Tensor, n_bits: int, group_size) -> float:
    """Mean over channels, groups and tokens of ``(x_g · (Q(W_clipped)_g - W_g))²``: the clip objective."""
    gs = group_size or W.shape[1]
    delta = _grouped(pseudo_quantize(W_clipped, n_bits, group_size) - W, gs)
    xg = x.reshape(x.shape[0], -1, gs).transpose(0, 1)
    return float(torch.bmm(xg, delta.permute(1, 2, 0)).pow(2).mean())


@dataclass
class AWQReport:
    """What :func:`awq_transform_model` / :func:`awq_quantize_model` did.

    Attributes:
        config: the settings (n_bits, group_size, n_grid, clip, calibration shape).
        blocks: one :class:`BlockReport` per decoder block.
        seconds: wall time of the whole run (search and quantization).
        quantized: the codes of every quantized linear, ready for
            :func:`quantcourse.serialization.save_quantized` (``None`` after :func:`awq_transform_model`).
    """

    config: dict
    blocks: list[BlockReport]
    seconds: float = 0.0
    quantized: QuantizedModel | None = None

    @property
    def alphas(self) -> dict[str, float]:
        """The chosen α of every scale group, by qualified name."""
        return {name: s.alpha for b in self.blocks for name, s in b.searches.items()}

    @property
    def losses(self) -> dict[str, float]:
        """The lowest scale-search loss of every group (its inspected module's mean squared output error)."""
        return {name: s.loss for b in self.blocks for name, s in b.searches.items()}

    @property
    def clip_ratios(self) -> dict[str, torch.Tensor]:
        """Per clipped linear, ``max_val / max|w|`` ``[out, n_groups]``."""
        return {name: r for b in self.blocks for name, r in b.clips.items()}

    def stage_seconds(self) -> dict[str, float]:
        """Total time per stage over all blocks (statistics, scale search, clip search)."""
        total: dict[str, float] = {}
        for b in self.blocks:
            for stage, s in b.seconds.items():
                total[stage] = total.get(stage, 0.0) + s
        return total


SEARCH_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _check_search_dtype(search_dtype) -> None:
    if search_dtype is not None and search_dtype not in SEARCH_DTYPES:
        raise ValueError(
            f"search_dtype must be None (the weights' dtype) or one of {[str(d) for d in SEARCH_DTYPES]}, "
            f"got {search_dtype!r}"
        )


def _check_options(model: nn.Module, calibration, n_bits, group_size, n_grid, clip, search_dtype=None) -> None:
    check_n_bits(n_bits)
    _check_search_dtype(search_dtype)
    _check_group_size(group_size)
    if isinstance(n_grid, bool) or not isinstance(n_grid, int) or n_grid < 2:
        raise ValueError(f"n_grid must be an int >= 2 (the reference uses 20), got {n_grid!r}")
    if not isinstance(clip, bool):
        raise ValueError(f"clip must be True or False, got {clip!r}")
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or calibration.is_floating_point():
        raise ValueError(
            "calibration must be an int64 tensor of token ids [n_samples, seq_len], e.g. "
            "quantcourse.data.calibration_samples(tokenizer, 32, 512); got "
            f"{getattr(calibration, 'shape', type(calibration).__name__)}"
        )
    if calibration.numel() == 0:
        raise ValueError(
            f"calibration holds no tokens (shape {tuple(calibration.shape)}): AWQ needs activations to "
            "measure; pass e.g. quantcourse.data.calibration_samples(tokenizer, 32, 512)"
        )
    blocks = surgery.decoder_blocks(model)
    surgery.scale_groups(blocks[0])  # fails now, before any forward pass, for an unsupported family
    if group_size is not None:
        for name, linear in surgery.find_linears(blocks[0]).items():
            if linear.weight.shape[-1] % group_size:
                width = linear.weight.shape[-1]
                divisors = [
                    g
                    for g in (16, 32, 64, 128)
                    if all(lin.weight.shape[-1] % g == 0 for lin in surgery.find_linears(blocks[0]).values())
                ]
                raise ValueError(
                    f"group_size={group_size} does not divide the {width} inputs of {name}: every linear layer "
                    f"needs whole groups; choose one of {divisors} (or None: one group per row)"
                )


def awq_transform_model(
    model: nn.Module,
    calibration: torch.Tensor,
    n_bits: int = 4,
    *,
    group_size: int | None = 64,
    n_grid: int = N_GRID,
    clip: bool = True,
    search_dtype: torch.dtype | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> AWQReport:
    """Search and apply AWQ's scales (and clips) on every decoder block, in place; weights stay in float.

    Runs on :func:`quantcourse.pipeline.run_blockwise`: block ``i+1`` is searched on the outputs of the
    already scaled and clipped block ``i``. Follow with :func:`quantize_weight` on every linear
    (:func:`awq_quantize_model` does) or with :func:`quantcourse.gptq.quantize_model` (AWQ + GPTQ).

    Args:
        model: a Llama-, OPT- or GPT-2-style causal LM (modified in place).
        calibration: int64 ``[n_samples, seq_len]`` token ids (the reference: 128 × 512 of the Pile).
        n_bits, group_size: the grid the searches aim for (``group_size`` must divide every layer's width;
            on the course model, whose hidden size is 576, 32 or 64).
        n_grid: ratios α tried, and steps of the clip search (20).
        clip: run the clip search after scaling.
        search_dtype: the dtype of the scale search's replays (:func:`awq_block`); ``None``: the weights'.
        batch_size: calibration sequences per forward pass.
        progress: a bar over the blocks.

    Returns:
        :class:`AWQReport` (``quantized`` is ``None``).
    """
    model = surgery.as_plain_linears(model)
    _check_options(model, calibration, n_bits, group_size, n_grid, clip, search_dtype)
    start = time.perf_counter()
    blocks: list[BlockReport] = []

    def transform(ctx: BlockContext) -> None:
        report = awq_block(ctx, n_bits, group_size=group_size, n_grid=n_grid, clip=clip, search_dtype=search_dtype)
        blocks.append(report)

    run_blockwise(
        model,
        calibration,
        transform_block=transform,
        batch_size=batch_size,
        progress=progress,
        desc=f"awq {n_bits}-bit search",
    )
    config = dict(
        method="awq",
        n_bits=n_bits,
        group_size=group_size,
        n_grid=n_grid,
        clip=clip,
        search_dtype=str(search_dtype or "weights"),
        calibration=list(calibration.shape),
    )
    return AWQReport(config, blocks, time.perf_counter() - start)


def awq_quantize_model(
    model: nn.Module,
    calibration: torch.Tensor,
    n_bits: int = 4,
    *,
    group_size: int | None = 64,
    n_grid: int = N_GRID,
    clip: bool = True,
    search_dtype: torch.dtype | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> AWQReport:
    """AWQ on a whole causal LM, in place: scale and clip search (:func:`awq_transform_model`), then
    round-to-nearest of every decoder-block linear on AWQ's grid. Embeddings and the head stay in float.

    Args: as :func:`awq_transform_model`.

    Returns:
        :class:`AWQReport` whose ``quantized`` holds every layer's codes, for
        :func:`quantcourse.serialization.save_quantized`.
    """
    report = awq_transform_model(
        model,
        calibration,
        n_bits,
        group_size=group_size,
        n_grid=n_grid,
        clip=clip,
        search_dtype=search_dtype,
        batch_size=batch_size,
        progress=progress,
    )
    quantized = round_model(model, n_bits, group_size=group_size)
    report.seconds += quantized.seconds
    report.quantized = QuantizedModel(model, quantized.layers, report.config, report.seconds, quantized.layer_seconds)
    return report


def round_model(model: nn.Module, n_bits: int = 4, *, group_size: int | None = 64) -> QuantizedModel:
    """Round every linear layer of the decoder blocks to nearest on AWQ's grid (:func:`quantize_weight`), in place.

    The last step of :func:`awq_quantize_model`; on an untransformed model, the RTN baseline of the AWQ
    paper. Embeddings and the head stay in float.

    Returns:
        :class:`quantcourse.serialization.QuantizedModel` with every layer's codes.
    """
    check_n_bits(n_bits)
    _check_group_size(group_size)
    model = surgery.as_plain_linears(model)
    start = time.perf_counter()
    layers, layer_seconds = {}, {}
    for block_name, block in zip(_block_names(model), surgery.decoder_blocks(model), strict=True):
        for name, linear in surgery.find_linears(block, prefix=f"{block_name}.").items():
            t = time.perf_counter()
            layers[name] = quantize_weight(linear.weight, n_bits, group_size)
            linear.weight = nn.Parameter(layers[name].weight, requires_grad=False)
            layer_seconds[name] = time.perf_counter() - t
    config = dict(method="rtn-awq-grid", n_bits=n_bits, group_size=group_size)
    return QuantizedModel(model, layers, config, time.perf_counter() - start, layer_seconds)


def _block_names(model: nn.Module) -> list[str]:
    names = {id(module): name for name, module in model.named_modules()}
    return [names[id(block)] for block in surgery.decoder_blocks(model)]
