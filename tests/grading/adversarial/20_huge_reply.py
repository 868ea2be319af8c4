# ruff: noqa: E501 - the submissions are code in strings
"""Answer with values the grader must not trust: a tensor claiming a huge shape, a deep nest, a big string."""

from . import HONEST_SCALE

EARNED = 2.0
ANSWERS = {
    "absmax_scale": HONEST_SCALE,
    "fake_quant": (
        "def fake_quant(x, n_bits):\n    v = []\n    for _ in range(10000):\n        v = [v]\n    return v\n"
    ),
}
