"""llama.cpp's original block formats: 32 weights per block, one scale (and a minimum).

Chapter 11 (GGUF). Each class reproduces ``quantize_row_*_ref`` of ``ggml-quants.c`` byte
for byte (no importance matrix) and dequantizes as gguf-py does. All blocks are handled at
once: ``blocks`` is float32 ``[B, 32]``.

The common nibble order: byte ``j`` of ``qs`` holds element ``j`` in its low nibble and
element ``j + 16`` in its high nibble (not ``2j`` and ``2j + 1``).
"""

from __future__ import annotations

import torch

from .base import BlockFormat, half_from_bytes, split_bytes
from .cfloat import first_absmax, fp16_bits, recip, round_away, seq_sum, sqrtf, trunc_to_byte
from .search import make_qkx2_quants, make_qx_quants

__all__ = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "imatrix_weights"]


def imatrix_weights(x: torch.Tensor, imatrix: torch.Tensor) -> torch.Tensor:
    """The per-weight importance of ``quantize_row_q{4,5}_{0,1}_impl``: ``imatrix[j]·sqrtf(σ² + x²)``.

    Unlike the K-quants (σ² per super-block), σ² is the mean square of the whole *row*,
    summed in the C loop's order, so it is computed here, before the row is cut into blocks.

    Args:
        x: float32 ``[rows, cols]``.
        imatrix: float32 ``[cols]``.
    Returns:
        float32 ``[rows, cols]``.
    """
    xt = x.T.contiguous()  # [cols, rows], position-major for the sequential sum
    sigma2 = seq_sum(xt * xt) / x.shape[1]  # [rows]
    return imatrix * sqrtf(sigma2[:, None] + x * x)


def _weighted_search(blocks: torch.Tensor, weights: torch.Tensor, symmetric: bool, nmax: int):
    """The searches of the ``_impl`` quantizers over ``B`` blocks of 32 (position-major inside).

    Symmetric: ``make_qx_quants(32, nmax, x, L, 1, weight)``, codes ``l + nmax``. With a minimum:
    ``make_qkx3_quants(32, nmax, x, weight, L, &min, Laux, -0.9, 0.05, 36, false)``, which is
    :func:`make_qkx2_quants` with that grid.
    """
    x, w = blocks.T.contiguous(), weights.T.contiguous()
    if symmetric:
        return make_qx_quants(x, nmax=nmax, w=w)
    return make_qkx2_quants(x, w, nmax=nmax, rmin=-0.9, rdelta=0.05, nstep=36, use_mad=False)


