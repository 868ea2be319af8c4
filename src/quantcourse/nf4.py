"""NF4 and FP4: the 4-bit data types of QLoRA, quantized block by block exactly as bitsandbytes does.

Chapter 10 (NF4 and QLoRA) teaches this module. Paper: Dettmers, Pagnoni, Holtzman, Zettlemoyer,
"QLoRA: Efficient Finetuning of Quantized LLMs", NeurIPS 2023 (arXiv:2305.14314), section 3.
Reference code: bitsandbytes (``functional.create_normal_map``, ``quantize_4bit``, ``dequantize_4bit``,
``quantize_blockwise``), whose bytes this module reproduces.

A 4-bit data type here is a **codebook** of 16 values in ``[-1, 1]``; a 4-bit code is an index into it.

- **NF4** (NormalFloat): the codes are quantiles of the standard normal distribution, so that each of
  the 16 codes is used equally often by normally distributed weights (information-theoretically
  optimal for them, section 3 of the paper). Asymmetric: 7 negative values, an exact zero, 8 positive.
- **FP4** (bitsandbytes' E2M1): 1 sign bit, 2 exponent bits, 1 mantissa bit, scaled so the largest
  magnitude is 1.

Blockwise quantization of a tensor ``x`` with ``n`` values (any shape, read in row-major order)::

    blocks of block_size values      absmax[b] = max |x| over block b        float32 [ceil(n / block_size)]
    code[i] = the codebook entry nearest to x[i] / absmax[b], decided by the midpoints between entries
    byte[k] = code[2k] << 4 | code[2k + 1]                                   uint8 [ceil(n / 2), 1]

        byte k:  [ c2k c2k c2k c2k | c2k+1 c2k+1 c2k+1 c2k+1 ]    (bit 7 ... bit 0: first value HIGH)

An odd ``n`` is padded with one zero value (the low nibble of the last byte). Dequantization is
``codebook[code[i]] * absmax[b]``.

**Double quantization** (section 3, "Double Quantization") stores the absmax constants themselves in
8 bits: subtract their mean (``offset``), then quantize them blockwise (blocks of 256) with
bitsandbytes' signed 8-bit *dynamic* map, keeping one float32 absmax per 256 constants. The constants
then cost ``8/64 + 32/(64*256) = 0.127`` bits per parameter instead of ``32/64 = 0.5``
(:func:`bits_per_parameter`).

Where bitsandbytes' CPU path does something surprising, this module does the same, so the bytes agree:

- full blocks are scaled by ``x * (1 / absmax)``, the last partial block by ``x / absmax``;
- an all-zero block stores absmax 0 and codes for 0 (the scale is clamped to 1e-38 first), except the
  partial last block, whose absmax is stored clamped (1e-38);
- FP4 has a +0 (code 0b0000) and a -0 (0b1000): values in ``(0, 0.0026]`` get -0 and values in
  ``[-0.0026, 0)`` get +0 (the midpoint between the two zeros is 0); both dequantize to zero;
- the 8-bit absmax quantizer (double quantization) rounds each scaled constant to one of 65,536 evenly
  spaced points of [-1, 1] and looks up that point's nearest map entry: not always the nearest entry
  within 1/65535 of a midpoint (its CPU kernel does this for speed); a block of equal constants gets
  code 0.

Two places where :func:`dequantize_4bit` deliberately differs from bitsandbytes 0.50 on a CPU: its
AVX-512 kernel looks up a 2-D tensor's scales per row (``absmax[row * (width // block_size) + column //
block_size]``), which is wrong when the row width is not a multiple of the block size (blocks run across
rows: 576-wide rows in blocks of 128, say); we follow the blocks as quantized, as its CUDA, scalar and
PyTorch kernels do. And its ``dequantize_4bit`` returns a transposed tensor when the packed data has one byte (a
tensor of one or two values: a compatibility shim of its own); :func:`dequantize_4bit` always
returns the original shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import Literal

import torch
from torch import nn

from .primitives import check_float_tensor

__all__ = [
    "QUANT_TYPES",
    "BLOCK_SIZES",
    "NF4_OFFSET",
    "DOUBLE_QUANT_BLOCK_SIZE",
    "normal_float_codebook",
    "fp4_codebook",
    "dynamic_codebook",
    "codebook",
    "nearest_codes",
    "pack_nibbles",
    "unpack_nibbles",
    "Quantized4bit",
    "DoubleQuantized",
    "blockwise_absmax",
    "quantize_4bit",
    "dequantize_4bit",
    "double_quantize",
    "quantize_blockwise_8bit",
    "dequantize_blockwise_8bit",
    "bits_per_parameter",
    "Linear4bit",
    "quantize_model",
]

QuantType = Literal["nf4", "fp4"]
QUANT_TYPES = ("nf4", "fp4")
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' quantize_4bit accepts
NF4_OFFSET = 0.9677083  # create_normal_map's default: 1 - (1/32 + 1/30) / 2, so that Φ⁻¹(offset) ≈ 1.848
DOUBLE_QUANT_BLOCK_SIZE = 256  # quantize_4bit(compress_statistics=True) quantizes absmax in blocks of 256
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MIN_SCALE = 1e-38  # bitsandbytes clamps absmax before taking its reciprocal


# ----------------------------------------------------------------------------------------------------------
# Codebooks


def normal_float_codebook(offset: float = NF4_OFFSET, *, use_extra_value: bool = True) -> torch.Tensor:
    """The NormalFloat codebook built from quantiles of N(0, 1), as bitsandbytes' ``create_normal_map``.

    With ``use_extra_value`` (NF4): 8 positive codes ``Φ⁻¹(p)`` for ``p`` in ``linspace(offset, 0.5, 9)``
    without its last point, 7 negative codes ``-Φ⁻¹(p)`` for ``p`` in ``linspace(offset, 0.5, 8)`` without its
    last point, and an exact 0; sorted and divided by the largest, so the ends are -1 and 1. Each code
    then stands for an equal share of a normal distribution's probability mass. ``offset`` is the
    outermost quantile: Φ⁻¹(1) would be infinite, so the ends are pulled in to ``Φ⁻¹(offset)``.

    Returns:
        float32 ``[16]`` ascending (``[15]`` for the symmetric ``use_extra_value=False`` variant).
    """
    from scipy.stats import norm

    if not isinstance(offset, (int, float)) or isinstance(offset, bool) or not 0.5 < offset < 1:
        raise ValueError(f"offset must be a probability in (0.5, 1), got {offset!r}; NF4 uses {NF4_OFFSET}")
    n_positive = 8 if use_extra_value else 7
    # torch.linspace in float32 and scipy's ppf, as create_normal_map computes them, so the values agree bitwise.
    positive = norm.ppf(torch.linspace(offset, 0.5, n_positive + 1)[:-1].numpy()).tolist()
    negative = (-norm.ppf(torch.linspace(offset, 0.5, 8)[:-1].numpy())).tolist()
    values = torch.tensor(positive + [0.0] + negative, dtype=torch.float32).sort().values
    return values / values.max()


def fp4_codebook() -> torch.Tensor:
    """bitsandbytes' FP4 codebook, indexed by the 4-bit code (not sorted).

    Code bits ``s e1 e0 m``: sign, a 2-bit exponent field ``e`` and a 1-bit mantissa ``m``. Normal values
    (``e >= 1``) are ``(1 + m/2) * 2^(4 - e)``, so ``e = 1, 2, 3`` give 8, 4, 2 (and 12, 6, 3 with the mantissa
    bit); ``e = 0`` holds 0 and the subnormal ``2^-4``. Everything is divided by the largest magnitude, 12::

        code  0    1       2    3    4    5    6    7          (8..15: the same, negative)
        value 0  1/192   2/3    1   1/3  1/2  1/6  1/4

    Returns:
        float32 ``[16]``; entry ``c`` is the value of code ``c`` (entry 8 is -0.0).
    """
    c = torch.arange(16)
    sign = 1.0 - 2.0 * ((c >> 3) & 1).double()
    e, m = ((c >> 1) & 3).double(), (c & 1).double()
    magnitude = torch.where(e > 0, (1 + m / 2) * torch.exp2(4 - e), m * 2.0**-4)
    return (sign * magnitude / 12).float()


def dynamic_codebook() -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" map (``create_dynamic_map()``), used by double quantization.

    A dynamic-exponent format (Dettmers 2016): the position of the first 1 bit after the sign sets a
    decimal exponent from 10^-6 to 10^0, and the bits after it a linear fraction in (0.1, 1). Values
    crowd near zero, where most (absmax - mean) constants lie.

    Returns:
        float32 ``[256]`` ascending, from -0.99297 to 1.0 (0 included).
    """
    values = [torch.tensor([0.0, 1.0])]
    for i in range(7):  # exponent 10^(i - 6), 2^i fractions: float32 arithmetic, as bitsandbytes
        boundaries = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        values += [10 ** (i - 6) * means, -(10 ** (i - 6)) * means]
    return torch.cat(values).sort().values


