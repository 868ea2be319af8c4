"""llama.cpp's K-quants: super-blocks of 256 weights with quantized sub-block scales.

Chapter 11 (GGUF). A super-block holds 8 sub-blocks of 32 (Q4_K, Q5_K) or 16 of 16 (Q2_K,
Q3_K, Q6_K). Each sub-block gets its own scale (and minimum) from a search
(:mod:`quantcourse.gguf.search`); those scales are then themselves quantized to 4, 6 or 8 bits
against one half-float ``d`` (and ``dmin``) per super-block, and every weight is finally
re-quantized with the *stored* scales. Each class reproduces ``quantize_row_*_K_ref`` of
``ggml-quants.c`` byte for byte, and dequantizes as gguf-py does.

``blocks`` is float32 ``[B, 256]``; the searches work on position-major ``[n, B·subs]``.
"""

from __future__ import annotations

import torch

from .base import BlockFormat, half_from_bytes, split_bytes
from .cfloat import (
    div,
    first_absmax,
    fp16_bits,
    fp16_round,
    nearest_int,
    nearest_int_,
    positive_max,
    select_int,
    seq_sum,
    sqrtf,
)
from .search import GROUP_MAX_EPS, make_q3_quants, make_qkx2_quants, make_qp_quants, make_qx_quants

__all__ = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "pack_scale_min_k4", "unpack_scale_min_k4"]

QK_K = 256


def _to_positions(blocks: torch.Tensor, n: int) -> torch.Tensor:
    """float32 ``[B, 256]`` -> position-major ``[n, B·256/n]`` (sub-block index = b·subs + j)."""
    return blocks.reshape(-1, n).T.contiguous()


def _from_positions(L: torch.Tensor, B: int) -> torch.Tensor:
    """codes ``[n, B·subs]`` -> ``[B, 256]``."""
    return L.T.reshape(B, QK_K)


