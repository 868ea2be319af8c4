# ruff: noqa: E501 - the submissions are code in strings
"""Reach the reference through functools.partial and a bound alias captured at import time."""

from . import HONEST_SCALE

EARNED = 2.0
ANSWERS = {
    "absmax_scale": HONEST_SCALE,
    "fake_quant": (
        "import functools\nfrom quantcourse.primitives import fake_quantize as _fq\n"
        "_shortcut = functools.partial(_fq, symmetric=True, granularity=qc.PerTensor())\n"
        "def fake_quant(x, n_bits):\n    return _shortcut(x, n_bits)\n"
    ),
}
