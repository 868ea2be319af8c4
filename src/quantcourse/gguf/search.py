"""The scale searches of llama.cpp's K-quants, for all sub-blocks at once.

Chapter 11 (GGUF). A K-quant does not simply take ``scale = absmax / qmax``: for every
sub-block of 16 or 32 weights it tries a fixed number of candidate scales and keeps the one
with the smallest weighted error (``make_qkx2_quants`` for the formats with a minimum,
``make_qx_quants`` and ``make_q3_quants`` for the symmetric ones). The candidates are a
short, fixed list, so the loops here run over candidates (and over the 16 or 32 positions of
a sum, to add in the C code's order), never over single blocks; ``make_qx_quants``, whose
candidates are independent, takes them all at once over cache-sized batches of sub-blocks.

Every tensor is position-major: ``x`` is float32 ``[n, B]`` for ``B`` sub-blocks of ``n``.
On this CPU build a comparison (a bool tensor) costs several arithmetic ops, ``torch.where`` on a
whole chunk about thirty, and a fresh whole-chunk tensor (page faults) more than the arithmetic
done on it: hence the buffers reused across candidates and the in-place updates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .cfloat import div, first_absmax, nearest_int, nearest_int_, positive_max, recip, seq_sum

__all__ = ["SearchResult", "make_qkx2_quants", "make_qx_quants", "make_q3_quants", "make_qp_quants"]

GROUP_MAX_EPS = 1e-15


@dataclass(frozen=True)
class SearchResult:
    """Result of a scale search over ``B`` sub-blocks.

    Attributes:
        scale: float32 ``[B]``.
        min: float32 ``[B]``, the (positive) amount subtracted, x ≈ scale·L − min; zeros for symmetric searches.
        L: int32 ``[n, B]`` codes (offset to be non-negative, as the C code stores them).
    """

    scale: torch.Tensor
    min: torch.Tensor
    L: torch.Tensor


def _f32(v: float) -> float:
    """A Python float holding the float32 value C would compute."""
    return float(np.float32(v))


_SAFE = 2.0**21  # below 2**22, torch.round (half to even) and nearest_int agree


def _grid_codes(
    x: torch.Tensor,
    iscale: torch.Tensor,
    spread: torch.Tensor,
    lowest: int,
    highest: int,
    skip: torch.Tensor,
    out: torch.Tensor,
    lo: torch.Tensor | None = None,
) -> torch.Tensor:
    """``MAX(lowest, MIN(highest, nearest_int(iscale·(x − lo))))`` as float32 codes, into ``out`` ``[n, B]``.

    ``torch.round`` then ``clamp`` (three passes over memory instead of seven) equals the C bit
    trick whenever ``|iscale·(x − lo)| < 2**22``; ``spread`` [B] bounds ``|x − lo|`` so that one
    small check per call proves it. Sub-blocks in ``skip`` (whose result is overwritten) are left
    out of the check. Otherwise the bit trick runs: tiny sub-blocks make ``iscale`` overflow, and
    then ``inf`` and ``NaN`` (from 0·inf) become code 0 in C, not ``highest``.

    Args:
        x: float32 ``[n, B]``; iscale, spread, skip: ``[B]``; lo: optional ``[B]`` offset (0 when None).
    """
    if lo is None:
        torch.mul(x, iscale, out=out)
    else:
        torch.sub(x, lo, out=out).mul_(iscale)
    if bool(((iscale.abs() * spread < _SAFE) | skip).all()):
        return out.round_().clamp_(lowest, highest)
    out.copy_(nearest_int(out).clamp_(lowest, highest))
    return out


def make_qkx2_quants(
    x: torch.Tensor, w: torch.Tensor, *, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> SearchResult:
    """Asymmetric scale search (``make_qkx2_quants``): codes 0..nmax, x ≈ scale·L − min.

    Start from the min/max grid, then try ``iscale = (rmin + rdelta·is + nmax) / (max − min)``
    for ``is = 0..nstep`` (``min`` being the best offset found so far); for each, fit scale and
    min by weighted least squares (the 2×2 normal equations; min clamped to ≤ 0) and keep it if
    the weighted error (squared, or absolute when ``use_mad``) is lower.

    This is the hot loop of Q4_K, Q5_K and Q2_K, so it keeps memory traffic low: every
    candidate writes into the same three buffers, the three weighted sums are added in one
    sequential pass, and the winning codes are recomputed once at the end from the winning
    ``(iscale, min)`` instead of being copied at every step.

    Args:
        x, w: float32 ``[n, B]`` values and importance weights.
        nmax: largest code (15 for Q4_K, 31 for Q5_K, 3 for Q2_K).
        rmin, rdelta, nstep: the candidate grid (Q4_K: −1, 0.1, 20).
        use_mad: absolute instead of squared error (Q2_K).
    Returns:
        :class:`SearchResult` with ``min`` = −(fitted offset) ≥ 0.
    """
    xmin = x.amin(dim=0)
    lo0 = xmin.clamp(max=0)  # [B]; the C code sets min = 0 when min > 0
    hi = x.amax(dim=0)
    flat = hi == lo0  # the C code returns scale 0, codes 0 before searching
    sum_w = seq_sum(w[1:], start=w[0])
    sum_x = seq_sum(w[1:] * x[1:], start=w[0] * x[0])
    Laux = torch.empty_like(x)  # the candidate's codes
    sums = torch.empty((x.shape[0], 3, x.shape[1]), dtype=x.dtype, device=x.device)  # w·L, w·L², w·L·x
    diff = torch.empty_like(x)

    def spread(lo):  # max |x - lo| over the sub-block
        return torch.maximum(hi - lo, (xmin - lo).abs())

    def weighted_error(L, scale, lo):
        torch.mul(L, scale, out=diff).add_(lo).sub_(x)  # ((scale*L) + min) - x, as in C
        diff.abs_() if use_mad else diff.mul_(diff)
        return seq_sum(diff.mul_(w))

    best_iscale = div(float(nmax), hi - lo0)
    best_lo_used = lo0  # the offset the winning codes were computed from
    scale, lo = recip(best_iscale), lo0
    best = weighted_error(_grid_codes(x, best_iscale, spread(lo0), 0, nmax, flat, Laux, lo0), scale, lo)
    for step in range(nstep + 1):
        num = _f32(_f32(rmin + _f32(_f32(rdelta) * step)) + nmax)
        # the grid is re-centred on the best min found so far, as in the C loop
        iscale = div(num, hi - lo)
        _grid_codes(x, iscale, spread(lo), 0, nmax, flat, Laux, lo)
        wl = torch.mul(w, Laux, out=sums[:, 0])
        torch.mul(wl, Laux, out=sums[:, 1])
        torch.mul(wl, x, out=sums[:, 2])
        sum_l, sum_l2, sum_xl = seq_sum(sums)  # each one in the C loop's order
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        clip = this_min > 0
        this_scale = torch.where(clip, sum_xl / sum_l2, this_scale)
        this_min = torch.where(clip, torch.zeros_like(this_min), this_min)
        err = weighted_error(Laux, this_scale, this_min)
        better = (D > 0) & (err < best)
        best = torch.where(better, err, best)
        best_iscale = torch.where(better, iscale, best_iscale)
        best_lo_used = torch.where(better, lo, best_lo_used)
        scale = torch.where(better, this_scale, scale)
        lo = torch.where(better, this_min, lo)
    L = _grid_codes(x, best_iscale, spread(best_lo_used), 0, nmax, flat, Laux, best_lo_used)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    L = L.to(torch.int32).mul_((~flat).to(torch.int32))  # flat: codes 0 (a NaN code converts first, then is zeroed)
    lo = torch.where(flat, lo0, lo)
    return SearchResult(scale=scale, min=-lo, L=L)


_TRIAL_BYTES = 2**19  # the [n, trials, columns] temporaries of one batch of columns: about L2-sized


def make_qx_quants(x: torch.Tensor, *, nmax: int, w: torch.Tensor | None = None) -> SearchResult:
    """Symmetric scale search (``make_qx_quants`` with ``rmse_type = 1``): codes −nmax..nmax−1.

    ``iscale = −nmax / max`` (max: the signed element of largest magnitude), least-squares
    scale with weights ``x²`` (or ``w``), then 18 more candidates ``−(nmax + 0.1·is) / max``,
    ``is = ±1..±9``, kept when they raise ``(Σwxl)² / Σwl²``.

    The 19 candidates do not depend on each other's codes, only the choice among them is sequential:
    their sums are computed as one batched tensor op, ``[n, 19, columns]`` (:func:`_trial_sums`),
    and the sequential choice then runs over ``[B]`` rows of sums; the winning codes are recomputed once.

    Args:
        x: float32 ``[n, B]``.
        nmax: 32 for Q6_K, 8 for Q4_0 and 16 for Q5_0 with an importance matrix.
        w: optional float32 ``[n, B]`` weights (the importance matrix); ``x²`` when None.
    Returns:
        :class:`SearchResult`; ``L`` holds ``l + nmax`` in 0..2·nmax−1.
    """
    mx = first_absmax(x, 0)  # [B]
    w = x * x if w is None else w
    skip = mx.abs() < GROUP_MAX_EPS  # zero blocks: the C code returns before searching
    # Dividing by inf gives the skipped sub-blocks iscale = 0 and codes 0, so every candidate is finite. For the
    # others |iscale·x| <= nmax + 0.9, far below 2**22: torch.round equals nearest_int (see _grid_codes).
    mx = torch.where(skip, torch.full_like(mx, float("inf")), mx)
    steps = [0] + [s for s in range(-9, 10) if s != 0]  # the C order: the first guess, then is = -9..9
    nums = torch.tensor([-_f32(nmax + _f32(_f32(0.1) * s)) for s in steps], dtype=x.dtype, device=x.device)
    iscales = torch.div(nums[:, None], mx)  # [19, B], each a correctly rounded float32 quotient
    sumlx, suml2 = _trial_sums(x, w, iscales, -nmax, nmax - 1)  # [19, B] each
    zero = torch.zeros_like(mx)
    scale = torch.where(suml2[0] != 0, sumlx[0] / suml2[0], zero)
    best = scale * sumlx[0]
    pick = torch.zeros(mx.shape, dtype=torch.int32, device=x.device)  # index of the candidate kept
    for k in range(1, len(steps)):  # [B] rows: small tensors come from the heap, whole [19, B] ones would not
        slx, sl2 = sumlx[k], suml2[k]
        better = (sl2 > 0) & (slx * slx > best * sl2)
        best = torch.where(better, slx / sl2 * slx, best)
        pick = torch.maximum(pick, better.to(torch.int32) * k)  # k grows: the last candidate kept wins
    at = pick.to(torch.long)[None]
    slx, sl2 = sumlx.gather(0, at)[0], suml2.gather(0, at)[0]
    scale = torch.where(pick > 0, slx / sl2, scale)
    l = torch.mul(x, iscales.gather(0, at)).round_().clamp_(-nmax, nmax - 1)
    keep = (~skip).to(torch.int32)
    return SearchResult(scale=torch.where(skip, zero, scale), min=zero, L=l.to(torch.int32).add_(nmax).mul_(keep))


def _trial_sums(
    x: torch.Tensor, w: torch.Tensor, iscales: torch.Tensor, lowest: int, highest: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``Σ (w·x)·l`` and ``Σ (w·l)·l`` with ``l = clamp(round(iscale·x))`` for ``T`` candidate scales at once.

    One op covers every candidate of a batch of columns; the batches keep its ``[n, T, columns]``
    temporaries near cache size (a whole chunk's would be ~19 MiB, read from memory at every op).

    Args:
        x, w: float32 ``[n, B]``; iscales: float32 ``[T, B]`` (|iscale·x| < 2**21).
    Returns:
        float32 ``[T, B]`` twice, each sum in the C loop's order.
    """
    n, B = x.shape
    T = iscales.shape[0]
    cols = max(1, _TRIAL_BYTES // (4 * n * T))
    out = torch.empty((2, T, B), dtype=x.dtype, device=x.device)
    wx = w * x
    # two buffers for every batch: fresh memory at each one would cost more than the arithmetic
    l_buf = torch.empty((n, T, min(cols, B)), dtype=x.dtype, device=x.device)
    terms_buf = torch.empty((n, 2) + l_buf.shape[1:], dtype=x.dtype, device=x.device)
    for c in range(0, B, cols):
        s, width = slice(c, c + cols), min(cols, B - c)
        l = torch.mul(x[:, None, s], iscales[None, :, s], out=l_buf[..., :width]).round_().clamp_(lowest, highest)
        terms = terms_buf[..., :width]
        torch.mul(wx[:, None, s], l, out=terms[:, 0])
        torch.mul(w[:, None, s], l, out=terms[:, 1]).mul_(l)
        out[:, :, s] = seq_sum(terms)
    return out[0], out[1]


def make_q3_quants(x: torch.Tensor, *, nmax: int = 4, n_passes: int = 5) -> SearchResult:
    """Symmetric search with coordinate descent (``make_q3_quants``, ``do_rmse = true``) for Q3_K.

    Start from ``l = nearest_int(−nmax / max · x)`` in −nmax..nmax−1, weights ``x²``; then up
    to ``n_passes`` passes that move one code at a time to its best value given the others and
    keep the move when it raises ``(Σwxl)² / Σwl²`` (:func:`_descend_by_moves`).

    Args:
        x: float32 ``[n, B]``.
    Returns:
        :class:`SearchResult`; ``L`` holds ``l + nmax`` in 0..2·nmax−1.
    """
    mx = first_absmax(x, 0)
    zero = mx.abs() < GROUP_MAX_EPS  # the C code returns before searching
    w = x * x
    wx = w * x
    # As in make_qx_quants: inf gives the zero sub-blocks codes 0 (so they never move), and |iscale·x| <= nmax
    # elsewhere, where torch.round equals nearest_int.
    iscale = div(float(-nmax), torch.where(zero, torch.full_like(mx, float("inf")), mx))
    L = torch.mul(x, iscale).round_().clamp_(-nmax, nmax - 1)  # [n, B]
    L, sumlx, suml2 = _descend_by_moves(x, w, wx, L, lowest=-nmax, highest=nmax - 1, n_passes=n_passes)
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    return SearchResult(
        scale=torch.where(zero, torch.zeros_like(scale), scale),
        min=torch.zeros_like(scale),
        L=L.to(torch.int32).add_(nmax).mul_((~zero).to(torch.int32)),
    )


def _codes_near(v: torch.Tensor, lowest: int, highest: int) -> torch.Tensor:
    """``MAX(lowest, MIN(highest, nearest_int(v)))`` as float32, in place of the temporary ``v``
    (see :func:`_grid_codes` for why ``round`` may do)."""
    lo, hi = torch.aminmax(v)  # one pass; NaN (a 0/0 the C code never reads) makes the check fail
    if bool(lo > -_SAFE) and bool(hi < _SAFE):
        return v.round_().clamp_(lowest, highest)
    return nearest_int_(v).clamp_(lowest, highest).to(torch.float32)


def _descend_by_moves(
    x: torch.Tensor, w: torch.Tensor, wx: torch.Tensor, L: torch.Tensor, *, lowest: int, highest: int, n_passes: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The code-by-code passes of ``make_q3_quants``, one *move* at a time instead of one position at a time.

    The C loop visits position ``i = 0, 1, …`` of a sub-block and moves code ``i`` to
    ``nearest_int(x·Σwl²/Σwxl)`` (the others held fixed) when that raises ``(Σwxl)² / Σwl²``. Until a
    code moves, the sums do not change, so every position up to the first move sees the same sums:
    all 16 candidates of a sub-block can be evaluated at once, with the very float32 operations of
    the C code, and the first position whose move is taken is the one the C loop takes. Each round
    does that for every sub-block still searching, applies its first move, and resumes after it (a
    pass that reaches the end starts over from position 0, up to ``n_passes`` passes; a pass without a
    move ends the search). Four in five sub-blocks of Gaussian weights never move, and the rest move
    about twice, so a handful of vectorized rounds replace ``16 · n_passes`` sequential steps.

    Args:
        x, w, wx: float32 ``[n, B]`` values, weights ``x²`` and their product.
        L: float32 ``[n, B]`` starting codes (integers in lowest..highest).
    Returns:
        ``(L, Σwxl, Σwl²)``: float32 ``[n, B]`` codes and float32 ``[B]`` sums after the passes.
    """
    n, B = x.shape
    L = L.clone()
    wxl, wll = wx * L, w * L * L  # each term as the C loop computes it: (w·x)·l and (w·l)·l
    sumlx, suml2 = seq_sum(wxl), seq_sum(wll)
    rank = torch.arange(n, 0, -1, dtype=torch.int32, device=x.device)[:, None]  # n - i: the first move ranks highest
    pos = torch.arange(n, device=x.device)[:, None]
    # The sub-blocks still searching, compacted: their columns of every [n, B] tensor and their state.
    # A sub-block whose terms (w·x)·l are all <= 0 never moves (half of them: l has the sign of
    # -x·max): a float32 sum of non-positive numbers never rounds above any one of them, so Σwxl
    # without any one term stays <= 0 and the C code's `slx > 0` fails at every position.
    act = (wxl.amax(dim=0) > 0).nonzero().squeeze(1)
    xa, wa, wxa, La = (t.index_select(1, act) for t in (x, w, wx, L))
    sx, s2 = sumlx[act], suml2[act]
    A = len(act)
    start = torch.zeros(A, dtype=torch.long, device=x.device)  # next position of the current pass
    passes = torch.ones(A, dtype=torch.long, device=x.device)  # passes begun
    moved = torch.zeros(A, dtype=torch.bool, device=x.device)  # a move in the current pass
    while len(act):
        # in place where a temporary allows: fresh [n, A] tensors cost more than the arithmetic on them
        wxl = torch.mul(wxa, La)
        slx = torch.sub(sx, wxl, out=wxl)  # [n, A]: Σwxl without position i
        wl = torch.mul(wa, La)
        sl2 = torch.sub(s2, wl.mul_(La), out=wl)
        new = _codes_near(torch.mul(xa, sl2).div_(slx), lowest, highest)
        slx_new = torch.mul(wxa, new).add_(slx)
        sl2_new = torch.mul(wa, new).mul_(new).add_(sl2)
        # (slx > 0) & (sl2_new > 0) in one comparison (a NaN fails both ways); comparisons make bool tensors,
        # several times slower than arithmetic here
        take = (torch.minimum(slx, sl2_new) > 0) & (new != La) & (slx_new * slx_new * s2 > (sx * sx) * sl2_new)
        if bool((start > 0).any()):
            take &= pos >= start
        first = (take.to(torch.int32) * rank).amax(dim=0)  # [A]: n - (first position moved), 0 when none
        found = first > 0
        if bool(found.any()):  # apply each sub-block's first move, with masks (indexing scattered columns is slow)
            i = (n - first).clamp_(max=n - 1).to(torch.long)
            hit = (pos == i) & found  # [n, A], one True per moving sub-block
            La.add_(new.sub_(La).mul_(hit))  # exact: small integers (new is not needed after this)
            sx = torch.where(found, slx_new.gather(0, i[None])[0], sx)
            s2 = torch.where(found, sl2_new.gather(0, i[None])[0], s2)
            start = torch.where(found, i + 1, start)
            moved = moved | found
        ended = ~found | (start == n)  # this pass has no further move
        again = ended & moved & (passes < n_passes)  # the pass moved something: one more pass
        start = torch.where(again, 0, start)
        passes = passes + again
        moved = moved & ~again
        done = ended & ~again
        if bool(done.any()):
            fin = done.nonzero().squeeze(1)
            L.index_copy_(1, act[fin], La.index_select(1, fin))
            sumlx.index_copy_(0, act[fin], sx[fin])
            suml2.index_copy_(0, act[fin], s2[fin])
            keep = (~done).nonzero().squeeze(1)
            act, sx, s2, start, passes, moved = (t[keep] for t in (act, sx, s2, start, passes, moved))
            xa, wa, wxa, La = (t.index_select(1, keep) for t in (xa, wa, wxa, La))
    return L, sumlx, suml2


def make_qp_quants(x: torch.Tensor, w: torch.Tensor, *, nmax: int, n_passes: int = 5) -> SearchResult:
    """Scale search for non-negative values (``make_qp_quants``), used to quantize the sub-block
    scales and mins of a super-block when an importance matrix is given.

    ``iscale = nmax / max``, then 8 more candidates ``(nmax + 0.1·is) / max`` (``is = ±1..±4``) by
    weighted squared error, then up to ``n_passes`` coordinate-descent passes as in
    :func:`make_q3_quants` (codes 0..nmax, stored as ``uint8_t``).

    Args:
        x, w: float32 ``[n, B]`` values (≥ 0) and weights.
    Returns:
        :class:`SearchResult` (``L`` int32 codes).
    """
    mx = positive_max(x, 0)
    zero = mx < GROUP_MAX_EPS
    wx = w * x

    def mse(scale, L):
        diff = x - scale * L.to(torch.float32)
        return seq_sum(w * diff * diff)

    iscale = div(float(nmax), mx)
    L0 = nearest_int(iscale * x) & 0xFF
    best = mse(recip(iscale), L0)
    for step in [s for s in range(-4, 5) if s != 0]:
        cand = div(_f32(_f32(_f32(0.1) * step) + nmax), mx)
        err = mse(recip(cand), nearest_int(cand * x).clamp(max=nmax))
        better = err < best
        best = torch.where(better, err, best)
        iscale = torch.where(better, cand, iscale)
    L = nearest_int(iscale * x).clamp(max=nmax) & 0xFF
    L, sumlx, suml2 = _coordinate_descent(x, w, wx, L, lowest=None, highest=nmax, n_passes=n_passes, as_uint8=True)
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    return SearchResult(
        scale=torch.where(zero, torch.zeros_like(scale), scale),
        min=torch.zeros_like(scale),
        L=torch.where(zero, torch.zeros_like(L), L),
    )


def _coordinate_descent(
    x: torch.Tensor,
    w: torch.Tensor,
    wx: torch.Tensor,
    L: torch.Tensor,
    *,
    lowest: int | None,
    highest: int,
    n_passes: int,
    as_uint8: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The code-by-code passes of ``make_q3_quants`` and ``make_qp_quants``, for ``B`` sub-blocks at once.

    In a pass, position ``i`` of every sub-block moves to ``nearest_int(x·Σwl²/Σwxl)`` (the others held
    fixed) when that raises ``(Σwxl)² / Σwl²``; positions run in order, each seeing the moves before it.
    A pass that moves nothing in a sub-block leaves its state as it found it, so every later pass would
    move nothing either: the next pass runs only over the sub-blocks that moved, which gives the C code's
    result for every sub-block at a fraction of the work (most settle after one or two passes).

    Args:
        x, w, wx: float32 ``[n, B]`` values, weights and their product.
        L: int32 ``[n, B]`` starting codes (as stored: ``uint8_t`` patterns when ``as_uint8``).
        lowest, highest: the clamp of a new code (``lowest=None``: ``MIN(highest, l)`` only, as
            ``make_qp_quants``, whose ``uint8_t`` store then keeps the low byte).
        as_uint8: ``make_qp_quants``' variant: it requires ``Σwl² > 0`` before the move (``make_q3_quants``
            after it) and stores codes as bytes.
    Returns:
        ``(L, Σwxl, Σwl²)``: int32 ``[n, B]`` codes and float32 ``[B]`` sums after the passes.
    """
    Lf = L.to(torch.float32)
    sumlx, suml2 = seq_sum(wx * Lf), seq_sum(w * Lf * Lf)
    active = torch.arange(x.shape[1], device=x.device)
    for _ in range(n_passes):
        xa, wa, wxa, La = x[:, active], w[:, active], wx[:, active], Lf[:, active]  # [n, A] copies
        sx, s2 = sumlx[active], suml2[active]
        moved = torch.zeros(len(active), dtype=torch.bool, device=x.device)
        for i in range(x.shape[0]):  # sequential within a sub-block: each move sees the previous ones
            Li = La[i]
            slx = sx - wxa[i] * Li
            sl2 = s2 - wa[i] * Li * Li
            new_l = nearest_int(xa[i] * sl2 / slx).clamp(lowest, highest)
            nf = new_l.to(torch.float32)
            slx2 = slx + wxa[i] * nf
            sl22 = sl2 + wa[i] * nf * nf
            take = (slx > 0) & ((sl2 if as_uint8 else sl22) > 0) & (nf != Li) & (slx2 * slx2 * s2 > sx * sx * sl22)
            stored = (new_l & 0xFF).to(torch.float32) if as_uint8 else nf
            La[i] = torch.where(take, stored, Li)
            sx = torch.where(take, slx2, sx)
            s2 = torch.where(take, sl22, s2)
            moved |= take
        Lf[:, active], sumlx[active], suml2[active] = La, sx, s2
        active = active[moved]
        if len(active) == 0:
            break
    return Lf.to(torch.int32), sumlx, suml2