def pack_scale_min_k4(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Pack 8 six-bit scales and 8 six-bit mins into the 12 bytes of Q4_K / Q5_K.

    Args:
        sc, m: int ``[B, 8]`` in 0..63.
    Returns:
        uint8 ``[B, 12]``::

            byte 0..3 : sc[0..3] (low 6 bits) | top 2 bits of sc[4..7] in bits 6-7
            byte 4..7 :  m[0..3] (low 6 bits) | top 2 bits of  m[4..7] in bits 6-7
            byte 8..11: low 4 bits of sc[4..7] | low 4 bits of m[4..7] << 4
    """
    sc, m = sc.to(torch.int32), m.to(torch.int32)
    first = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    second = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    third = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    return (torch.cat([first, second, third], dim=1) & 0xFF).to(torch.uint8)


def unpack_scale_min_k4(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_scale_min_k4` (``get_scale_min_k4``): uint8 ``[B, 12]`` -> int32 ``[B, 8]`` twice."""
    q = packed.to(torch.int32)
    a, b, c = q[:, 0:4], q[:, 4:8], q[:, 8:12]
    sc = torch.cat([a & 63, (c & 0x0F) | ((a >> 6) << 4)], dim=1)
    m = torch.cat([b & 63, (c >> 4) | ((b >> 6) << 4)], dim=1)
    return sc, m


def _or_shifted(parts: torch.Tensor, dim: int, shift: int) -> torch.Tensor:
    """``parts[0] | parts[1] << shift | parts[2] << 2·shift | …`` along ``dim``, for uint8 ``parts``.

    The packing works on bytes: int32 or int64 temporaries (and a ``sum`` of shifted planes) would
    allocate 4 to 8 times the memory, and fresh memory is what costs most in these small steps.
    """
    out = parts.select(dim, 0).clone()
    for j in range(1, parts.shape[dim]):
        out |= parts.select(dim, j) << (shift * j)
    return out


def _pack_2bit(L: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``[B, 256]`` in 0..3 -> ``qs`` ``[B, 64]``.

    Per 128 codes, byte l = L[l] | L[l+32]<<2 | L[l+64]<<4 | L[l+96]<<6.
    """
    return _or_shifted(L.reshape(-1, 2, 4, 32), 2, 2).reshape(-1, 64)


def _unpack_2bit(qs: torch.Tensor) -> torch.Tensor:
    q = qs.to(torch.int32).reshape(-1, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], device=qs.device).reshape(1, 1, 4, 1)
    return (q & 3).reshape(-1, QK_K)


def _pack_4bit_64(L: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``[B, 256]`` -> ``qs`` ``[B, 128]``: per 64, byte l = low nibble of L[l] | of L[l+32] << 4."""
    return _or_shifted((L & 0x0F).reshape(-1, 4, 2, 32), 2, 4).reshape(-1, 128)


def _unpack_4bit_64(qs: torch.Tensor) -> torch.Tensor:
    q = qs.to(torch.int32).reshape(-1, 4, 1, 32) >> torch.tensor([0, 4], device=qs.device).reshape(1, 1, 2, 1)
    return (q & 0x0F).reshape(-1, QK_K)


def _requantize(x: torch.Tensor, d: torch.Tensor, dm: torch.Tensor, L: torch.Tensor, qmax: int) -> torch.Tensor:
    """``l = clamp(nearest_int((x + dm) / d), 0, qmax)``, skipping sub-blocks whose stored scale is 0.

    x, L: ``[B, subs, n]``; d, dm: float32 ``[B, subs]``.
    """
    new = nearest_int_((x + dm[..., None]).div_(d[..., None])).clamp_(0, qmax)
    return select_int((d != 0)[..., None], new, L)


class _AsymmetricK(BlockFormat):
    """Shared steps of Q4_K and Q5_K: 8 sub-blocks of 32, 6-bit scales and mins."""

    nmax: int
    rmin: float
    nstep: int

    @classmethod
    def _codes(cls, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``quantize_row_q{4,5}_K_ref``: header bytes ``[B, 16]`` and codes ``[B, 256]``."""
        B = blocks.shape[0]
        x = _to_positions(blocks, 32)  # [32, B*8]
        av_x = sqrtf(seq_sum(x * x) / 32)
        w = av_x + x.abs()
        res = make_qkx2_quants(x, w, nmax=cls.nmax, rmin=cls.rmin, rdelta=0.1, nstep=cls.nstep, use_mad=False)
        scales, mins = res.scale.reshape(B, 8), res.min.reshape(B, 8)
        max_scale, max_min = positive_max(scales, 1), positive_max(mins, 1)
        inv_scale = torch.where(max_scale > 0, div(63.0, max_scale), torch.zeros_like(max_scale))
        inv_min = torch.where(max_min > 0, div(63.0, max_min), torch.zeros_like(max_min))
        ls = (nearest_int(inv_scale[:, None] * scales) & 0xFF).clamp(max=63)  # (uint8_t) then MIN(63, .)
        lm = (nearest_int(inv_min[:, None] * mins) & 0xFF).clamp(max=63)
        return cls._finish(blocks, res.L, ls, lm, max_scale / 63, max_min / 63)

    @classmethod
    def _finish(cls, blocks, L_search, ls, lm, d, dmin) -> tuple[torch.Tensor, torch.Tensor]:
        """Pack the 6-bit scales, store d/dmin as halves, re-quantize every weight with the stored scales."""
        B = blocks.shape[0]
        packed = pack_scale_min_k4(ls, lm)
        sc, m = unpack_scale_min_k4(packed)  # what the file holds (differs from ls/lm only if they exceed 63)
        L = _requantize(
            blocks.reshape(B, 8, 32),
            fp16_round(d)[:, None] * sc,
            fp16_round(dmin)[:, None] * m,
            _from_positions(L_search, B).reshape(B, 8, 32),
            cls.nmax,
        ).reshape(B, QK_K)
        return torch.cat([fp16_bits(d), fp16_bits(dmin), packed], dim=1), L.to(torch.uint8)

    @classmethod
    def _codes_imatrix(cls, blocks: torch.Tensor, qw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``quantize_row_q{4,5}_K_impl`` with an importance matrix ``qw`` (float32 ``[B, 256]``)."""
        B = blocks.shape[0]
        xt = _to_positions(blocks, QK_K)
        sigma2 = 2 * seq_sum(xt * xt) / QK_K  # [B]
        x = _to_positions(blocks, 32)  # [32, B*8]
        sig = sigma2.repeat_interleave(8)
        w = _to_positions(qw, 32) * sqrtf(sig + x * x)
        sw = seq_sum(w)  # [B*8]
        res = make_qkx2_quants(
            x, w, nmax=cls.nmax, rmin=-0.9, rdelta=0.05, nstep=36, use_mad=False
        )  # = make_qkx3_quants
        sw8 = sw.reshape(B, 8).T.contiguous()
        d = make_qp_quants(res.scale.reshape(B, 8).T.contiguous(), sw8, nmax=63)
        m = make_qp_quants(res.min.reshape(B, 8).T.contiguous(), sw8, nmax=63)
        ls, lm = d.L.T, m.L.T
        if cls.name == "Q5_K":  # the Q5_K code clamps the packed values, the Q4_K code does not
            ls, lm = ls.clamp(max=63), lm.clamp(max=63)
        return cls._finish(blocks, res.L, ls, lm, d.scale, m.scale)

    @classmethod
    def _scales(cls, data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d, dmin, packed = split_bytes(data[:, :16], [2, 2, 12])
        sc, m = unpack_scale_min_k4(packed)
        return (half_from_bytes(d) * sc.to(torch.float32))[..., None], (half_from_bytes(dmin) * m.to(torch.float32))[
            ..., None
        ]


class Q4_K(_AsymmetricK):
    """4-bit K-quant: x = d·sc·q − dmin·m, 8 sub-blocks of 32. 144 bytes / 256 = 4.5 bits/weight.

    ::

        byte 0   2      4            16                                      144
             +---+------+------------+----------------------------------------+
             | d | dmin | scales[12] | qs[128]                                |
             +---+------+------------+----------------------------------------+
        scales: 8 six-bit scales sc and 8 six-bit mins m (see pack_scale_min_k4)
        qs: per 64 weights, 32 bytes: low nibble = weight l, high nibble = weight l + 32

    Sub-block search: weights √(mean x²) + |x|, ``make_qkx2_quants(nmax=15, rmin=−1, 0.1, 20)``.
    ``d = max(scale)/63``, ``dmin = max(min)/63`` as halves; then every weight is re-quantized
    with the stored ``d·sc`` and ``dmin·m``.
    """

    name = "Q4_K"
    imatrix_sigma = "block"
    fallback = "Q5_0"
    nmax, rmin, nstep = 15, -1.0, 20

    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
        head, L = cls._codes(blocks) if imatrix is None else cls._codes_imatrix(blocks, imatrix)
        return torch.cat([head, _pack_4bit_64(L)], dim=1)

    @classmethod
    def dequantize_blocks(cls, data: torch.Tensor) -> torch.Tensor:
        d, dm = cls._scales(data)
        q = _unpack_4bit_64(data[:, 16:]).reshape(-1, 8, 32).to(torch.float32)
        return (d * q - dm).reshape(-1, QK_K)


class Q5_K(_AsymmetricK):
    """5-bit K-quant: as Q4_K with a fifth bit per weight. 176 bytes / 256 = 5.5 bits/weight.

    ::

        byte 0   2      4            16         48                            176
             +---+------+------------+----------+-----------------------------+
             | d | dmin | scales[12] | qh[32]   | qs[128]                     |
             +---+------+------------+----------+-----------------------------+
        qs: low 4 bits, laid out as in Q4_K
        qh[l]: bit 2c = 5th bit of weight 64c + l, bit 2c+1 = that of weight 64c + 32 + l

    Search: ``make_qkx2_quants(nmax=31, rmin=−0.5, 0.1, 15)``.
    """

    name = "Q5_K"
    imatrix_sigma = "block"
    fallback = "Q5_1"
    nmax, rmin, nstep = 31, -0.5, 15

    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
        head, L = cls._codes(blocks) if imatrix is None else cls._codes_imatrix(blocks, imatrix)
        qh = _or_shifted((L >> 4).reshape(-1, 8, 32), 1, 1)  # [B, 32]: bit j of byte l = 5th bit of code 32j + l
        return torch.cat([head, qh, _pack_4bit_64(L)], dim=1)

    @classmethod
    def dequantize_blocks(cls, data: torch.Tensor) -> torch.Tensor:
        d, dm = cls._scales(data)
        qh = data[:, 16:48].to(torch.int32).reshape(-1, 1, 32) >> torch.arange(8, device=data.device).reshape(1, 8, 1)
        q = _unpack_4bit_64(data[:, 48:]).reshape(-1, 8, 32) | ((qh & 1) << 4)
        return (d * q.to(torch.float32) - dm).reshape(-1, QK_K)


class Q2_K(BlockFormat):
    """2-bit K-quant: x = d·sc·q − dmin·m, 16 sub-blocks of 16. 84 bytes / 256 = 2.625 bits/weight.

    ::

        byte 0            16                          80   82     84
             +------------+---------------------------+----+------+
             | scales[16] | qs[64]                    | d  | dmin |
             +------------+---------------------------+----+------+
        scales[j]: low nibble = 4-bit scale, high nibble = 4-bit min of sub-block j
        qs: per 128 weights, 32 bytes: byte l = q[l] | q[l+32]<<2 | q[l+64]<<4 | q[l+96]<<6

    Search: weights |x|, ``make_qkx2_quants(nmax=3, rmin=−0.5, 0.1, 15, use_mad=True)``;
    ``d = max(scale)/15``, ``dmin = max(min)/15``.
    """

    name = "Q2_K"
    fallback = "Q4_0"

    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        B = blocks.shape[0]
        x = _to_positions(blocks, 16)
        res = make_qkx2_quants(x, x.abs(), nmax=3, rmin=-0.5, rdelta=0.1, nstep=15, use_mad=True)
        scales, mins = res.scale.reshape(B, 16), res.min.reshape(B, 16)
        max_scale, max_min = positive_max(scales, 1), positive_max(mins, 1)
        has_s, has_m = (max_scale > 0)[:, None], (max_min > 0)[:, None]
        ls = torch.where(has_s, nearest_int(div(15.0, max_scale)[:, None] * scales), 0)
        lm = torch.where(has_m, nearest_int(div(15.0, max_min)[:, None] * mins), 0)
        packed = ((ls & 0xFF) | ((lm << 4) & 0xFF)) & 0xFF  # uint8 stores, no clamp in the C code
        d = torch.where(has_s[:, 0], max_scale / 15, torch.zeros_like(max_scale))
        dmin = torch.where(has_m[:, 0], max_min / 15, torch.zeros_like(max_min))
        L = _requantize(
            blocks.reshape(B, 16, 16),
            fp16_round(d)[:, None] * (packed & 0x0F),
            fp16_round(dmin)[:, None] * (packed >> 4),
            _from_positions(res.L, B).reshape(B, 16, 16),
            3,
        ).reshape(B, QK_K)
        return torch.cat([packed.to(torch.uint8), _pack_2bit(L.to(torch.uint8)), fp16_bits(d), fp16_bits(dmin)], dim=1)

    @classmethod
    def dequantize_blocks(cls, data: torch.Tensor) -> torch.Tensor:
        scales, qs, d, dmin = split_bytes(data, [16, 64, 2, 2])
        sc = scales.to(torch.int32)
        dl = (half_from_bytes(d) * (sc & 0x0F).to(torch.float32))[..., None]
        ml = (half_from_bytes(dmin) * (sc >> 4).to(torch.float32))[..., None]
        q = _unpack_2bit(qs).reshape(-1, 16, 16).to(torch.float32)
        return (dl * q - ml).reshape(-1, QK_K)


def _pack_q3_scales(l: torch.Tensor) -> torch.Tensor:
    """16 six-bit values ``[B, 16]`` -> 12 bytes: low nibbles of 0..7 / 8..15 in bytes 0..7 (low / high
    nibble), the top 2 bits of value j in byte 8 + j%4 at bit 2·(j//4)."""
    low = (l[:, :8] & 0x0F) | ((l[:, 8:] & 0x0F) << 4)
    top = (l >> 4).reshape(-1, 4, 4) << torch.tensor([0, 2, 4, 6], device=l.device).reshape(1, 4, 1)  # [B, j//4, j%4]
    return (torch.cat([low, top.sum(dim=1)], dim=1) & 0xFF).to(torch.uint8)


def _unpack_q3_scales(packed: torch.Tensor) -> torch.Tensor:
    p = packed.to(torch.int32)
    low = torch.cat([p[:, :8] & 0x0F, p[:, :8] >> 4], dim=1)
    top = (p[:, 8:].reshape(-1, 1, 4) >> torch.tensor([0, 2, 4, 6], device=p.device).reshape(1, 4, 1)) & 3
    return low | (top.reshape(-1, 16) << 4)  # 0..63


class Q3_K(BlockFormat):
    """3-bit K-quant: x = d·(sc − 32)·q, q in −4..3, 16 sub-blocks of 16. 110 bytes / 256 = 3.4375 bits/weight.

    ::

        byte 0          32                        96           108  110
             +----------+-------------------------+------------+----+
             | hmask[32]| qs[64]                  | scales[12] | d  |
             +----------+-------------------------+------------+----+
        qs: low 2 bits of q + 4, packed as in Q2_K
        hmask[j % 32] bit j // 32: set when q + 4 >= 4 (then q = low2, else q = low2 − 4)
        scales: 16 six-bit values sc (see _pack_q3_scales)

    Sub-block search: ``make_q3_quants`` (coordinate descent, weights x²); sub-block scales are
    quantized symmetrically: ``sc = clamp(nearest_int(−32/max_scale · s), −32, 31) + 32``.
    """

    name = "Q3_K"
    fallback = "Q4_0"

    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        B = blocks.shape[0]
        res = make_q3_quants(_to_positions(blocks, 16))
        scales = res.scale.reshape(B, 16)
        max_scale = first_absmax(scales, 1)
        has = (max_scale != 0)[:, None]
        iscale = div(-32.0, max_scale)
        l8 = ((nearest_int(iscale[:, None] * scales) & 0xFF) ^ 0x80) - 0x80  # (int8_t) store
        l = torch.where(has, l8.clamp(-32, 31) + 32, 0)
        packed = _pack_q3_scales(l)
        d = torch.where(has[:, 0], div(1.0, iscale), torch.zeros_like(iscale))
        sc = (_unpack_q3_scales(packed) - 32).to(torch.float32)
        dl = fp16_round(d)[:, None] * sc  # [B, 16]
        xb = blocks.reshape(B, 16, 16)
        new = nearest_int_(xb / dl[..., None]).clamp_(-4, 3).add_(4)
        L = select_int((dl != 0)[..., None], new, _from_positions(res.L, B).reshape(B, 16, 16)).reshape(B, QK_K)
        L = L.to(torch.uint8)  # 0..7
        hmask = _or_shifted((L >> 2).reshape(B, 8, 32), 1, 1)  # bit j of byte l: code 32j + l >= 4
        return torch.cat([hmask, _pack_2bit(L & 3), packed, fp16_bits(d)], dim=1)

    @classmethod
    def dequantize_blocks(cls, data: torch.Tensor) -> torch.Tensor:
        hmask, qs, scales, d = split_bytes(data, [32, 64, 12, 2])
        dl = (half_from_bytes(d) * (_unpack_q3_scales(scales) - 32).to(torch.float32))[..., None]
        hm = (hmask.to(torch.int32).reshape(-1, 1, 32) >> torch.arange(8, device=hmask.device).reshape(1, 8, 1)) & 1
        q = _unpack_2bit(qs) - ((hm.reshape(-1, QK_K) ^ 1) << 2)
        return (dl * q.reshape(-1, 16, 16).to(torch.float32)).reshape(-1, QK_K)


class Q6_K(BlockFormat):
    """6-bit K-quant: x = d·sc·(q − 32), 16 sub-blocks of 16, int8 scales. 210 bytes / 256 = 6.5625 bits/weight.

    ::

        byte 0                     128            192          208  210
             +---------------------+--------------+------------+----+
             | ql[128]             | qh[64]       | scales[16] | d  |
             +---------------------+--------------+------------+----+
        per 128 weights (ql 64 bytes, qh 32 bytes), q = 6-bit code:
        ql[l]    = low4(q[l])      | low4(q[l+64]) << 4
        ql[l+32] = low4(q[l+32])   | low4(q[l+96]) << 4
        qh[l]    = top2(q[l]) | top2(q[l+32]) << 2 | top2(q[l+64]) << 4 | top2(q[l+96]) << 6

    Sub-block search: ``make_qx_quants(nmax=32)`` (19 candidate scales, weights x²); scales
    quantized to int8 with ``iscale = −128 / max_scale``, ``d = 1 / iscale``.
    """

    name = "Q6_K"
    imatrix_sigma = "block"
    fallback = "Q8_0"

    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
        B = blocks.shape[0]
        w = None if imatrix is None else _to_positions(imatrix, 16)  # quantize_row_q6_K_impl: weights = imatrix
        res = make_qx_quants(_to_positions(blocks, 16), nmax=32, w=w)
        scales = res.scale.reshape(B, 16)
        max_scale = first_absmax(scales, 1)
        zero = max_scale.abs() < GROUP_MAX_EPS
        iscale = div(-128.0, max_scale)
        d = div(1.0, iscale)
        sc = ((nearest_int(iscale[:, None] * scales).clamp(max=127) & 0xFF) ^ 0x80) - 0x80  # int8_t
        dl = fp16_round(d)[:, None] * sc.to(torch.float32)
        xb = blocks.reshape(B, 16, 16)
        new = nearest_int_(xb / dl[..., None]).clamp_(-32, 31).add_(32)
        L = select_int((dl != 0)[..., None], new, _from_positions(res.L, B).reshape(B, 16, 16))
        L = L.to(torch.uint8).reshape(B, 2, 4, 32)  # 0..63
        low = L & 0x0F
        ql = torch.cat([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], dim=2)
        qh = _or_shifted(L >> 4, 2, 2)  # [B, 2, 32]
        out = torch.cat([ql.reshape(B, 128), qh.reshape(B, 64), (sc & 0xFF).to(torch.uint8)], dim=1)
        out = torch.cat([out, fp16_bits(d)], dim=1)
        return out.mul_((~zero)[:, None].to(torch.uint8))  # zero super-blocks: all bytes 0

    @classmethod
    def dequantize_blocks(cls, data: torch.Tensor) -> torch.Tensor:
        ql, qh, scales, d = split_bytes(data, [128, 64, 16, 2])
        dl = (half_from_bytes(d) * scales.contiguous().view(torch.int8).to(torch.float32))[..., None]  # [B, 16, 1]
        low = ql.to(torch.int32).reshape(-1, 2, 1, 64) >> torch.tensor([0, 4], device=ql.device).reshape(1, 1, 2, 1)
        low = (low & 0x0F).reshape(-1, 2, 4, 32)
        high = (
            qh.to(torch.int32).reshape(-1, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], device=qh.device).reshape(1, 1, 4, 1)
        ) & 3
        q = (low | (high << 4)) - 32
        return (dl * q.reshape(-1, 16, 16).to(torch.float32)).reshape(-1, QK_K)
