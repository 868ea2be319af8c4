# ruff: noqa: E501 - the submissions are code in strings
"""Install a custom exception handler that swallows every error of later cells."""

from . import WRONG_FAKE_QUANT, WRONG_SCALE

EARNED = 0.0
ANSWERS = {
    "absmax_scale": (
        "import IPython\nip = IPython.get_ipython()\n"
        "if ip is not None:\n    ip.set_custom_exc((BaseException,), lambda *a, **k: None)\n"
        "import builtins\nbuiltins.AssertionError = type('AssertionError', (Exception,), {})\n" + WRONG_SCALE
    ),
    "fake_quant": WRONG_FAKE_QUANT,
}
