"""Number formats: integers of 2 to 8 bits, fp32, fp16, bf16, the two fp8 formats, and codebooks (fp4 e2m1).

Chapter 1 (Memory arithmetic) teaches these. Each format is a frozen dataclass that knows its
range, its smallest normal and subnormal values, its epsilon, and how to round a tensor onto
its grid (``fmt.round(x)``). All live in one registry, :data:`FORMATS` (:func:`get_format` by name,
:func:`register_format` to add one): integer grids (:class:`IntFormat`), binary floating point
(:class:`FloatFormat`) and formats defined by the list of their values (:class:`CodebookFormat`: fp4
e2m1 here; NF4's 16 levels belong here too).

A floating-point format with ``E`` exponent bits and ``M`` mantissa bits stores::

    sign | exponent (E bits, biased by 2^(E-1) - 1) | mantissa (M bits)

    fp16      1 | 5 | 10      IEEE half:     max 65504,      eps 2^-10
    bf16      1 | 8 |  7      bfloat16:      max ~3.39e38,   eps 2^-7
    fp8 e4m3  1 | 4 |  3      OCP E4M3 "fn": max 448,        eps 2^-3  (no infinities)
    fp8 e5m2  1 | 5 |  2      OCP E5M2:      max 57344,      eps 2^-2

A normal value is ``(1 + mantissa / 2^M) * 2^(exponent - bias)``; exponent field 0 holds the
subnormals ``(mantissa / 2^M) * 2^(1 - bias)``, evenly spaced down to zero. IEEE-style formats
(fp16, bf16, e5m2) reserve the all-ones exponent for infinities and NaN. E4M3 "fn" (finite)
keeps that exponent for numbers and gives up only the all-ones mantissa there, for NaN: so its
largest value is ``1.75 * 2^8 = 448``.

Rounding is round-to-nearest, ties to even (the IEEE default, and what torch's casts do), and
*saturating*: values beyond the range become ``±max`` (as the OCP fp8 specification's
saturating conversion, and torch's own ``float8_e4m3fn`` cast, do). NaN stays NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "IntFormat",
    "FloatFormat",
    "CodebookFormat",
    "NumberFormat",
    "get_format",
    "register_format",
    "FORMATS",
    "INT2",
    "INT3",
    "INT4",
    "INT5",
    "INT6",
    "INT7",
    "INT8",
    "UINT2",
    "UINT3",
    "UINT4",
    "UINT5",
    "UINT6",
    "UINT7",
    "UINT8",
    "FP32",
    "FP16",
    "BF16",
    "FP8_E4M3",
    "FP8_E5M2",
    "FP4_E2M1",
]


def _check_tensor(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}; convert it with x.float()")


@dataclass(frozen=True)
class IntFormat:
    """A two's-complement (``signed``) or unsigned integer of ``n_bits`` bits.

    Integers are evenly spaced: the step is 1 everywhere, so ``smallest_normal``,
    ``smallest_subnormal`` and ``eps`` are all 1. Note that the symmetric quantizers of
    chapter 2 use only ``[-(2^(n-1) - 1), 2^(n-1) - 1]`` of a signed format, dropping its most
    negative code so that the grid is symmetric around zero.
    """

    n_bits: int
    signed: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.n_bits, bool) or not isinstance(self.n_bits, int) or not 1 <= self.n_bits <= 32:
            raise ValueError(f"IntFormat needs n_bits an int from 1 to 32, got {self.n_bits!r}")

    @property
    def name(self) -> str:
        return f"{'' if self.signed else 'u'}int{self.n_bits}"

    @property
    def bits(self) -> int:
        """Storage bits per value."""
        return self.n_bits

    @property
    def max(self) -> int:
        return 2 ** (self.n_bits - 1) - 1 if self.signed else 2**self.n_bits - 1

    @property
    def min(self) -> int:
        """The most negative value (0 for unsigned formats)."""
        return -(2 ** (self.n_bits - 1)) if self.signed else 0

    @property
    def smallest_normal(self) -> int:
        return 1

    @property
    def smallest_subnormal(self) -> int:
        return 1

    @property
    def eps(self) -> int:
        return 1

    @property
    def n_values(self) -> int:
        return 2**self.n_bits

    def values(self) -> torch.Tensor:
        """Every representable value, ascending: float64 ``[2^n_bits]``."""
        return torch.arange(self.min, self.max + 1, dtype=torch.float64)

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """Round ``x`` to the nearest integer (ties to even) and clamp it to ``[min, max]``.

        Args:
            x: floating-point tensor of any shape; not modified.

        Returns:
            a tensor of ``x``'s shape and dtype holding integer values. NaN stays NaN.
        """
        _check_tensor(x)
        return torch.round(x.double()).clamp(self.min, self.max).to(x.dtype)


@dataclass(frozen=True)
class FloatFormat:
    """A binary floating-point format: 1 sign bit, ``exponent_bits``, ``mantissa_bits``.

    Args:
        name: e.g. ``"fp8_e4m3"``.
        exponent_bits, mantissa_bits: field widths.
        finite: True for the "fn" formats (E4M3): no infinities, the all-ones exponent holds
            numbers and only the all-ones mantissa there is NaN. False for IEEE-style formats,
            whose all-ones exponent is reserved for infinities and NaN.
        torch_dtype: the matching torch dtype, if torch has one.
    """

    name: str
    exponent_bits: int
    mantissa_bits: int
    finite: bool = False
    torch_dtype: torch.dtype | None = None

    @property
    def bits(self) -> int:
        """Storage bits per value: sign + exponent + mantissa."""
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def bias(self) -> int:
        return 2 ** (self.exponent_bits - 1) - 1

    @property
    def max_exponent(self) -> int:
        """Unbiased exponent of the largest finite values."""
        top_field = 2**self.exponent_bits - 1 if self.finite else 2**self.exponent_bits - 2
        return top_field - self.bias

    @property
    def min_exponent(self) -> int:
        """Unbiased exponent of the smallest normal values (and the subnormals' scale)."""
        return 1 - self.bias

    @property
    def max(self) -> float:
        """Largest finite value. In a "fn" format the all-ones mantissa of the top exponent is NaN."""
        ulps_below_two = 2 if self.finite else 1
        return (2 - ulps_below_two * 2.0**-self.mantissa_bits) * 2.0**self.max_exponent

    @property
    def min(self) -> float:
        """The most negative finite value, ``-max``."""
        return -self.max

    @property
    def smallest_normal(self) -> float:
        return 2.0**self.min_exponent

    @property
    def smallest_subnormal(self) -> float:
        return 2.0 ** (self.min_exponent - self.mantissa_bits)

    @property
    def eps(self) -> float:
        """Distance from 1 to the next larger value: the relative precision, ``2^-mantissa_bits``."""
        return 2.0**-self.mantissa_bits

    @property
    def has_inf(self) -> bool:
        return not self.finite

    def values(self) -> torch.Tensor:
        """Every finite non-negative value, ascending: float64 (0, the subnormals, the normals)."""
        m = self.mantissa_bits
        fractions = torch.arange(2**m, dtype=torch.float64) / 2**m  # [2^m]
        subnormals = fractions * 2.0**self.min_exponent
        exponents = torch.arange(self.min_exponent, self.max_exponent + 1, dtype=torch.float64)
        normals = ((1 + fractions)[None, :] * torch.exp2(exponents)[:, None]).flatten()
        return torch.cat([subnormals, normals[normals <= self.max]])

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """Round ``x`` to the nearest value of this format (ties to even), saturating at ``±max``.

        Inside the range this equals torch's own cast, e.g. ``x.to(torch.float8_e4m3fn).to(x.dtype)``;
        beyond it the result is ``±max`` (also for ±inf). NaN stays NaN.

        Args:
            x: floating-point tensor of any shape; not modified.

        Returns:
            a tensor of ``x``'s shape and dtype.
        """
        _check_tensor(x)
        xd = x.double()
        magnitude = xd.abs()
        # The spacing of the grid around each value: 2^(exponent - M), and never finer than the
        # subnormal spacing. frexp is exact (no log2 rounding trouble at powers of two).
        _, exponent = torch.frexp(magnitude)  # magnitude = m * 2^exponent, m in [0.5, 1)
        exponent = (exponent - 1).clamp(min=self.min_exponent)
        step = torch.exp2((exponent - self.mantissa_bits).double())
        # Dividing by a power of two is exact, and torch.round rounds ties to even.
        rounded = (torch.round(magnitude / step) * step).clamp(max=self.max)
        rounded = torch.where(torch.isinf(magnitude), torch.full_like(rounded, self.max), rounded)
        return torch.copysign(rounded, xd).to(x.dtype)


@dataclass(frozen=True)
class CodebookFormat:
    """A format defined by the list of its values (a codebook): fp4 e2m1, NF4 and the like.

    A code is an index into ``levels``; ``round`` maps each value to the nearest level. Such formats are
    used scaled (a per-block absmax maps a block onto ``[min, max]``), so the levels are usually in ``[-1, 1]``
    or small integers.

    Args:
        name: e.g. ``"fp4_e2m1"``.
        levels: the distinct values, ascending.
        bits: bits per code (``2**bits >= len(levels)``; fp4 e2m1 has 15 distinct values in 16 codes, as
            +0 and -0 are one value).
    """

    name: str
    levels: tuple[float, ...]
    bits: int

    def __post_init__(self) -> None:
        levels = tuple(float(v) for v in self.levels)
        if len(levels) < 2 or list(levels) != sorted(set(levels)):
            raise ValueError(f"CodebookFormat {self.name!r} needs at least 2 distinct levels in ascending order")
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or 2**self.bits < len(levels):
            raise ValueError(
                f"CodebookFormat {self.name!r}: {len(levels)} levels need bits >= "
                f"{(len(levels) - 1).bit_length()}, got {self.bits!r}"
            )
        object.__setattr__(self, "levels", levels)

    @property
    def max(self) -> float:
        return self.levels[-1]

    @property
    def min(self) -> float:
        return self.levels[0]

    @property
    def n_values(self) -> int:
        return len(self.levels)

    def values(self) -> torch.Tensor:
        """Every value, ascending: float64 ``[n_values]``."""
        return torch.tensor(self.levels, dtype=torch.float64)

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """Map each element of ``x`` to the nearest level (a tie goes to the smaller level), saturating.

        Args:
            x: floating-point tensor of any shape; not modified.

        Returns:
            a tensor of ``x``'s shape and dtype. NaN stays NaN.
        """
        _check_tensor(x)
        levels = self.values().to(x.device)
        xd = x.double()
        midpoints = (levels[1:] + levels[:-1]) / 2  # [n_values - 1]: a value above midpoint i rounds up
        index = torch.bucketize(xd, midpoints, right=False)  # x == midpoint goes to the smaller level
        return torch.where(torch.isnan(xd), xd, levels[index]).to(x.dtype)


NumberFormat = IntFormat | FloatFormat | CodebookFormat

INT2, INT3, INT4, INT5, INT6, INT7, INT8 = (IntFormat(n, True) for n in range(2, 9))
UINT2, UINT3, UINT4, UINT5, UINT6, UINT7, UINT8 = (IntFormat(n, False) for n in range(2, 9))
FP32 = FloatFormat("fp32", 8, 23, torch_dtype=torch.float32)
FP16 = FloatFormat("fp16", 5, 10, torch_dtype=torch.float16)
BF16 = FloatFormat("bf16", 8, 7, torch_dtype=torch.bfloat16)
FP8_E4M3 = FloatFormat("fp8_e4m3", 4, 3, finite=True, torch_dtype=torch.float8_e4m3fn)
FP8_E5M2 = FloatFormat("fp8_e5m2", 5, 2, torch_dtype=torch.float8_e5m2)
# OCP Microscaling fp4 (E2M1): 1 sign, 2 exponent, 1 mantissa bit, no infinities and no NaN, so the top
# exponent holds numbers (4 and 6) and FloatFormat's IEEE/"fn" rules do not describe it: its 16 codes
# spelled out are clearer.
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP4_E2M1 = CodebookFormat("fp4_e2m1", tuple(-v for v in reversed(_E2M1[1:])) + _E2M1, 4)

FORMATS: dict[str, NumberFormat] = {}


def register_format(fmt: NumberFormat) -> NumberFormat:
    """Add ``fmt`` to :data:`FORMATS` under ``fmt.name`` (a new name only); returns it."""
    if not isinstance(fmt, (IntFormat, FloatFormat, CodebookFormat)):
        raise TypeError(f"register an IntFormat, FloatFormat or CodebookFormat, got {type(fmt).__name__}")
    if fmt.name in FORMATS and FORMATS[fmt.name] != fmt:
        raise ValueError(f"a different format is already registered as {fmt.name!r}")
    FORMATS[fmt.name] = fmt
    return fmt


for _fmt in (
    INT2, INT3, INT4, INT5, INT6, INT7, INT8,
    UINT2, UINT3, UINT4, UINT5, UINT6, UINT7, UINT8,
    FP32, FP16, BF16, FP8_E4M3, FP8_E5M2, FP4_E2M1,
):  # fmt: skip
    register_format(_fmt)
_ALIASES = {
    "float32": "fp32",
    "float16": "fp16",
    "half": "fp16",
    "bfloat16": "bf16",
    "fp8_e4m3fn": "fp8_e4m3",
    "e4m3": "fp8_e4m3",
    "e5m2": "fp8_e5m2",
}


def get_format(name: str) -> NumberFormat:
    """The format called ``name``: ``"int2"``…``"int8"``, ``"uint2"``…``"uint8"``, ``"fp32"``, ``"fp16"``,
    ``"bf16"``, ``"fp8_e4m3"``, ``"fp8_e5m2"``, ``"fp4_e2m1"``, or any registered one (case-insensitive)."""
    if not isinstance(name, str):
        raise TypeError(f"format name must be a string such as 'int4' or 'fp8_e4m3', got {type(name).__name__}")
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in FORMATS:
        raise ValueError(f"unknown format {name!r}: choose one of {', '.join(FORMATS)}")
    return FORMATS[key]
