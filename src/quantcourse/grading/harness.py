"""Pieces that several hidden tests share: seeded layers and the GPTQ loop assembled from replaceable parts.

Hidden tests (``solutions/``) import these instead of each defining its own copy. Everything is built on
:data:`quantcourse.grading.hidden.DEVICE` (the GPU when there is one), from seeded generators, so a grade
does not depend on the machine. A hidden test that grades one part of GPTQ swaps only that part into
:func:`gptq_from_parts` and keeps the reference for the rest; it must also forbid the reference part it
replaces (``forbid("quantcourse.grading.harness.reference_column_step")``), which is public here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..weights import weight_qparams
from .hidden import DEVICE

__all__ = ["correlated_layer", "gptq_from_parts", "reference_column_step", "reference_lazy_update"]

ColumnStep = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (W1, U1, i, scale, zero, n_bits)
LazyUpdate = Callable[..., torch.Tensor]  # (W, Err, U, i1, i2)


def correlated_layer(seed: int, out_f: int = 24, in_f: int = 80) -> tuple[torch.Tensor, torch.Tensor]:
    """A float64 weight ``W [out_f, in_f]`` and the Hessian ``H = 2XᵀX/N [in_f, in_f]`` of correlated inputs.

    ``X [4·in_f, in_f]`` mixes its features (``randn @ (I + 0.5·randn)``), so GPTQ's error feedback matters.
    Drawn on the CPU from ``seed``, then moved to :data:`~quantcourse.grading.hidden.DEVICE`.
    """
    gen = torch.Generator().manual_seed(seed)
    mix = torch.eye(in_f, dtype=torch.float64) + 0.5 * torch.randn(in_f, in_f, generator=gen, dtype=torch.float64)
    X = torch.randn(4 * in_f, in_f, generator=gen, dtype=torch.float64) @ mix
    W = torch.randn(out_f, in_f, generator=gen, dtype=torch.float64)
    H = 2 * X.T @ X / X.shape[0]
    return W.to(DEVICE), H.to(DEVICE)


def _reference_pieces(W: torch.Tensor, H: torch.Tensor, n_bits: int) -> tuple[torch.Tensor, ...]:
    """``U`` (upper Cholesky factor of the damped ``H⁻¹``) and the per-row grid ``scale, zero [out]``."""
    Hd = H + 0.01 * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True)
    qp = weight_qparams(W, n_bits)
    return U, qp.scale[:, 0].double(), qp.zero_point[:, 0].double()


def gptq_from_parts(
    step: ColumnStep, lazy: LazyUpdate, W: torch.Tensor, H: torch.Tensor, n_bits: int, block_size: int
) -> torch.Tensor:
    """Per-channel GPTQ (damp 0.01, no act-order) with its column ``step`` and ``lazy`` update passed in.

    ``step(W1 [out, block], U1 [block, block], i, scale [out], zero [out], n_bits) -> (W1, q [out], err [out])``
    quantizes column ``i`` of the lazy block and updates the block; ``lazy(W, Err [out, block], U, i1, i2) -> W``
    applies the block's errors to the later columns. Returns the dequantized weight ``[out, in]`` (float64).
    """
    U, scale, zero = _reference_pieces(W, H, n_bits)
    W = W.clone()
    codes = torch.empty_like(W)
    for i1 in range(0, W.shape[1], block_size):
        i2 = min(i1 + block_size, W.shape[1])
        W1, Err = W[:, i1:i2].clone(), torch.empty(W.shape[0], i2 - i1, dtype=W.dtype, device=W.device)
        for i in range(i2 - i1):
            W1, q, err = step(W1, U[i1:i2, i1:i2], i, scale, zero, n_bits)
            codes[:, i1 + i], Err[:, i] = q.to(W.dtype), err
        W = lazy(W, Err, U, i1, i2)
    return scale[:, None] * (codes - zero[:, None])


def reference_lazy_update(W: torch.Tensor, Err: torch.Tensor, U: torch.Tensor, i1: int, i2: int) -> torch.Tensor:
    """``W[:, i2:] -= Err @ U[i1:i2, i2:]`` on a copy: the lazy batch update of GPTQ."""
    W = W.clone()
    W[:, i2:] -= Err @ U[i1:i2, i2:]
    return W


def reference_column_step(
    W1: torch.Tensor, U1: torch.Tensor, i: int, scale: torch.Tensor, zero: torch.Tensor, n_bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize column ``i`` of the block, scale its error by ``U1[i, i]`` and update the block's later columns."""
    w = W1[:, i]
    q = torch.clamp(torch.round(w / scale) + zero, 0, 2**n_bits - 1)
    err = (w - scale * (q - zero)) / U1[i, i]
    W1 = W1.clone()
    W1[:, i:] -= torch.outer(err, U1[i, i:])
    return W1, q, err
