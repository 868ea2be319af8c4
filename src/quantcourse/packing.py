"""Pack integer codes of 2 to 8 bits densely into bytes, and unpack them.

Chapter 6 (GPTQ) uses it to store quantized models; any ``n_bits`` from 1 to 8 works.

Layout: a dense little-endian bit stream along the last dimension. Code ``j`` of a row occupies
bits ``j*b .. j*b + b-1`` of the row's stream, least significant bit first, and bit ``k`` of the
stream is bit ``k % 8`` of byte ``k // 8``. A row of ``n`` codes takes ``ceil(n*b / 8)`` bytes; the
unused high bits of the last byte are 0. For 2, 4 and 8 bits this is the usual "first code in the
low bits" packing; 3-bit codes straddle bytes, 8 codes in 3 bytes::

    4 bits:  byte 0 = [ c1 c1 c1 c1 | c0 c0 c0 c0 ]       (bit 7 ... bit 0)
    3 bits:  byte 0 = [ c2 c2 | c1 c1 c1 | c0 c0 c0 ]
             byte 1 = [ c5 | c4 c4 c4 | c3 c3 c3 | c2 ]
             byte 2 = [ c7 c7 c7 | c6 c6 c6 | c5 c5 ]

(GPTQ's CUDA kernels pack into int32 words instead; this byte stream is simpler to read and
just as dense.)
"""

from __future__ import annotations

import torch

__all__ = ["pack_codes", "unpack_codes", "packed_size"]


def _check_bits(n_bits: int) -> None:
    if isinstance(n_bits, bool) or not isinstance(n_bits, int) or not 1 <= n_bits <= 8:
        raise ValueError(f"n_bits must be an int from 1 to 8 to pack into bytes, got {n_bits!r}")


def packed_size(n: int, n_bits: int) -> int:
    """Bytes taken by ``n`` codes of ``n_bits`` bits: ``ceil(n * n_bits / 8)``."""
    _check_bits(n_bits)
    return -(-n * n_bits // 8)


def pack_codes(codes: torch.Tensor, n_bits: int) -> torch.Tensor:
    """Pack codes ``[..., n]`` (integers in ``[0, 2**n_bits - 1]``) into uint8 ``[..., ceil(n*n_bits/8)]``."""
    _check_bits(n_bits)
    if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.dtype == torch.bool:
        raise TypeError(
            f"codes must be an integer tensor, got "
            f"{codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__}"
        )
    if codes.dim() == 0:
        raise ValueError("codes must have at least one dimension (the one to pack along)")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2**n_bits):
        raise ValueError(
            f"codes must lie in [0, {2**n_bits - 1}] for n_bits={n_bits}, got values in "
            f"[{int(codes.min())}, {int(codes.max())}]"
        )
    n = codes.shape[-1]
    shifts = torch.arange(n_bits, device=codes.device, dtype=torch.int32)
    bits = (codes.to(torch.int32).unsqueeze(-1) >> shifts) & 1  # [..., n, n_bits], LSB first
    bits = bits.flatten(-2)
    pad = packed_size(n, n_bits) * 8 - bits.shape[-1]
    bits = torch.nn.functional.pad(bits, (0, pad)).unflatten(-1, (-1, 8))  # [..., bytes, 8]
    weights = 1 << torch.arange(8, device=codes.device, dtype=torch.int32)
    return (bits * weights).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, n_bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 ``[..., bytes]`` back to uint8 codes ``[..., n]``."""
    _check_bits(n_bits)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise TypeError(
            f"packed must be a uint8 tensor from pack_codes, got "
            f"{packed.dtype if isinstance(packed, torch.Tensor) else type(packed).__name__}"
        )
    if packed.dim() == 0 or packed.shape[-1] != packed_size(n, n_bits):
        raise ValueError(
            f"{n} codes of {n_bits} bits take {packed_size(n, n_bits)} bytes per row, "
            f"but packed has shape {tuple(packed.shape)}"
        )
    bits = (packed.to(torch.int32).unsqueeze(-1) >> torch.arange(8, device=packed.device, dtype=torch.int32)) & 1
    bits = bits.flatten(-2)[..., : n * n_bits].unflatten(-1, (n, n_bits))  # [..., n, n_bits]
    weights = 1 << torch.arange(n_bits, device=packed.device, dtype=torch.int32)
    return (bits * weights).sum(-1).to(torch.uint8)
