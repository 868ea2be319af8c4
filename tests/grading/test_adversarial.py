"""The adversarial set: every hostile submission scores what it earned, every honest one full marks.

All cases of ``adversarial/`` are handed in together and graded once through ``quantcourse autograde``
(sandboxed, two workers) on a copy of the toy course; each test then checks one promise of the trusted
path: the score, no secret in the feedback, no file of the course changed, nothing left running.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from pathlib import Path

import _toy
import nbformat
import pytest
from adversarial import load_cases

from quantcourse.grading import hidden
from quantcourse.grading.autograde import autograde
from quantcourse.grading.release import release
from quantcourse.grading.sandbox import Limits, sandbox_problem

CASES = load_cases()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.xdist_group("adversarial"),
    pytest.mark.skipif(sandbox_problem() is not None, reason=f"no sandbox here: {sandbox_problem()}"),
]


def _hash_tree(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts and ".nbgrader" not in p.parts
    }


def _build(case, release_nb: Path, paths: dict[str, str]) -> nbformat.NotebookNode:
    def fill(text: str) -> str:
        for name, value in paths.items():
            text = text.replace("{" + name + "}", value)
        return text

    nb = _toy.answered(release_nb, {k: fill(v) for k, v in case.ANSWERS.items()})
    for source in getattr(case, "EXTRA", []):
        nb.cells.append(nbformat.v4.new_code_cell(fill(source)))
    if hasattr(case, "edit"):
        case.edit(nb)
    return nb


def _processes_with(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            continue
    return found


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    root = tmp_path_factory.mktemp("adversarial")
    course = _toy.make_course(root / "course_root", cell_timeout=20)
    release(course)
    released = course.release / _toy.ASSIGNMENT / _toy.NOTEBOOK
    marker = f"qc-adversarial-{uuid.uuid4().hex[:8]}"
    paths = {
        "ROOT": str(course.root),
        "SOLUTIONS": str(course.source),
        "WORK": str(course.work),
        "HIDDEN_PY": hidden.__file__,
        "CONFIG": str(course.root / "nbgrader_config.py"),
        "MARK": marker,
    }
    for name, case in CASES.items():
        folder = root / "submissions" / name / _toy.ASSIGNMENT
        folder.mkdir(parents=True)
        nbformat.write(_build(case, released, paths), folder / _toy.NOTEBOOK)
    # a later honest student, graded after all the others: nothing they did may reach this grade
    folder = root / "submissions" / "zz_later_honest" / _toy.ASSIGNMENT
    folder.mkdir(parents=True)
    nbformat.write(
        _toy.answered(released, {"absmax_scale": _toy.HONEST_SCALE, "fake_quant": _toy.HONEST_FAKE_QUANT}),
        folder / _toy.NOTEBOOK,
    )
    hidden_before = hashlib.sha256(Path(hidden.__file__).read_bytes()).hexdigest()
    before = _hash_tree(course.root)
    started = time.monotonic()
    limits = Limits(call_timeout=20, memory_bytes=4 * 2**30, cpu_seconds=300, processes=32)
    grades = autograde(
        course, root / "submissions", out=root / "out", timeout=300, progress=False, workers=2, limits=limits
    )
    return {
        "course": course,
        "out": root / "out",
        "grades": {g.student: g for g in grades},
        "seconds": time.monotonic() - started,
        "before": before,
        "after": _hash_tree(course.root),
        "hidden": (hidden_before, hashlib.sha256(Path(hidden.__file__).read_bytes()).hexdigest()),
        "marker": marker,
    }


@pytest.mark.parametrize("name", sorted(CASES))
def test_scores_what_it_earned(graded, name):
    grade = graded["grades"][name]
    assert grade.status.startswith(("ok", "graded")), f"{name}: {CASES[name].__doc__} -> {grade.status}"
    assert grade.score == CASES[name].EARNED, f"{name}: {CASES[name].__doc__} -> {grade.score}/5 ({grade.status})"


def test_a_later_honest_student_is_untouched(graded):
    later = graded["grades"]["zz_later_honest"]
    assert (later.score, later.status) == (5.0, "ok")


def test_every_submission_has_exactly_one_row(graded):
    import csv

    rows = list(csv.DictReader((graded["out"] / "grades.csv").open()))
    assert sorted(r["student"] for r in rows) == sorted([*CASES, "zz_later_honest"])


def test_the_course_files_and_the_installed_library_are_unchanged(graded):
    before, after = graded["before"], graded["after"]
    changed = {k for k in before.keys() & after.keys() if before[k] != after[k]}
    assert changed == set(), f"files of the course changed: {changed}"
    added = set(after) - set(before)
    assert not any(graded["marker"] in name for name in added)
    assert graded["hidden"][0] == graded["hidden"][1], "the installed hidden.py changed"


def test_nothing_is_left_running(graded):
    time.sleep(1)
    assert _processes_with(graded["marker"]) == []


def test_the_gradebook_holds_the_trusted_scores(graded):
    from nbgrader.api import Gradebook

    with Gradebook(graded["course"].db_url, "quantcourse") as gb:
        for name, grade in graded["grades"].items():
            submission = gb.find_submission(_toy.ASSIGNMENT, name)
            assert submission.score == grade.score
            assert all((g.manual_score is None) for nb in submission.notebooks for g in nb.grades), name


def test_feedback_holds_no_secret_and_no_raw_script(graded):
    pages = sorted((graded["out"] / "feedback").glob(f"*/{_toy.ASSIGNMENT}/*.html"))
    assert len(pages) == len(CASES) + 1
    for page in pages:
        html = page.read_text()
        for secret in (_toy.HIDDEN_SENTINEL, "BEGIN HIDDEN TESTS", "BEGIN SOLUTION", "random_inputs"):
            assert secret not in html, f"{page.parts[-3]}: {secret!r} in its feedback"
        assert "<script>alert" not in html, f"{page.parts[-3]}: raw script in its feedback"
    xss = (graded["out"] / "feedback" / "13_raw_script_html" / _toy.ASSIGNMENT / "f01_toy.html").read_text()
    assert "&lt;script&gt;alert" in xss  # shown, escaped


def test_a_hanging_or_pipe_holding_submission_does_not_stall_grading(graded):
    # the hang costs its time limits (a cell and a call, 20 s each, plus restarts), not the run's
    assert graded["seconds"] < 900
