# ruff: noqa: E501 - the submissions are code in strings
"""Hang: an endless loop at the top level of an added cell (ignoring SIGALRM) and inside a function."""

from . import HONEST_SCALE

EARNED = 2.0
ANSWERS = {
    "absmax_scale": HONEST_SCALE,
    "fake_quant": "def fake_quant(x, n_bits):\n    while True:\n        pass\n",
}
EXTRA = ["import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True:\n    pass\n"]
