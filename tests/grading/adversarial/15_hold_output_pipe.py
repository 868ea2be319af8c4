# ruff: noqa: E501 - the submissions are code in strings
"""Fork a child that holds every pipe open and sleeps, so that a grader waiting for EOF never ends."""

from . import HONEST_FAKE_QUANT, HONEST_SCALE

EARNED = 5.0
ANSWERS = {"absmax_scale": HONEST_SCALE, "fake_quant": HONEST_FAKE_QUANT}
EXTRA = [
    "import os, signal, time\n"
    "if os.fork() == 0:\n    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n    signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
    "    while True:\n        time.sleep(1)\n"
]
