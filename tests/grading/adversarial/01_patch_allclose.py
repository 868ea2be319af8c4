# ruff: noqa: E501 - the submissions are code in strings
"""Make every comparison pass: patch torch.allclose/isclose/equal and math.isclose, return garbage."""

from . import WRONG_FAKE_QUANT, WRONG_SCALE

EARNED = 0.0
ANSWERS = {
    "absmax_scale": "import math, torch\ntorch.allclose = torch.isclose = torch.equal = lambda *a, **k: True\n"
    "torch.Tensor.__eq__ = lambda *a: True\nmath.isclose = lambda *a, **k: True\n" + WRONG_SCALE,
    "fake_quant": WRONG_FAKE_QUANT,
}
