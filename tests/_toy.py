"""The toy course of tests/fixtures/toy_course and the submissions the grading tests hand in.

The toy assignment ``f01_toy`` has two graded functions: ``absmax_scale`` (2 points) and ``fake_quant``
(3 points), each with a visible test and hidden tests that forbid the library function it mirrors.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nbformat

from quantcourse.grading.config import Course, write_config

FIXTURE = Path(__file__).parent / "fixtures" / "toy_course"
ASSIGNMENT = "f01_toy"
NOTEBOOK = f"{ASSIGNMENT}.ipynb"
MAX_SCORE = 5.0
HIDDEN_SENTINEL = "HIDDEN-FIXTURE-SENTINEL"

HONEST_SCALE = "def absmax_scale(x, n_bits):\n    return x.abs().max() / (2 ** (n_bits - 1) - 1)\n"
HONEST_FAKE_QUANT = (
    "def fake_quant(x, n_bits):\n    qmax = 2 ** (n_bits - 1) - 1\n    scale = x.abs().max() / qmax\n"
    "    return (x / scale).round().clamp(-qmax, qmax) * scale\n"
)
SHORTCUT_FAKE_QUANT = (
    "def fake_quant(x, n_bits):\n    return qc.fake_quantize(x, n_bits, symmetric=True, granularity=qc.PerTensor())\n"
)
LOOPING_SCALE = "def absmax_scale(x, n_bits):\n    while True:\n        pass\n"
CRASHING_SCALE = "def absmax_scale(x, n_bits):\n    import os\n    os._exit(1)\n"


def make_course(root: Path, *, cell_timeout: int = 60) -> Course:
    """A copy of the toy course under ``root`` with its nbgrader_config.py."""
    shutil.copytree(FIXTURE / "solutions", root / "solutions")
    course = Course.at(root, cell_timeout=cell_timeout)
    write_config(course)
    return course


def answered(release_nb: Path, answers: dict[str, str]) -> nbformat.NotebookNode:
    """The released notebook with the solution cells named in ``answers`` (grade_id -> code) filled in."""
    nb = nbformat.read(release_nb, as_version=4)
    for cell in nb.cells:
        grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
        if grade_id in answers:
            cell.source = answers[grade_id]
    return nb


def write_submissions(folder: Path, release_nb: Path) -> dict[str, str]:
    """Hand in one submission per case; returns student -> what the submission does."""
    cases = {
        "alice": ({"absmax_scale": HONEST_SCALE, "fake_quant": HONEST_FAKE_QUANT}, "correct"),
        "bob": ({}, "the unsolved release"),
        "carol": ({"absmax_scale": HONEST_SCALE, "fake_quant": SHORTCUT_FAKE_QUANT}, "calls qc.fake_quantize"),
        "frank": ({"absmax_scale": LOOPING_SCALE, "fake_quant": HONEST_FAKE_QUANT}, "loops forever"),
        "grace": ({"absmax_scale": CRASHING_SCALE, "fake_quant": HONEST_FAKE_QUANT}, "kills its kernel"),
    }
    for student, (answers, _) in cases.items():
        target = folder / student / ASSIGNMENT
        target.mkdir(parents=True)
        nbformat.write(answered(release_nb, answers), target / NOTEBOOK)
    dave = folder / "dave" / ASSIGNMENT
    dave.mkdir(parents=True)
    (dave / NOTEBOOK).write_text(release_nb.read_text()[:500])  # truncated JSON
    erin = folder / "erin" / ASSIGNMENT
    erin.mkdir(parents=True)
    nbformat.write(answered(release_nb, {}), erin / "my_work.ipynb")  # wrong name: the notebook is missing
    return {**{s: why for s, (_, why) in cases.items()}, "dave": "malformed JSON", "erin": "missing notebook"}
