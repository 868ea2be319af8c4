# ruff: noqa: E501 - the submissions are code in strings
"""Honest: correct answers that write to stderr (warnings, prints) at the top level and in calls."""

EARNED = 5.0
ANSWERS = {
    "absmax_scale": "import sys, warnings\nprint('working on it', file=sys.stderr)\nwarnings.warn('careful')\n"
    "def absmax_scale(x, n_bits):\n    print('absmax_scale called', file=sys.stderr)\n"
    "    return x.abs().max() / (2 ** (n_bits - 1) - 1)\n",
    "fake_quant": "def fake_quant(x, n_bits):\n    import sys\n    sys.stderr.write('fake_quant called\\n')\n"
    "    qmax = 2 ** (n_bits - 1) - 1\n    scale = x.abs().max() / qmax\n"
    "    return (x / scale).round().clamp(-qmax, qmax) * scale\n",
}
