"""Float32 arithmetic exactly as llama.cpp's C reference quantizers do it.

Chapter 11 (GGUF) teaches why these matter. Byte-identical output needs more than the right
formula: the C code works in float32 (never double), rounds with ``nearest_int`` (half to
even, via a magic-number trick), accumulates sums one element after the other, converts
floats to small integers by truncation, and stores scales as IEEE half floats. Each helper
here reproduces one of those behaviours on whole tensors at once.

Layout convention for the scale searches: a tensor ``[n, B]`` holds ``B`` (sub-)blocks of
``n`` elements each, position-major, so that ``t[i]`` (element ``i`` of every block) is
contiguous and a sequential sum over ``i`` is ``n`` fast vector additions.
"""

from __future__ import annotations

import torch

__all__ = [
    "nearest_int",
    "nearest_int_",
    "seq_sum",
    "div",
    "recip",
    "sqrtf",
    "trunc_to_byte",
    "round_away",
    "fp16_bits",
    "fp16_round",
    "first_absmax",
    "positive_max",
    "select_int",
]

_MAGIC = 12582912.0  # 1.5 * 2**23: adding it leaves the rounded integer in the low mantissa bits
_INT_MIN = -(2**31)


def nearest_int(f: torch.Tensor) -> torch.Tensor:
    """``nearest_int`` of ggml-quants.c: float32 ``[...]`` -> int32, round half to even.

    Adds 1.5·2²³ in float32 and reads the mantissa bits, exactly as the C code does, so
    that out-of-range values give the same (meaningless) integers as the C code.
    """
    bits = (f + _MAGIC).view(torch.int32)
    return (bits & 0x7FFFFF) - 0x400000


def nearest_int_(f: torch.Tensor) -> torch.Tensor:
    """:func:`nearest_int` in place: overwrites the float32 temporary ``f`` and returns its memory as int32.

    The same bits without three fresh whole-size tensors: on a chunk of codes, fresh memory (page
    faults) costs more than the arithmetic.
    """
    return f.add_(_MAGIC).view(torch.int32).bitwise_and_(0x7FFFFF).sub_(0x400000)


