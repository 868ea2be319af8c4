# ruff: noqa: E501 - the submissions are code in strings
"""Exhaust memory: grow a list of buffers at the top level and allocate a huge tensor in a function."""

from . import HONEST_SCALE

EARNED = 2.0
ANSWERS = {
    "absmax_scale": HONEST_SCALE,
    "fake_quant": "def fake_quant(x, n_bits):\n    return torch.empty(2**40)\n",
}
EXTRA = ["_hog = []\nwhile True:\n    _hog.append(bytearray(2**28))\n"]
