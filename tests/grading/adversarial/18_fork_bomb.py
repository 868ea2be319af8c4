# ruff: noqa: E501 - the submissions are code in strings
"""Fork-bomb the machine from an added cell."""

from . import HONEST_FAKE_QUANT, HONEST_SCALE

EARNED = 5.0
ANSWERS = {"absmax_scale": HONEST_SCALE, "fake_quant": HONEST_FAKE_QUANT}
EXTRA = ["import os\nwhile True:\n    os.fork()\n"]