@cache
def _codebook(quant_type: str) -> torch.Tensor:
    return normal_float_codebook() if quant_type == "nf4" else fp4_codebook()


def _check_quant_type(quant_type: str) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


def codebook(quant_type: QuantType = "nf4", device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 values of ``"nf4"`` or ``"fp4"``, indexed by code: float32 ``[16]`` (a fresh copy)."""
    _check_quant_type(quant_type)
    return _codebook(quant_type).to(device, copy=True)


@cache
def _decision_table(quant_type: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Midpoints between sorted codebook values ``[15]`` and the code of each sorted position ``[16]``."""
    values = _codebook(quant_type)
    order = torch.argsort(values, stable=True)  # FP4's +0 (code 0) sorts before its -0 (code 8)
    sorted_values = values[order]
    midpoints = (sorted_values[:-1] + sorted_values[1:]) / 2  # float32, as bitsandbytes computes them
    return midpoints.to(device), order.to(torch.int32).to(device)


def nearest_codes(scaled: torch.Tensor, quant_type: QuantType = "nf4") -> torch.Tensor:
    """The code of the codebook value nearest to each of ``scaled`` (values in ``[-1, 1]``).

    Nearest is decided by the midpoints between neighbouring values: a value exactly on a midpoint goes
    to the lower one (``torch.bucketize``, as bitsandbytes' CPU path and its CUDA comparison tree).

    Args:
        scaled: float32 tensor of any shape, already divided by its block's absmax.

    Returns:
        int32 codes in ``[0, 15]``, ``scaled``'s shape.
    """
    _check_quant_type(quant_type)
    midpoints, order = _decision_table(quant_type, scaled.device)
    position = torch.bucketize(scaled, midpoints, out_int32=True)
    return position if quant_type == "nf4" else order[position]  # NF4's codebook is already sorted


# ----------------------------------------------------------------------------------------------------------
# Packing two codes per byte


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes two per byte, the first of each pair in the HIGH nibble (bitsandbytes' layout).

    Args:
        codes: integer tensor of any shape with values in ``[0, 15]``, read in row-major order.

    Returns:
        uint8 ``[ceil(n / 2), 1]``; an odd count is padded with code 0 in the last low nibble
        (:func:`quantize_4bit` pads with the code of the value 0 instead, as bitsandbytes).
    """
    flat = codes.reshape(-1)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.view(-1, 2)
    return (pairs[:, 0] * 16 + pairs[:, 1]).to(torch.uint8).unsqueeze(1)


def unpack_nibbles(data: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: uint8 bytes back to ``n`` uint8 codes ``[n]`` (high nibble first)."""
    if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8:
        raise TypeError(f"data must be the uint8 tensor of a 4-bit quantization, got {_describe(data)}")
    if data.numel() != -(-n // 2):
        raise ValueError(f"{n} codes take {-(-n // 2)} bytes, but data has {data.numel()}")
    flat = data.reshape(-1)
    return torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[:n]


@cache
def _byte_table(quant_type: str, device: torch.device) -> torch.Tensor:
    """float32 ``[256, 2]``: the two values a byte stands for (high nibble, low nibble)."""
    values = _codebook(quant_type)
    byte = torch.arange(256)
    return torch.stack([values[byte >> 4], values[byte & 0xF]], dim=1).contiguous().to(device)


# ----------------------------------------------------------------------------------------------------------
# Quantized tensors


@dataclass(frozen=True)
class DoubleQuantized:
    """Absmax constants quantized a second time: 8-bit dynamic codes around their mean.

    Attributes:
        codes: uint8 ``[n_blocks]``: index into :func:`dynamic_codebook` of ``(absmax - offset) / absmax2``.
        absmax2: float32 ``[ceil(n_blocks / block_size)]``: the second-level constants.
        offset: float32 ``[]``: the mean of the original absmax, added back after dequantizing.
        block_size: constants per second-level block (256).
    """

    codes: torch.Tensor
    absmax2: torch.Tensor
    offset: torch.Tensor
    block_size: int = DOUBLE_QUANT_BLOCK_SIZE

    def dequantize(self) -> torch.Tensor:
        """The absmax constants the 4-bit dequantization uses: float32 ``[n_blocks]``."""
        return dequantize_blockwise_8bit(self.codes, self.absmax2, block_size=self.block_size) + self.offset


@dataclass(frozen=True)
class Quantized4bit:
    """A tensor in 4 bits, as ``bitsandbytes.functional.quantize_4bit`` stores it.

    Attributes:
        data: uint8 ``[ceil(n / 2), 1]``: two codes per byte, the first in the high nibble.
        absmax: float32 ``[ceil(n / block_size)]`` per block, or :class:`DoubleQuantized` with double
            quantization (the state bitsandbytes keeps as ``absmax``, ``offset`` and ``state2``).
        shape: the original shape; ``dtype``: the original dtype (what dequantization returns).
        block_size: values per block; ``quant_type``: ``"nf4"`` or ``"fp4"``.
    """

    data: torch.Tensor
    absmax: torch.Tensor | DoubleQuantized
    shape: torch.Size
    dtype: torch.dtype
    block_size: int
    quant_type: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def double_quant(self) -> bool:
        return isinstance(self.absmax, DoubleQuantized)

    def block_absmax(self) -> torch.Tensor:
        """The per-block scales dequantization multiplies by: float32 ``[n_blocks]``."""
        return self.absmax.dequantize() if self.double_quant else self.absmax

    def nbytes(self) -> int:
        """Bytes of the codes and every constant (what a checkpoint stores, beside a few scalars)."""
        if self.double_quant:
            a = self.absmax
            constants = a.codes.numel() + 4 * a.absmax2.numel() + 4
        else:
            constants = 4 * self.absmax.numel()
        return self.data.numel() + constants

    def dequantize(self) -> torch.Tensor:
        """Shorthand for :func:`dequantize_4bit`."""
        return dequantize_4bit(self)


def _describe(x) -> str:
    return f"dtype {x.dtype} and shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def _check_block_size(block_size: int, allowed: tuple[int, ...] = BLOCK_SIZES) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size not in allowed:
        raise ValueError(
            f"block_size must be one of {', '.join(map(str, allowed))} (powers of two, as bitsandbytes "
            f"accepts), got {block_size!r}"
        )


def _check_input(x: torch.Tensor) -> None:
    check_float_tensor(x)  # a tensor, floating point, not empty, no NaN or Inf
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"x must be float32, float16 or bfloat16 (the dtypes bitsandbytes quantizes), got {x.dtype}; "
            "convert it with x.float()"
        )


def blockwise_absmax(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """``max |x|`` over consecutive blocks of ``block_size`` values of ``x`` flattened (the last may be short).

    Args:
        x: float tensor of any shape; read as float32.

    Returns:
        float32 ``[ceil(n / block_size)]``.
    """
    flat = x.reshape(-1).float()
    full = flat.numel() - flat.numel() % block_size
    low, high = torch.aminmax(flat[:full].view(-1, block_size), dim=1)  # one pass, no |x| temporary
    absmax = torch.maximum(-low, high)
    if full < flat.numel():
        absmax = torch.cat([absmax, flat[full:].abs().amax().reshape(1)])
    return absmax


def _scaled_blocks(flat: torch.Tensor, absmax: torch.Tensor, block_size: int) -> torch.Tensor:
    """``flat / absmax`` per block, clamped to ``[-1, 1]``, with bitsandbytes' float32 arithmetic."""
    full = flat.numel() - flat.numel() % block_size
    n_full = full // block_size
    reciprocal = 1.0 / absmax[:n_full].clamp(min=_MIN_SCALE)
    scaled = flat[:full].view(n_full, block_size) * reciprocal[:, None]  # [n_full, block_size]
    scaled = scaled.view(-1)
    if full < flat.numel():  # the partial last block is divided, not multiplied by a reciprocal
        tail = flat[full:] / absmax[n_full:].clamp(min=_MIN_SCALE)
        scaled = torch.cat([scaled, tail])
    return scaled.clamp_(-1, 1)


def quantize_4bit(
    x: torch.Tensor, *, quant_type: QuantType = "nf4", block_size: int = 64, double_quant: bool = False
) -> Quantized4bit:
    """Quantize ``x`` to 4-bit NF4 or FP4 codes with one absmax per block, as bitsandbytes does.

    ``data`` and ``absmax`` equal ``bitsandbytes.functional.quantize_4bit(x, blocksize=block_size,
    quant_type=quant_type, compress_statistics=double_quant)``'s output and ``state.absmax`` (with
    ``double_quant``, the nested state: ``absmax`` codes, ``offset`` and ``state2.absmax``).

    Args:
        x: float32, float16 or bfloat16 tensor of any shape (a weight ``[out, in]`` is read row by row).
        quant_type: ``"nf4"`` (the QLoRA default) or ``"fp4"``.
        block_size: values per absmax, one of 32, 64 (the default), ..., 4096.
        double_quant: quantize the absmax constants again (:func:`double_quantize`).

    Returns:
        :class:`Quantized4bit`.
    """
    _check_quant_type(quant_type)
    _check_block_size(block_size)
    _check_input(x)
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be True or False, got {double_quant!r}")
    flat = x.reshape(-1).float()
    absmax = blockwise_absmax(flat, block_size)  # [n_blocks]
    if flat.numel() % block_size:  # bitsandbytes stores the partial last block's absmax clamped to 1e-38
        absmax[-1] = absmax[-1].clamp(min=_MIN_SCALE)
    scaled = _scaled_blocks(flat, absmax, block_size)  # [n]
    if scaled.numel() % 2:  # an odd count is padded with the value 0 (its code: 7 in NF4, 0 in FP4)
        scaled = torch.cat([scaled, scaled.new_zeros(1)])
    codes = nearest_codes(scaled, quant_type)  # int32 [n rounded up to even]
    state = double_quantize(absmax) if double_quant else absmax
    return Quantized4bit(pack_nibbles(codes), state, x.shape, x.dtype, block_size, quant_type)


def dequantize_4bit(q: Quantized4bit) -> torch.Tensor:
    """``codebook[code] * absmax`` for every value: the tensor :func:`quantize_4bit` saw, rounded.

    Equals ``bitsandbytes.functional.dequantize_4bit`` (computed in float32, then cast to ``q.dtype``).

    Returns:
        ``q.shape``, ``q.dtype``.
    """
    if not isinstance(q, Quantized4bit):
        raise TypeError(f"q must be a Quantized4bit from quantize_4bit, got {type(q).__name__}")
    absmax = q.block_absmax()  # [n_blocks]
    n, block_size = q.numel, q.block_size
    table = _byte_table(q.quant_type, q.data.device)  # [256, 2]
    values = torch.empty(q.data.numel(), 2, device=q.data.device)  # [ceil(n / 2), 2]
    torch.index_select(table, 0, q.data.reshape(-1).to(torch.int32), out=values)  # one lookup per byte
    values = values.view(-1)[:n]
    full = n - n % block_size
    values[:full].view(-1, block_size).mul_(absmax[: full // block_size, None])
    if full < n:
        values[full:].mul_(absmax[-1])
    return values.view(q.shape).to(q.dtype)


# ----------------------------------------------------------------------------------------------------------
# 8-bit blockwise quantization of the constants (double quantization)


LUT_SIZE = 65536  # bitsandbytes' CPU blockwise quantizer reads the nearest entry from a table over [-1, 1]


@cache
def _dynamic(device: torch.device) -> torch.Tensor:
    return dynamic_codebook().to(device)


@cache
def _dynamic_lut(device: torch.device) -> torch.Tensor:
    """int64 ``[65536]``: the nearest dynamic-map entry for each of 65,536 evenly spaced points of [-1, 1]."""
    code = dynamic_codebook()
    midpoints = 0.5 * (code[:-1] + code[1:])  # [255]
    points = -1.0 + (2.0 * torch.arange(LUT_SIZE, dtype=torch.float32)) / (LUT_SIZE - 1)  # float32, as the C code
    return torch.searchsorted(midpoints, points).to(device)  # how many midpoints lie below each point


def quantize_blockwise_8bit(
    x: torch.Tensor, *, block_size: int = DOUBLE_QUANT_BLOCK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization with the dynamic map, as ``bitsandbytes.functional.quantize_blockwise``.

    Each block is scaled by ``1 / absmax`` into [-1, 1]; bitsandbytes' CPU kernel then rounds the scaled
    value to the nearest of 65,536 evenly spaced points and reads that point's nearest map entry from a
    table. That is the nearest entry except within 1/65535 of a midpoint between two entries, where the
    table may give the other neighbour; we use the same table, so the codes are the same. A block whose
    values are all 0 gets codes 0.

    Args:
        x: float32 ``[n]`` (double quantization passes ``absmax - offset``).
        block_size: values per second-level absmax (256 for double quantization).

    Returns:
        ``(codes, absmax2)``: uint8 ``[n]`` indices into :func:`dynamic_codebook` and float32
        ``[ceil(n / block_size)]``.
    """
    _check_block_size(block_size, (64, 128, 256, 512, 1024, 2048, 4096))
    flat = x.reshape(-1).float()
    absmax2 = blockwise_absmax(flat, block_size)
    reciprocal = (1.0 / absmax2).repeat_interleave(block_size)[: flat.numel()]  # [n]
    scaled = (flat * reciprocal).clamp_(-1, 1)
    point = ((scaled + 1.0) * 0.5 * (LUT_SIZE - 1) + 0.5).long()  # float32 arithmetic, truncated, as the C code
    codes = _dynamic_lut(x.device)[point.clamp_(0, LUT_SIZE - 1)]
    zero_block = (absmax2 == 0).repeat_interleave(block_size)[: flat.numel()]
    return codes.masked_fill_(zero_block, 0).to(torch.uint8), absmax2


def dequantize_blockwise_8bit(
    codes: torch.Tensor, absmax2: torch.Tensor, *, block_size: int = DOUBLE_QUANT_BLOCK_SIZE
) -> torch.Tensor:
    """``dynamic_codebook()[codes] * absmax2`` per block: float32 ``[n]``."""
    values = _dynamic(codes.device)[codes.reshape(-1).long()]
    return values * absmax2.repeat_interleave(block_size)[: values.numel()]


def double_quantize(absmax: torch.Tensor, *, block_size: int = DOUBLE_QUANT_BLOCK_SIZE) -> DoubleQuantized:
    """Quantize absmax constants as QLoRA's double quantization: mean removed, then 8-bit blockwise.

    Equals the nested state of ``bitsandbytes.functional.quantize_4bit(compress_statistics=True)``:
    ``offset = absmax.mean()``, then ``quantize_blockwise(absmax - offset, blocksize=256)``. The
    constants are positive, so without the mean the signed map would waste its negative half.

    Args:
        absmax: float32 ``[n_blocks]``.

    Returns:
        :class:`DoubleQuantized`.
    """
    if not isinstance(absmax, torch.Tensor) or absmax.dtype != torch.float32 or absmax.dim() != 1:
        raise TypeError(f"absmax must be a 1-D float32 tensor of block constants, got {_describe(absmax)}")
    offset = absmax.mean()
    codes, absmax2 = quantize_blockwise_8bit(absmax - offset, block_size=block_size)
    return DoubleQuantized(codes, absmax2, offset, block_size)


def bits_per_parameter(
    block_size: int = 64,
    *,
    double_quant: bool = False,
    code_bits: int = 4,
    absmax_bits: int = 32,
    double_quant_bits: int = 8,
    double_quant_block_size: int = DOUBLE_QUANT_BLOCK_SIZE,
) -> float:
    """Storage bits per weight of blockwise 4-bit quantization, constants included (QLoRA section 3).

    Without double quantization each block of ``block_size`` weights adds one float32 absmax:
    ``4 + 32/64 = 4.5``. With it, each block adds an 8-bit code and every ``256`` blocks one float32:
    ``4 + 8/64 + 32/(64*256) = 4.127`` (the single float32 offset per tensor is left out).
    """
    for name, value in (("block_size", block_size), ("double_quant_block_size", double_quant_block_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not double_quant:
        return code_bits + absmax_bits / block_size
    return code_bits + double_quant_bits / block_size + absmax_bits / (block_size * double_quant_block_size)


# ----------------------------------------------------------------------------------------------------------
# Module and model


class Linear4bit(nn.Module):
    """A linear layer whose weight is stored in 4 bits; the forward dequantizes it (like bnb's ``Linear4bit``).

    ``y = x @ dequantize_4bit(W)ᵀ + b`` with ``W [out, in]`` quantized row by row. The weight is a frozen
    buffer (QLoRA trains adapters beside it, never the 4-bit weight); the bias stays a float parameter.
    """

    def __init__(self, weight: Quantized4bit, bias: torch.Tensor | None, compute_dtype: torch.dtype) -> None:
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"a Linear4bit weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.quant_type, self.block_size = weight.quant_type, weight.block_size
        self.weight_shape, self.weight_dtype = weight.shape, weight.dtype
        self.compute_dtype = compute_dtype
        self.register_buffer("data", weight.data)
        if weight.double_quant:
            self.absmax = None
            self.register_buffer("absmax_codes", weight.absmax.codes)
            self.register_buffer("absmax2", weight.absmax.absmax2)
            self.register_buffer("absmax_offset", weight.absmax.offset)
        else:
            self.register_buffer("absmax", weight.absmax)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_float(
        cls, linear: nn.Linear, *, quant_type: QuantType = "nf4", block_size: int = 64, double_quant: bool = True
    ) -> Linear4bit:
        """Quantize ``linear.weight`` (``double_quant`` defaults to True, as QLoRA and ``Params4bit`` do)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_float needs an nn.Linear, got {type(linear).__name__}")
        weight = quantize_4bit(
            linear.weight.detach(), quant_type=quant_type, block_size=block_size, double_quant=double_quant
        )
        return cls(weight, linear.bias, linear.weight.dtype)

    def quantized_weight(self) -> Quantized4bit:
        """The stored weight as a :class:`Quantized4bit`."""
        if self.absmax is None:
            absmax = DoubleQuantized(self.absmax_codes, self.absmax2, self.absmax_offset)
        else:
            absmax = self.absmax
        return Quantized4bit(self.data, absmax, self.weight_shape, self.weight_dtype, self.block_size, self.quant_type)

    def dequantized_weight(self) -> torch.Tensor:
        """``W [out, in]`` as the forward uses it, in ``compute_dtype``."""
        return dequantize_4bit(self.quantized_weight()).to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        W = self.dequantized_weight()
        bias = None if self.bias is None else self.bias.to(W.dtype)
        return nn.functional.linear(x.to(W.dtype), W, bias).to(x.dtype)

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.absmax is None else ""
        return f"{self.in_features}, {self.out_features}, {self.quant_type}, block_size={self.block_size}{dq}"


def quantize_model(
    model: nn.Module, *, quant_type: QuantType = "nf4", block_size: int = 64, double_quant: bool = True
) -> nn.Module:
    """Replace every linear layer of the decoder blocks with a :class:`Linear4bit`, in place.

    The embeddings and the output head stay in float, as ``load_in_4bit`` leaves them. The layers are
    found and swapped by :func:`quantcourse.surgery.replace_linears`.

    Returns:
        ``model``.
    """
    from .surgery import replace_linears

    _check_quant_type(quant_type)
    _check_block_size(block_size)
    return replace_linears(
        model,
        lambda name, linear: Linear4bit.from_float(
            linear, quant_type=quant_type, block_size=block_size, double_quant=double_quant
        ),
    )
