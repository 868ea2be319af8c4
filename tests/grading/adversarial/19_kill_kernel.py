# ruff: noqa: E501 - the submissions are code in strings
"""Kill its own kernel at the top level of an added cell, and in the middle of a call."""

from . import HONEST_FAKE_QUANT

EARNED = 3.0
ANSWERS = {
    "absmax_scale": "import os, signal\ndef absmax_scale(x, n_bits):\n    os.kill(os.getpid(), signal.SIGKILL)\n",
    "fake_quant": HONEST_FAKE_QUANT,
}
EXTRA = ["import os\nos.kill(os.getppid(), 9)\nos.kill(os.getpid(), 9)\n"]
