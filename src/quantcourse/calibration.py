"""Post-training calibration: observers that watch activations and choose their quantization range.

Chapter 4 (PTQ calibration) teaches these. An observer is fed calibration batches with
``update(x)`` and asked for ``qparams(n_bits, symmetric=...)``, a :class:`~quantcourse.QParams`
whose range is *static*: chosen once, then used for every later input. The observers differ only
in how they pick the clipping range ``[lo, hi]`` from what they saw:

=================================  =========================================================
``MinMaxObserver``                 the smallest and largest values seen (no clipping)
``MovingAverageMinMaxObserver``    ``min += c * (batch_min - min)`` (and max), c = 0.01
``PercentileObserver``             the ``percentile`` of ``|x|`` (99.99 %), from a histogram
``MSEObserver``                    the threshold with the smallest quantization MSE
``EntropyObserver``                TensorRT's KL-divergence calibration (Migacz, GTC 2017)
=================================  =========================================================

The last three keep a histogram of ``|x|`` with ``num_bins = 2048`` bins over ``[0, max|x|]`` of the
first batch, as NVIDIA's ``pytorch-quantization`` ``HistogramCalibrator`` does; when a later batch
goes beyond the range, bins of the same width are added (and, past ``max_bins``, adjacent bins are
merged so that memory stays bounded). They choose a threshold ``T`` and clip to ``[-T, T]``
(intersected with the observed ``[min, max]`` for the zero-point scheme).

Every observer works per tensor (``PerTensor()``) or per channel (``PerChannel(axis)``, e.g.
``PerChannel(-1)`` for the hidden features of activations ``[batch, seq, hidden]``): the channels
are processed together, as a batch, never one by one in Python.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from .granularity import Granularity, PerChannel, PerTensor
from .primitives import QParams, check_float_tensor, check_n_bits, choose_qparams

__all__ = [
    "Observer",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "HistogramObserver",
    "PercentileObserver",
    "MSEObserver",
    "EntropyObserver",
    "qparams_from_range",
    "mse_candidates",
    "kl_divergence_candidates",
    "OBSERVERS",
    "make_observer",
]


def qparams_from_range(
    lo: torch.Tensor,
    hi: torch.Tensor,
    n_bits: int,
    *,
    symmetric: bool = True,
    granularity: Granularity = PerTensor(),
    param_shape: tuple[int, ...] = (),
) -> QParams:
    """The ``QParams`` of a clipping range ``[lo, hi]`` (one range per channel).

    They are exactly what :func:`~quantcourse.choose_qparams` computes for a tensor whose
    smallest and largest values are ``lo`` and ``hi``, so it is asked for exactly that.

    Args:
        lo, hi: float ``[C]`` (``C = 1`` per tensor).
        n_bits, symmetric: as in ``choose_qparams``.
        granularity: stored in the result.
        param_shape: shape of the result's ``scale`` and ``zero_point`` (``C`` elements).
    """
    ends = torch.stack([lo.float(), hi.float()], dim=-1)  # [C, 2]
    qp = choose_qparams(ends, n_bits, symmetric=symmetric, granularity=PerChannel(0))
    return QParams(qp.scale.reshape(param_shape), qp.zero_point.reshape(param_shape), n_bits, symmetric, granularity)


class Observer(ABC):
    """Base class: tracks the running min and max per channel and turns a range into ``QParams``.

    Args:
        granularity: ``PerTensor()`` or ``PerChannel(axis)``.
    """

    def __init__(self, *, granularity: Granularity = PerTensor()) -> None:
        if not isinstance(granularity, (PerTensor, PerChannel)):
            raise TypeError(
                f"observers work PerTensor() or PerChannel(axis), got {granularity!r}; "
                "per-token ranges are dynamic: use quantcourse.fake_quantize with PerToken()"
            )
        self.granularity = granularity
        self.min_val: torch.Tensor | None = None  # float32 [C]
        self.max_val: torch.Tensor | None = None
        self._shape: tuple[int, ...] | None = None  # parameter shape for the inputs seen

    def _channels(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as ``[C, elements]`` (``C = 1`` per tensor)."""
        if isinstance(self.granularity, PerTensor):
            shape = ()
            flat = x.reshape(1, -1)
        else:
            self.granularity.check(x)
            shape = self.granularity.param_shape(x.shape)
            flat = x.movedim(self.granularity.axis, 0).reshape(x.shape[self.granularity.axis], -1)
        if self._shape is not None and shape != self._shape:
            raise ValueError(
                f"{type(self).__name__} with {self.granularity} saw inputs whose parameters have shape "
                f"{self._shape}, now an input of shape {tuple(x.shape)} (parameters {shape}): "
                "feed tensors with the same number of dimensions and channels"
            )
        self._shape = shape
        return flat

    def update(self, x: torch.Tensor) -> None:
        """Observe one calibration batch ``x`` (float, any shape with the channel axis)."""
        check_float_tensor(x, "x")
        flat = self._channels(x.detach())
        lo, hi = flat.amin(dim=1).float(), flat.amax(dim=1).float()
        self._update_range(lo, hi)
        self._observe(flat)

    def _update_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        if self.min_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val, self.max_val = torch.minimum(self.min_val, lo), torch.maximum(self.max_val, hi)

    def as_observer(self, cls: type[Observer], **kwargs) -> Observer:
        """A ``cls`` observer holding the statistics this one gathered: calibrate once, compare methods.

        A :class:`HistogramObserver` can become any histogram observer (its histogram is shared, not
        copied) or a :class:`MinMaxObserver`; any observer can become a ``MinMaxObserver``.
        ``kwargs`` are ``cls``'s own hyperparameters (e.g. ``percentile=99.9``).
        """
        target = cls(granularity=self.granularity, **kwargs)
        if cls is not MinMaxObserver and not (
            issubclass(cls, HistogramObserver) and isinstance(self, HistogramObserver)
        ):
            raise TypeError(
                f"a {type(self).__name__} cannot stand in for a {cls.__name__}: only a histogram observer "
                "can become another histogram observer; calibrate a new one instead"
            )
        target.min_val, target.max_val, target._shape = self.min_val, self.max_val, self._shape
        if isinstance(target, HistogramObserver):
            target.num_bins, target.max_bins = self.num_bins, self.max_bins
            target.hist, target.width, target.n_bins = self.hist, self.width, self.n_bins
        return target

    def _observe(self, flat: torch.Tensor) -> None:  # noqa: B027 - a hook with a do-nothing default, not abstract
        """Hook for observers that keep more than the range (histograms)."""

    @abstractmethod
    def clipping_range(self, n_bits: int, *, symmetric: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The range ``(lo, hi)``, float32 ``[C]`` each, that the quantization grid will cover."""

    def _check_ready(self) -> None:
        if self.min_val is None:
            raise RuntimeError(
                f"{type(self).__name__} has not seen any data: call update(x) with calibration "
                "batches before asking for qparams"
            )

    def qparams(self, n_bits: int, *, symmetric: bool = True) -> QParams:
        """Quantization parameters for the data seen so far.

        Returns:
            ``QParams`` whose ``scale`` has shape ``[]`` per tensor, or the ``PerChannel`` parameter
            shape of the inputs (e.g. ``[1, 1, hidden]`` for ``PerChannel(-1)`` on ``[batch, seq, hidden]``).
        """
        self._check_ready()
        check_n_bits(n_bits)
        if not isinstance(symmetric, bool):
            raise TypeError(f"symmetric must be True (absmax) or False (zero point), got {symmetric!r}")
        lo, hi = self.clipping_range(n_bits, symmetric=symmetric)
        return qparams_from_range(
            lo, hi, n_bits, symmetric=symmetric, granularity=self.granularity, param_shape=self._shape
        )


class MinMaxObserver(Observer):
    """The full observed range: nothing is clipped, one outlier stretches the grid (chapter 4)."""

    def clipping_range(self, n_bits: int, *, symmetric: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_ready()
        return self.min_val, self.max_val


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Exponential moving average of each batch's min and max, as ``torch.ao``'s observer of that name.

    The first batch sets the range; every later one moves it: ``min += c * (batch_min - min)``.

    Args:
        averaging_constant: ``c`` in (0, 1]; default 0.01 (PyTorch's).
    """

    def __init__(self, *, averaging_constant: float = 0.01, granularity: Granularity = PerTensor()) -> None:
        super().__init__(granularity=granularity)
        if not 0 < averaging_constant <= 1:
            raise ValueError(f"averaging_constant must be in (0, 1], got {averaging_constant!r}")
        self.averaging_constant = averaging_constant

    def _update_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        if self.min_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            c = self.averaging_constant
            self.min_val = self.min_val + c * (lo - self.min_val)
            self.max_val = self.max_val + c * (hi - self.max_val)


class HistogramObserver(Observer):
    """Base of the observers that keep a histogram of ``|x|`` per channel and choose a threshold ``T``.

    Bin ``j`` of a channel counts ``j * width <= |x| < (j + 1) * width`` (the largest value goes in
    the last bin). ``width = max|x| / num_bins`` of the first batch that has a non-zero value; a later,
    larger value adds bins of the same width (NVIDIA's ``HistogramCalibrator``). Beyond ``max_bins``
    bins, groups of adjacent bins are merged into one.

    Args:
        num_bins: bins over the first batch's range (2048 as NVIDIA's and TensorRT's).
        max_bins: most bins a histogram may grow to before merging.
        granularity: ``PerTensor()`` or ``PerChannel(axis)``.
    """

    def __init__(self, *, num_bins: int = 2048, max_bins: int = 16384, granularity: Granularity = PerTensor()) -> None:
        super().__init__(granularity=granularity)
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 2:
            raise ValueError(f"num_bins must be an int >= 2, got {num_bins!r}")
        if not isinstance(max_bins, int) or max_bins < num_bins:
            raise ValueError(f"max_bins must be an int >= num_bins ({num_bins}), got {max_bins!r}")
        self.num_bins, self.max_bins = num_bins, max_bins
        self.hist: torch.Tensor | None = None  # float64 counts [C, B]
        self.width: torch.Tensor | None = None  # float64 [C]; 0 while a channel has seen only zeros
        self.n_bins: torch.Tensor | None = None  # int64 [C]: bins in use per channel (<= B)

    def _observe(self, flat: torch.Tensor) -> None:
        a = flat.abs().double()  # [C, N]
        amax = a.amax(dim=1)
        if self.hist is None:
            C = a.shape[0]
            self.hist = torch.zeros(C, self.num_bins, dtype=torch.float64, device=a.device)
            self.width = torch.zeros(C, dtype=torch.float64, device=a.device)
            self.n_bins = torch.full((C,), self.num_bins, dtype=torch.int64, device=a.device)
        fresh = (self.width == 0) & (amax > 0)  # channels seeing their first non-zero value
        self.width = torch.where(fresh, amax / self.num_bins, self.width)
        self._grow(amax)
        safe_width = torch.where(self.width > 0, self.width, 1.0)[:, None]
        idx = torch.minimum((a / safe_width).floor().long(), (self.n_bins - 1)[:, None])  # [C, N]
        B = self.hist.shape[1]
        idx += torch.arange(a.shape[0], device=a.device)[:, None] * B  # one bincount for all channels
        self.hist += torch.bincount(idx.flatten(), minlength=a.shape[0] * B).view(-1, B).double()

    def _grow(self, amax: torch.Tensor) -> None:
        """Add bins of the same width so that ``amax`` fits; merge bins beyond ``max_bins``."""
        need = torch.where(self.width > 0, (amax / torch.where(self.width > 0, self.width, 1.0)).ceil(), 0.0).long()
        need = torch.maximum(need, self.n_bins)
        factor = (need + self.max_bins - 1) // self.max_bins  # [C], 1 unless too many bins
        if bool((factor > 1).any()):
            self._merge(factor)
            need = (need + factor - 1) // factor
        self.n_bins = need
        B = int(need.max())
        if self.hist.shape[1] < B:
            self.hist = torch.nn.functional.pad(self.hist, (0, B - self.hist.shape[1]))

    def _merge(self, factor: torch.Tensor) -> None:
        """Merge each channel's bins in groups of ``factor[c]`` (width grows by that factor)."""
        j = torch.arange(self.hist.shape[1], device=self.hist.device)[None, :] // factor[:, None]
        self.hist = torch.zeros_like(self.hist).scatter_add_(1, j, self.hist)
        self.width = self.width * factor
        self.n_bins = (self.n_bins + factor - 1) // factor

    @abstractmethod
    def threshold(self, n_bits: int, *, symmetric: bool = True) -> torch.Tensor:
        """The clipping threshold ``T`` (float32 ``[C]``) on ``|x|``."""

    def _magnitude_levels(self, n_bits: int, symmetric: bool) -> torch.Tensor:
        """Grid steps between 0 and ``T`` per channel: ``2^(b-1) - 1``, or ``2^b - 1`` for non-negative
        data under the zero-point scheme (NVIDIA's ``unsigned``)."""
        unsigned = (self.min_val >= 0) if not symmetric else torch.zeros_like(self.min_val, dtype=torch.bool)
        return torch.where(unsigned, 2**n_bits - 1, 2 ** (n_bits - 1) - 1).to(torch.int64)

    def clipping_range(self, n_bits: int, *, symmetric: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_ready()
        T = self.threshold(n_bits, symmetric=symmetric).float()
        if symmetric:
            return -T, T
        return torch.maximum(self.min_val, -T), torch.minimum(self.max_val, T)


class PercentileObserver(HistogramObserver):
    """Clip ``|x|`` at a percentile of the observed values (NVIDIA's ``percentile`` method).

    ``T`` is the left edge of the bin in which the cumulative count crosses ``percentile / 100``:
    within one bin width of ``torch.quantile(|x|, percentile / 100)``.

    Args:
        percentile: in (0, 100]; default 99.99 (NVIDIA's).
    """

    def __init__(
        self,
        *,
        percentile: float = 99.99,
        num_bins: int = 2048,
        max_bins: int = 16384,
        granularity: Granularity = PerTensor(),
    ) -> None:
        if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 0 < percentile <= 100:
            raise ValueError(f"percentile must be a number in (0, 100], e.g. 99.99, got {percentile!r}")
        super().__init__(num_bins=num_bins, max_bins=max_bins, granularity=granularity)
        self.percentile = float(percentile)

    def threshold(self, n_bits: int, *, symmetric: bool = True) -> torch.Tensor:
        self._check_ready()
        cdf = self.hist.cumsum(dim=1)
        cdf = cdf / cdf[:, -1:].clamp(min=1)
        # 99.9 / 100 is 0.9990000000000001 in floating point: without the guard an exact crossing is missed
        target = torch.full((cdf.shape[0], 1), self.percentile / 100 - 1e-12, dtype=cdf.dtype, device=cdf.device)
        idx = torch.searchsorted(cdf, target).squeeze(1)  # first bin whose cdf >= p
        return torch.minimum(idx, self.n_bins) * self.width


def _prefix(values: torch.Tensor) -> torch.Tensor:
    """``[C, B] -> [C, B + 1]`` cumulative sums with a leading 0: ``out[:, j] = values[:, :j].sum(1)``."""
    return torch.cat([values.new_zeros(values.shape[0], 1), values.cumsum(1)], dim=1)


def _segment_sums(prefix: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Sums over bins ``edges[..., m] .. edges[..., m+1] - 1``: ``[C, B+1]`` and ``[C, k, M+1]`` -> ``[C, k, M]``."""
    at = prefix[:, None, :].expand(-1, edges.shape[1], -1).gather(2, edges)
    return at.diff(dim=2)


def _candidate_chunks(candidates: torch.Tensor, C: int, width: int, budget: int = 1 << 21) -> tuple[torch.Tensor, ...]:
    """Split the candidates so that each ``[C, k, width]`` tensor holds about ``budget`` elements."""
    return candidates.split(max(1, budget // max(1, C * width)))


def mse_candidates(
    hist: torch.Tensor, width: torch.Tensor, candidates: torch.Tensor, levels: torch.Tensor
) -> torch.Tensor:
    """Count-weighted squared quantization error of the bin centers for each candidate threshold.

    Candidate ``i`` sets ``T = c_i`` with ``c_j = (j + 0.5) * width`` the bin centers, and the grid
    ``q(c) = min(round(c / s), L) * s`` with ``s = T / L``. The error is
    ``sum_j hist_j (q(c_j) - c_j)^2`` (NVIDIA's ``mse`` method). The bins that round to the same
    code ``m`` are contiguous, so with prefix sums ``H0, H1, H2`` of ``hist``, ``hist c``, ``hist c^2``
    each code contributes ``H2 - 2 m s H1 + m^2 s^2 H0``: ``O(K L)`` work instead of ``O(K B)``.
    (Code ``m`` holds the bins with ``(2m - 1)(2i + 1) <= 2L(2j + 1)``, and never with equality.)

    Args:
        hist: float64 ``[C, B]``; width: float64 ``[C]``; candidates: int64 ``[K]`` in ``[0, B)``;
        levels: int64 ``[C]``, the top code ``L`` (127 for signed int8).

    Returns:
        float64 ``[C, K]``.
    """
    C, B = hist.shape
    centers = (torch.arange(B, dtype=torch.float64, device=hist.device) + 0.5) * width[:, None]
    H0, H1, H2 = _prefix(hist), _prefix(hist * centers), _prefix(hist * centers**2)
    L = levels[:, None, None]
    m = torch.arange(int(levels.max()) + 2, device=hist.device)[None, None, :]  # codes 0..L, and an end
    out = []
    for chunk in _candidate_chunks(candidates, C, m.shape[2]):
        i = chunk[None, :, None]
        num = (2 * m - 1) * (2 * i + 1) - 2 * L
        edges = torch.where(m > L, B, (-(-num // (4 * L))).clamp(0, B))  # [C, k, L + 2]: first bin of code m
        s = ((i + 0.5) * width[:, None, None]) / L  # [C, k, 1]
        code = m[:, :, :-1].double()
        err = (
            _segment_sums(H2, edges)
            - 2 * code * s * _segment_sums(H1, edges)
            + (code * s) ** 2 * _segment_sums(H0, edges)
        )
        out.append(err.sum(2))
    return torch.cat(out, dim=1)


class MSEObserver(HistogramObserver):
    """Choose the threshold with the smallest quantization MSE (NVIDIA's ``mse`` method).

    Every bin center ``c_i`` from ``start_bin`` on is a candidate ``T``, scored by
    :func:`mse_candidates` with the bin centers standing in for the values; the first minimum wins.

    Args:
        start_bin: first candidate bin (128 as NVIDIA's).
    """

    def __init__(
        self,
        *,
        start_bin: int = 128,
        num_bins: int = 2048,
        max_bins: int = 16384,
        granularity: Granularity = PerTensor(),
    ) -> None:
        super().__init__(num_bins=num_bins, max_bins=max_bins, granularity=granularity)
        if isinstance(start_bin, bool) or not isinstance(start_bin, int) or not 0 <= start_bin < num_bins:
            raise ValueError(f"start_bin must be an int in [0, num_bins={num_bins}), got {start_bin!r}")
        self.start_bin = start_bin

    def errors(self, n_bits: int, *, symmetric: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``(candidates [K], error [C, K])``: the curve the threshold minimizes (``inf`` past a channel's bins)."""
        self._check_ready()
        cand = torch.arange(self.start_bin, self.hist.shape[1], device=self.hist.device)
        err = mse_candidates(self.hist, self.width, cand, self._magnitude_levels(n_bits, symmetric))
        err[cand[None, :] >= self.n_bins[:, None]] = torch.inf
        return cand, err

    def threshold(self, n_bits: int, *, symmetric: bool = True) -> torch.Tensor:
        cand, err = self.errors(n_bits, symmetric=symmetric)
        return (cand[err.argmin(dim=1)] + 0.5) * self.width


def kl_divergence_candidates(hist: torch.Tensor, candidates: torch.Tensor, n_levels: torch.Tensor) -> torch.Tensor:
    """TensorRT's KL divergence for each candidate threshold bin, all at once.

    For candidate ``i`` (the threshold is the left edge of bin ``i``):

    - ``P`` = ``hist[:i]`` with the clipped mass ``o = sum(hist[i:])`` added to ``P[i-1]``;
    - ``Q``: bins ``0..i-1`` merged into ``L = n_levels`` levels (bin ``j`` goes to level
      ``floor(j * L / i)``, so level ``k`` holds bins ``ceil(k i / L) .. ceil((k+1) i / L) - 1``),
      each level's count ``S_k`` spread evenly over its ``n_k`` non-empty bins (empty bins get 0);
    - both normalized, and ``KL(P || Q) = sum_j P_j log(P_j / Q_j)`` (``inf`` where ``P_j > 0 = Q_j``).

    Since ``Q`` is constant over the non-empty bins of a level, the sum needs no loop over bins:
    with counts ``Z_P = sum P = sum(hist)`` and ``Z_Q = sum(hist[:i])``,

    ``KL = (sum_j P_j log P_j - sum_k (S_k + o [k = level(i-1)]) log(S_k / n_k)) / Z_P - log Z_P + log Z_Q``

    and both sums come from prefix sums of ``hist``, ``hist log hist`` and ``hist > 0``:
    ``O(K L)`` work for ``K`` candidates instead of ``O(K B)``.

    Args:
        hist: float64 ``[C, B]`` counts.
        candidates: int64 ``[K]`` bins, each in ``[1, B]``.
        n_levels: int64 ``[C]`` quantization levels (128 for signed int8).

    Returns:
        float64 ``[C, K]``.
    """
    C, B = hist.shape
    cum, cum_nonempty = _prefix(hist), _prefix((hist > 0).double())
    cum_hlogh = _prefix(torch.special.xlogy(hist, hist))
    L = n_levels[:, None, None]  # [C, 1, 1]
    k = torch.arange(int(n_levels.max()) + 1, device=hist.device)[None, None, :]  # [1, 1, L + 1]
    out = []
    for chunk in _candidate_chunks(candidates, C, k.shape[2]):
        i = chunk[None, :].expand(C, -1)  # [C, k]
        total, below = cum[:, -1:], cum.gather(1, i)  # Z_P [C, 1], Z_Q [C, k]
        last, clipped = hist.gather(1, i - 1), total - below  # hist[i-1], o
        edges = ((k * i[:, :, None] + L - 1) // L).clamp(max=i[:, :, None])  # [C, k, L + 1]: ceil(k i / L)
        S, n = _segment_sums(cum, edges), _segment_sums(cum_nonempty, edges)  # level sums, non-empty bins
        level_last = ((i - 1) * L[:, :, 0]) // i  # [C, k]
        weight = S + clipped[:, :, None] * (k[:, :, :-1] == level_last[:, :, None])  # P mass of each level
        p_log_q = torch.where(n > 0, weight * (S / n.clamp(min=1)).clamp(min=1e-300).log(), 0.0).sum(2)
        p_log_p = cum_hlogh.gather(1, i - 1) + torch.special.xlogy(last + clipped, last + clipped)
        kl = (p_log_p - p_log_q) / total - total.log() + below.log()
        # P[i-1] > 0 on an empty bin i-1 (only the clipped mass lands there): Q is 0 there, KL is infinite
        out.append(torch.where((last == 0) & (clipped > 0), torch.inf, kl))
    return torch.cat(out, dim=1)


class EntropyObserver(HistogramObserver):
    """TensorRT's entropy calibration: the threshold whose clipped, ``2^(b-1)``-level version of the
    histogram is closest to the original in KL divergence (Migacz, GTC 2017; NVIDIA's ``entropy``).

    As NVIDIA's ``pytorch-quantization``: ``hist[0]`` is replaced by ``hist[1]`` (a spike of exact
    zeros would dominate), candidates are the bins ``start_bin..B``, the *last* minimum wins, and
    ``T`` is the left edge of the chosen bin, ``i * width``. The levels are ``2^(b-1)`` (128 for
    8 bits: 7 bits of magnitude and a sign), or ``2^b`` for non-negative data under the zero-point
    scheme. See :func:`kl_divergence_candidates` for ``P`` and ``Q``.

    Args:
        start_bin: first candidate (128 as TensorRT's).
    """

    def __init__(
        self,
        *,
        start_bin: int = 128,
        num_bins: int = 2048,
        max_bins: int = 16384,
        granularity: Granularity = PerTensor(),
    ) -> None:
        super().__init__(num_bins=num_bins, max_bins=max_bins, granularity=granularity)
        if isinstance(start_bin, bool) or not isinstance(start_bin, int) or not 1 <= start_bin <= num_bins:
            raise ValueError(f"start_bin must be an int in [1, num_bins={num_bins}], got {start_bin!r}")
        self.start_bin = start_bin

    def divergences(self, n_bits: int, *, symmetric: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``(candidates [K], KL [C, K])``: the curve the threshold minimizes (``inf`` past a channel's bins)."""
        self._check_ready()
        hist = self.hist.clone()
        hist[:, 0] = hist[:, 1]
        n_levels = self._magnitude_levels(n_bits, symmetric) + 1
        cand = torch.arange(self.start_bin, hist.shape[1] + 1, device=hist.device)
        kl = kl_divergence_candidates(hist, cand, n_levels)
        kl[cand[None, :] > self.n_bins[:, None]] = torch.inf
        return cand, kl

    def threshold(self, n_bits: int, *, symmetric: bool = True) -> torch.Tensor:
        cand, kl = self.divergences(n_bits, symmetric=symmetric)
        last_min = kl.shape[1] - 1 - kl.flip(1).argmin(dim=1)
        return cand[last_min] * self.width


OBSERVERS = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "entropy": EntropyObserver,
}


def make_observer(name: str, **kwargs) -> Observer:
    """An observer by name (``"minmax"``, ``"moving_average"``, ``"percentile"``, ``"mse"``, ``"entropy"``)."""
    if name not in OBSERVERS:
        raise ValueError(f"unknown observer {name!r}: choose one of {sorted(OBSERVERS)}")
    return OBSERVERS[name](**kwargs)