def seq_sum(t: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
    """``float s = start; for i: s += t[i]`` in float32, for every block at once.

    Args:
        t: float32 ``[n, ...]`` (position-major: ``t[i]`` holds element ``i`` of every block).
        start: float32 ``t[0]``-shaped initial value; ``0`` when None.
    Returns:
        float32 ``t[0]``-shaped, rounded after every addition like the C loop (a pairwise
        ``torch.sum`` rounds differently, and ``torch.cumsum`` accumulates in double on CPU).
    """
    acc = torch.zeros_like(t[0]) if start is None else start.clone()
    # index_add_ along dim 0 adds the slices t[0], t[1], ... to the same row one after the
    # other, each a vectorized float32 add: the C loop's order, in one call instead of n.
    order = torch.zeros(t.shape[0], dtype=torch.long, device=t.device)
    return acc.unsqueeze(0).index_add_(0, order, t).squeeze(0)


def div(a: torch.Tensor | float, b: torch.Tensor | float) -> torch.Tensor:
    """Correctly rounded float32 ``a / b`` (a Python number on the left would become
    ``b.reciprocal() * a`` in PyTorch, which rounds twice)."""
    like = a if isinstance(a, torch.Tensor) else b
    device = like.device if isinstance(like, torch.Tensor) else None  # a number joins the tensor's device
    a_t = a if isinstance(a, torch.Tensor) else torch.tensor(a, dtype=torch.float32, device=device)
    b_t = b if isinstance(b, torch.Tensor) else torch.tensor(b, dtype=torch.float32, device=device)
    return torch.div(a_t, b_t)


def recip(t: torch.Tensor) -> torch.Tensor:
    """``1.0f / t`` with one rounding."""
    return torch.div(torch.ones_like(t), t)


def sqrtf(t: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 square root, like C's ``sqrtf``.

    ``torch.sqrt`` on float32 CPU tensors is not always correctly rounded (about 15% of
    random inputs differ by one ulp with torch 2.13); the square root of a float32 computed
    in float64 and rounded once to float32 is.
    """
    return torch.sqrt(t.to(torch.float64)).to(torch.float32)


def trunc_to_byte(v: torch.Tensor) -> torch.Tensor:
    """C's ``(int8_t)v`` / ``(uint8_t)v`` for float32 ``v`` as x86-64 GCC compiles it.

    The float is truncated to int32 (``cvttss2si``: NaN and out-of-range give INT_MIN), and
    the low byte is kept. Returns int32 in 0..255 (the byte's bit pattern).
    """
    if v.numel() and _within_int32(v):
        # The usual case, in two passes: every value converts, and float -> int32 truncates like C.
        return v.to(torch.int32) & 0xFF
    t = v.trunc()
    ok = t.abs() < 2.0**31  # False for NaN and +-inf too
    as_int = torch.where(ok, t, torch.zeros_like(t)).to(torch.int32)
    return torch.where(ok, as_int, torch.full_like(as_int, _INT_MIN)) & 0xFF


def _within_int32(v: torch.Tensor) -> bool:
    """All of float32 ``v`` finite and inside int32's range (one pass; a NaN makes both ends NaN)."""
    lo, hi = torch.aminmax(v)
    return bool(lo >= -(2.0**31)) and bool(hi < 2.0**31)


def round_away(v: torch.Tensor) -> torch.Tensor:
    """C ``roundf``: round half away from zero (float32 in, float32 out).

    gguf-py's ``np_roundf``: with ``a = |v|`` and ``f = floor(a)``, the fraction ``a − f`` and its double
    are exact in float32, so ``f + floor(2·(a − f))`` steps up exactly when the fraction reaches 0.5; the
    sign goes back on last. (``v + 0.5`` would not do: 0.49999997 + 0.5 rounds to 1 in float32. And
    floor, not trunc: this torch build's CPU ``trunc`` is not vectorized and runs 30 times slower.)
    For ±inf the fraction is NaN, which ``nan_to_num_`` turns into a zero step.
    """
    a = v.abs()
    f = a.floor()
    return torch.copysign(a.sub_(f).mul_(2).floor_().nan_to_num_(0.0, 0.0, 0.0).add_(f), v)


def fp16_bits(f: torch.Tensor) -> torch.Tensor:
    """float32 ``[...]`` -> its IEEE half (round to nearest even) as 2 little-endian bytes ``[..., 2]`` uint8."""
    return f.to(torch.float16).contiguous().view(torch.uint8).reshape(*f.shape, 2)


def fp16_round(f: torch.Tensor) -> torch.Tensor:
    """``GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(f))``: the value a stored half gives back."""
    return f.to(torch.float16).to(torch.float32)


def first_absmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The signed element of largest magnitude along ``dim``, the first one on ties.

    ``if (amax < fabsf(v)) { amax = fabsf(v); max = v; }`` of the C code (starting from 0,
    so an all-zero block gives +0).

    It is the larger in magnitude of the minimum and the maximum (``argmax`` is 5x slower on CPU). Only where the
    two tie in magnitude (``max == −min``, all-zero blocks included) does the order decide, and only a
    NaN makes both NaN: those few blocks are redone with ``argmax`` (first occurrence; a NaN never wins).
    """
    if x.ndim == 1:
        return first_absmax(x.unsqueeze(1), 0).squeeze(0)
    lo, hi = x.amin(dim=dim), x.amax(dim=dim)  # two passes, yet 4x faster than aminmax(dim=) on CPU
    top = torch.where(-lo > hi, lo, hi)
    redo = ((hi == -lo) | torch.isnan(top)).nonzero(as_tuple=True)
    if len(redo[0]):
        xs = x.movedim(dim, -1)[redo]  # [k, n]
        a = xs.abs()
        a = torch.where(torch.isnan(a), torch.full_like(a, -1.0), a)
        top[redo] = xs.gather(-1, a.argmax(dim=-1, keepdim=True)).squeeze(-1)
    return torch.where(top.abs() > 0, top, torch.zeros_like(top))


def positive_max(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``m = 0; if (v > m) m = v;`` along ``dim``: the largest positive value, or 0 (NaN never wins)."""
    return torch.where(x > 0, x, torch.zeros_like(x)).amax(dim=dim)


def select_int(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.where(mask, a, b)`` for int32 tensors, as ``b + (a − b)·mask`` (exact for integers).

    On a whole chunk of codes this torch build's CPU ``where`` runs about 30 times slower than an
    integer multiply; ``mask`` (bool, broadcast against ``a`` and ``b``) is converted once, which is fast
    for bool -> int32 (unlike bool -> float32).
    """
    return (a - b).mul_(mask.to(torch.int32)).add_(b)
