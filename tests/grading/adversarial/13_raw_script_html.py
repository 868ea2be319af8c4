# ruff: noqa: E501 - the submissions are code in strings
"""Put raw <script> HTML into its own feedback page: printed, displayed and in an exception message."""

from . import HONEST_SCALE

EARNED = 2.0
ANSWERS = {
    "absmax_scale": HONEST_SCALE
    + "print('<script>alert(\"xss-{MARK}\")</script>')\n"
    + "try:\n    from IPython.display import HTML, display\n    display(HTML('<script>alert(\"xss-{MARK}\")</script>'))\n"
    + "except Exception:\n    pass\n",
    "fake_quant": "def fake_quant(x, n_bits):\n    raise ValueError('<script>alert(\"xss-{MARK}\")</script>')\n",
}
