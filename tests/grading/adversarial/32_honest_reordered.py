# ruff: noqa: E501 - the submissions are code in strings
"""Honest: correct answers in cells the student reordered (answers swapped, tests moved to the top)."""

from . import HONEST_FAKE_QUANT, HONEST_SCALE

EARNED = 5.0
ANSWERS = {"absmax_scale": HONEST_SCALE, "fake_quant": HONEST_FAKE_QUANT}


def edit(nb):
    tests = [c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade")]
    rest = [c for c in nb.cells if not c.metadata.get("nbgrader", {}).get("grade")]
    answers = [c for c in rest if c.metadata.get("nbgrader", {}).get("solution")]
    others = [c for c in rest if not c.metadata.get("nbgrader", {}).get("solution")]
    nb.cells = tests + others[:2] + list(reversed(answers)) + others[2:]