def _first_min_max(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``if (v < min) min = v; if (v > max) max = v;`` over each block of float32 ``[B, n]``: ``[B]``, ``[B]``.

    The values are those of ``amin``/``amax``; only the sign of a zero extreme depends on which zero
    comes first, which they leave open, so those few blocks are redone with ``argmin``/``argmax``
    (first occurrence, and slow on CPU), whose stored half then has the C code's sign bit.
    """
    lo, hi = blocks.amin(dim=1), blocks.amax(dim=1)  # 4x faster than aminmax(dim=1) on CPU
    zero = ((lo == 0) | (hi == 0)).nonzero().squeeze(1)
    if len(zero):
        b = blocks[zero]
        lo[zero] = b.gather(1, b.argmin(dim=1, keepdim=True)).squeeze(1)
        hi[zero] = b.gather(1, b.argmax(dim=1, keepdim=True)).squeeze(1)
    return lo, hi


def _signed(byte: torch.Tensor) -> torch.Tensor:
    """A byte pattern 0..255 read as ``int8_t``."""
    return (byte ^ 0x80) - 0x80


def _c_int8(v: torch.Tensor) -> torch.Tensor:
    """C's ``(int8_t)v`` for float32 ``v``: int32 in -128..127.

    Usually every value already fits, and the cast is float -> int32 truncation (two passes);
    otherwise the low byte of the x86 conversion, as :func:`trunc_to_byte` computes it.
    """
    if v.numel():
        lo, hi = torch.aminmax(v)
        if bool(lo > -129) and bool(hi < 128):
            return v.to(torch.int32)
    return _signed(trunc_to_byte(v))


_FLT_MIN = 2.0**-126  # the smallest normal float32


def _round_away_small(v: torch.Tensor) -> torch.Tensor:
    """C ``roundf`` (half away from zero) of float32 ``v`` with ``|v| < 16384``, as int16.

    With ``m = trunc(2v)`` (exact: doubling is exact), ``roundf(v) = (m + 1) >> 1`` for ``v >= 0`` and
    ``m >> 1`` (floor) below zero, ``>>`` being the arithmetic shift; ``m >> 15`` is ``-1`` exactly for the
    negative ``m``, so both are ``(m + 1 + (m >> 15)) >> 1``: four integer passes over half-width values,
    where the float formula (:func:`round_away`) takes eight over full-width ones.
    """
    m = (v * 2).to(torch.int16)
    return (m >> 15).add_(m).add_(1).bitwise_right_shift_(1)


def _safe_recip(d: torch.Tensor) -> torch.Tensor:
    """``d ? 1.0f/d : 0.0f``"""
    return torch.where(d != 0, recip(d), torch.zeros_like(d))


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """codes ``[B, 32]`` (0..255 patterns) -> ``qs`` ``[B, 16]``: low nibble j, high nibble j + 16."""
    return ((q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)).to(torch.uint8)


_BYTE_PLACES = 2.0 ** torch.arange(8)  # float32 [8]


def _fifth_bits(q: torch.Tensor) -> torch.Tensor:
    """codes ``[B, 32]`` -> ``qh`` ``[B, 4]``: bit ``j`` of the little-endian uint32 = bit 4 of code ``j``."""
    bit = ((q >> 4) & 1).to(torch.float32).view(-1, 4, 8)  # bit 8k + i of the uint32 is bit i of byte k
    # A float product with 1, 2, ..., 128 sums the bits of a byte exactly (at most 255), and runs about
    # twice as fast as shifting and adding integers here.
    return (bit @ _BYTE_PLACES.to(q.device)).to(torch.uint8)


def _unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    qs = qs.to(torch.int32)
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)  # [B, 32]


def _unpack_fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    word = (qh.to(torch.int64) << torch.arange(0, 32, 8, device=qh.device)).sum(dim=1, keepdim=True)
    return ((word >> torch.arange(32, device=qh.device)) & 1).to(torch.int32)  # [B, 32]


class Q8_0(BlockFormat):
    """8-bit codes with one half-float scale; x = d·q. 34 bytes per 32 weights = 8.5 bits/weight.

    ::

        byte  0   2                                   34
              +---+-----------------------------------+
              | d |  qs[32]: int8 codes, element j    |
              +---+-----------------------------------+
        d = absmax / 127,  q = roundf(x / d)   (half away from zero)
    """

    name = "Q8_0"
    no_imatrix_reason = "Q8_0 has no scale search for an importance matrix to weight (llama.cpp ignores it)"

    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        amax = torch.maximum(blocks.amax(dim=1), -blocks.amin(dim=1)).abs_()  # max |x| without a |x| copy; +0, not -0
        d = amax / 127  # [B]
        v = blocks * _safe_recip(d)[:, None]
        if bool(((d == 0) | (d >= _FLT_MIN)).all()):  # then |v| <= 127 (1 + 1e-6): every value fits an int16
            q = _round_away_small(v)
        else:  # a subnormal scale: 1/d may overflow, and roundf's results may not fit int8_t
            q = _c_int8(round_away(v))
        return torch.cat([fp16_bits(d), q.to(torch.int8).view(torch.uint8)], dim=1)

    @classmethod
    def dequantize_blocks(cls, data: torch.Tensor) -> torch.Tensor:
        d, qs = split_bytes(data, [2, 32])
        return qs.contiguous().view(torch.int8).to(torch.float32) * half_from_bytes(d)


class Q4_0(BlockFormat):
    """4-bit codes, symmetric, one half-float scale; x = d·(q − 8). 18 bytes / 32 = 4.5 bits/weight.

    ::

        byte  0   2                         18
              +---+-------------------------+
              | d | qs[16]                  |     qs[j] = q[j] | q[j+16] << 4
              +---+-------------------------+
        d = max / -8   (max: the signed element of largest magnitude, so q = 0 hits it exactly)
        q = min(15, (int8_t)(x / d + 8.5))     (truncation, not rounding)
    """

    name = "Q4_0"
    imatrix_sigma = "row"

    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
        """``imatrix``: optional float32 ``[B, 32]`` from :func:`imatrix_weights` (``quantize_row_q4_0_impl``)."""
        if imatrix is not None:
            res = _weighted_search(blocks, imatrix, True, 8)
            return torch.cat([fp16_bits(res.scale), _nibbles(res.L.T)], dim=1)
        d = first_absmax(blocks, 1) / -8
        q = _c_int8(blocks * _safe_recip(d)[:, None] + 8.5).clamp_(max=15)  # packing keeps the low nibble
        return torch.cat([fp16_bits(d), _nibbles(q)], dim=1)

    @classmethod
    def dequantize_blocks(cls, data: torch.Tensor) -> torch.Tensor:
        d, qs = split_bytes(data, [2, 16])
        return half_from_bytes(d) * (_unpack_nibbles(qs) - 8).to(torch.float32)


class Q4_1(BlockFormat):
    """4-bit codes with a scale and a minimum; x = d·q + m. 20 bytes / 32 = 5.0 bits/weight.

    ::

        byte  0   2   4                         20
              +---+---+-------------------------+
              | d | m | qs[16]                  |     qs[j] = q[j] | q[j+16] << 4
              +---+---+-------------------------+
        m = min,  d = (max - min) / 15,  q = min(15, (int8_t)((x - m) / d + 0.5))
    """

    name = "Q4_1"
    imatrix_sigma = "row"
    n_levels = 15

    @classmethod
    def _codes(cls, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lo, hi = _first_min_max(blocks)
        d = (hi - lo) / cls.n_levels
        q = _c_int8((blocks - lo[:, None]) * _safe_recip(d)[:, None] + 0.5)  # the low byte, all packing reads
        return d, lo, q

    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
        """``imatrix``: optional float32 ``[B, 32]`` from :func:`imatrix_weights` (``quantize_row_q4_1_impl``)."""
        if imatrix is not None:
            res = _weighted_search(blocks, imatrix, False, cls.n_levels)
            return torch.cat([fp16_bits(res.scale), fp16_bits(-res.min), cls._pack(res.L.T)], dim=1)
        d, lo, q = cls._codes(blocks)
        q = q.clamp_(max=15)
        return torch.cat([fp16_bits(d), fp16_bits(lo), _nibbles(q)], dim=1)

    @staticmethod
    def _pack(q: torch.Tensor) -> torch.Tensor:
        return _nibbles(q)

    @classmethod
    def dequantize_blocks(cls, data: torch.Tensor) -> torch.Tensor:
        d, m, qs = split_bytes(data, [2, 2, 16])
        return half_from_bytes(d) * _unpack_nibbles(qs).to(torch.float32) + half_from_bytes(m)


class Q5_0(BlockFormat):
    """5-bit codes, symmetric; x = d·(q − 16). 22 bytes / 32 = 5.5 bits/weight.

    ::

        byte  0   2        6                         22
              +---+--------+-------------------------+
              | d | qh[4]  | qs[16]                  |
              +---+--------+-------------------------+
        qs[j] = low 4 bits of q[j] | low 4 bits of q[j+16] << 4
        qh (a little-endian uint32): bit j = 5th bit (value 16) of q[j], j = 0..31
        d = max / -16,  q = min(31, (int8_t)(x / d + 16.5))
    """

    name = "Q5_0"
    imatrix_sigma = "row"

    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
        """``imatrix``: optional float32 ``[B, 32]`` from :func:`imatrix_weights` (``quantize_row_q5_0_impl``)."""
        if imatrix is not None:
            res = _weighted_search(blocks, imatrix, True, 16)
            L = res.L.T
            return torch.cat([fp16_bits(res.scale), _fifth_bits(L), _nibbles(L)], dim=1)
        d = first_absmax(blocks, 1) / -16
        q = _c_int8(blocks * _safe_recip(d)[:, None] + 16.5).clamp_(max=31)
        return torch.cat([fp16_bits(d), _fifth_bits(q), _nibbles(q)], dim=1)

    @classmethod
    def dequantize_blocks(cls, data: torch.Tensor) -> torch.Tensor:
        d, qh, qs = split_bytes(data, [2, 4, 16])
        q = _unpack_nibbles(qs) | (_unpack_fifth_bits(qh) << 4)
        return half_from_bytes(d) * (q - 16).to(torch.float32)


class Q5_1(Q4_1):
    """5-bit codes with a scale and a minimum; x = d·q + m. 24 bytes / 32 = 6.0 bits/weight.

    ::

        byte  0   2   4        8                         24
              +---+---+--------+-------------------------+
              | d | m | qh[4]  | qs[16]                  |     (qh, qs as in Q5_0)
              +---+---+--------+-------------------------+
        m = min,  d = (max - min) / 31,  q = (uint8_t)((x - m) / d + 0.5)   (no clamp in the C code)
    """

    name = "Q5_1"
    imatrix_sigma = "row"
    n_levels = 31

    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
        """``imatrix``: optional float32 ``[B, 32]`` from :func:`imatrix_weights` (``quantize_row_q5_1_impl``)."""
        if imatrix is not None:
            return super().quantize_blocks(blocks, imatrix)
        d, lo, q = cls._codes(blocks)
        return torch.cat([fp16_bits(d), fp16_bits(lo), cls._pack(q)], dim=1)

    @staticmethod
    def _pack(q: torch.Tensor) -> torch.Tensor:
        return torch.cat([_fifth_bits(q), _nibbles(q)], dim=1)

    @classmethod
    def dequantize_blocks(cls, data: torch.Tensor) -> torch.Tensor:
        d, m, qh, qs = split_bytes(data, [2, 2, 4, 16])
        q = _unpack_nibbles(qs) | (_unpack_fifth_bits(qh) << 4)
        return half_from_bytes(d) * q.to(torch.float32) + half_from_bytes(m)
