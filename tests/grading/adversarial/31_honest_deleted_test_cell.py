# ruff: noqa: E501 - the submissions are code in strings
"""Honest: correct answers, but the student deleted both visible test cells (and the setup cell)."""

from . import HONEST_FAKE_QUANT, HONEST_SCALE

EARNED = 5.0
ANSWERS = {"absmax_scale": HONEST_SCALE, "fake_quant": HONEST_FAKE_QUANT}


def edit(nb):
    nb.cells = [c for c in nb.cells if c.metadata.get("nbgrader", {}).get("locked") is not True]
