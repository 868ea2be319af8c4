# ruff: noqa: E501 - the submissions are code in strings
"""Keep failures from being recorded: silence IPython's error display and sys.excepthook."""

from . import WRONG_FAKE_QUANT, WRONG_SCALE

EARNED = 0.0
ANSWERS = {
    "absmax_scale": (
        "import sys\nsys.excepthook = lambda *a: None\n"
        "try:\n    ip = get_ipython()\n    ip.showtraceback = lambda *a, **k: None\n"
        "    ip._showtraceback = lambda *a, **k: None\nexcept NameError:\n    pass\n" + WRONG_SCALE
    ),
    "fake_quant": WRONG_FAKE_QUANT,
}
