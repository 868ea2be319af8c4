# ruff: noqa: E501 - the submissions are code in strings
"""Patch the library's reference functions so that 'expected' equals the submission's garbage."""

from . import WRONG_FAKE_QUANT, WRONG_SCALE

EARNED = 0.0
ANSWERS = {
    "absmax_scale": (
        "import quantcourse as qc, quantcourse.primitives as p\n"
        "class _Q:\n    scale = torch.tensor(0.5)\n    zero_point = torch.tensor(0)\n"
        "qc.choose_qparams = p.choose_qparams = lambda *a, **k: _Q()\n"
        "qc.fake_quantize = p.fake_quantize = lambda x, *a, **k: x * 0\n" + WRONG_SCALE
    ),
    "fake_quant": WRONG_FAKE_QUANT,
}
