"""Autograde a folder of submissions, make feedback and a grades CSV; one bad submission stops nothing.

Submissions are laid out ``<submissions>/<student>/<assignment>/<notebook>.ipynb`` (what nbgrader's
exchange collects). Each (student, assignment) is checked first (notebook present, valid JSON), then
copied into nbgrader's ``submitted`` folder and autograded in its own nbgrader process with a wall-clock
limit, so a malformed file, a missing notebook, a crashing kernel or an endless loop is reported with
its reason in the ``status`` column and the others are graded as usual.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import os
import re
import shutil
from pathlib import Path

import nbformat

from ..progress import progress_bar
from .config import Course
from .runner import run_nbgrader

__all__ = ["Grade", "prepare", "autograde", "write_grades_csv", "grading_device", "CSV_FIELDS"]

CSV_FIELDS = ("student", "assignment", "score", "max_score", "status", "device")
_ERROR_NAMES = {
    "CellTimeoutError": "a cell ran past the time limit and was interrupted",
    "DeadKernelError": "the kernel died",
}


@dataclasses.dataclass(frozen=True)
class Grade:
    """One row of the grades CSV. ``status`` is ``"ok"`` or says what went wrong."""

    student: str
    assignment: str
    score: float
    max_score: float
    status: str

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def prepare(course: Course, assignments: list[str], *, timeout: float = 600) -> dict[str, str]:
    """Store each assignment (cells, points, hidden tests) in the gradebook; returns failures by name.

    Runs ``generate_assignment`` into ``<work>/release`` so that ``course/`` is left untouched.
    """
    staging = course.with_(release=course.work / "release")
    failures = {}
    for name in assignments:
        run = run_nbgrader(staging, "generate_assignment", name, "--force", timeout=timeout)
        if not run.ok:
            failures[name] = run.reason()
    return failures


def _check_submission(folder: Path, expected: list[str]) -> str | None:
    """Why ``folder`` cannot be graded (missing or malformed notebook), or ``None``."""
    if not folder.is_dir():
        return "missing: no submission"
    missing = [name for name in expected if not (folder / name).is_file()]
    if missing:
        found = ", ".join(sorted(p.name for p in folder.glob("*.ipynb"))) or "no notebooks"
        return f"missing: {', '.join(missing)} not submitted (found: {found})"
    for name in expected:
        try:
            nbformat.read(folder / name, as_version=4)
        except Exception as err:  # noqa: BLE001 - any unreadable notebook is reported, never raised
            return f"malformed: {name} is not a readable notebook ({type(err).__name__}: {str(err)[:120]})"
    return None


def _execution_problems(folder: Path) -> list[str]:
    """Timeouts and kernel deaths recorded in the autograded notebooks of one submission."""
    problems = []
    for path in sorted(folder.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            for output in cell.get("outputs", []):
                what = _ERROR_NAMES.get(output.get("ename", "")) if output.get("output_type") == "error" else None
                if what and what not in problems:
                    problems.append(what)
    return problems


def _score(course: Course, assignment: str, student: str | None) -> tuple[float, float]:
    from nbgrader.api import Gradebook, MissingEntry

    with Gradebook(course.db_url, "quantcourse") as gb:
        max_score = float(gb.find_assignment(assignment).max_score)
        if student is None:
            return 0.0, max_score
        try:
            return float(gb.find_submission(assignment, student).score), max_score
        except MissingEntry:
            return 0.0, max_score


def _stage(course: Course, submissions: Path, student: str, assignment: str) -> str | None:
    """Copy one submission into nbgrader's ``submitted`` folder; returns why it cannot be graded, or None."""
    problem = _check_submission(submissions / student / assignment, course.notebooks(assignment))
    for step in ("submitted", "autograded", "feedback"):
        shutil.rmtree(course.step_dir(step) / student / assignment, ignore_errors=True)
    if problem is None:
        shutil.copytree(submissions / student / assignment, course.step_dir("submitted") / student / assignment)
    return problem


def _result(course: Course, student: str, assignment: str, run, timeout: float) -> Grade:
    """The grade of one staged submission after the nbgrader ``run`` that autograded it."""
    max_score = _score(course, assignment, None)[1]
    if run.timed_out:
        return Grade(student, assignment, 0.0, max_score, f"timeout: grading ran past {timeout:g} s")
    if not run.ok:
        return Grade(student, assignment, 0.0, max_score, f"error: {run.reason()}")
    score, max_score = _score(course, assignment, student)
    problems = _execution_problems(course.step_dir("autograded") / student / assignment)
    return Grade(student, assignment, score, max_score, "ok" if not problems else "graded, but " + "; ".join(problems))


def _grade_one(course: Course, submissions: Path, student: str, assignment: str, timeout: float) -> Grade:
    """Autograde one student's submission of one assignment in its own nbgrader process."""
    problem = _stage(course, submissions, student, assignment)
    if problem:
        return Grade(student, assignment, 0.0, _score(course, assignment, None)[1], problem)
    run = run_nbgrader(course, "autograde", assignment, "--student", student, "--force", timeout=timeout)
    return _result(course, student, assignment, run, timeout)


def _grade_batch(
    course: Course, submissions: Path, students: list[str], assignment: str, timeout: float
) -> list[Grade]:
    """Autograde all students of one assignment in one nbgrader process (trusted submissions only).

    Falls back to one process per student when the shared run fails.
    """
    problems = {s: _stage(course, submissions, s, assignment) for s in students}
    run = run_nbgrader(course, "autograde", assignment, "--force", timeout=timeout * max(len(students), 1))
    if not run.ok:
        return [_grade_one(course, submissions, s, assignment, timeout) for s in students]
    max_score = _score(course, assignment, None)[1]
    return [
        Grade(s, assignment, 0.0, max_score, problems[s])
        if problems[s]
        else _result(course, s, assignment, run, timeout)
        for s in students
    ]


_MATHJAX_CDN = re.compile(r'<script src="https://cdnjs\.cloudflare\.com/ajax/libs/mathjax/[^"]*">\s*</script>')
_MATHJAX_CONFIG = (
    "<script>window.MathJax = {tex: {inlineMath: [['$', '$'], ['\\\\(', '\\\\)']], processEscapes: true}};</script>"
)


def _local_mathjax() -> Path | None:
    """MathJax 3 as shipped by sphinx-mathjax-offline (a book dependency), or ``None``."""
    spec = importlib.util.find_spec("sphinx-mathjax-offline")
    folder = Path(spec.submodule_search_locations[0]) / "static" / "mathjax" if spec else None
    return folder if folder and (folder / "tex-chtml.js").is_file() else None


def offline_math(feedback: Path) -> int:
    """Make the feedback pages under ``feedback`` typeset math without a network; returns pages changed.

    nbgrader's feedback template loads MathJax 2 from a CDN. This copies MathJax 3 (script and fonts)
    to ``feedback/_mathjax/`` and points every page at it, with ``$...$`` enabled for inline math.
    """
    source = _local_mathjax()
    if source is None:
        return 0
    target = feedback / "_mathjax"
    if not target.is_dir():
        shutil.copytree(source / "output" / "chtml" / "fonts", target / "output" / "chtml" / "fonts")
        shutil.copy2(source / "tex-chtml.js", target / "tex-chtml.js")
    changed = 0
    for page in feedback.rglob("*.html"):
        html = page.read_text()
        relative = Path(os.path.relpath(target / "tex-chtml.js", page.parent)).as_posix()
        local = f'{_MATHJAX_CONFIG}<script id="MathJax-script" src="{relative}"></script>'
        new = _MATHJAX_CDN.sub(lambda _, local=local: local, html)
        if new != html:
            page.write_text(new)
            changed += 1
    return changed


def _feedback(course: Course, assignment: str, grades: list[Grade], out: Path, timeout: float) -> list[Grade]:
    """Generate feedback for ``assignment`` and copy each graded student's to ``out/feedback``."""
    run = run_nbgrader(course, "generate_feedback", assignment, "--force", timeout=timeout)
    result = []
    for grade in grades:
        source = course.step_dir("feedback") / grade.student / assignment
        if grade.assignment != assignment or not grade.status.startswith(("ok", "graded")):
            result.append(grade)
        elif source.is_dir():
            shutil.rmtree(out / "feedback" / grade.student / assignment, ignore_errors=True)
            shutil.copytree(source, out / "feedback" / grade.student / assignment, dirs_exist_ok=True)
            result.append(grade)
        else:
            result.append(dataclasses.replace(grade, status=f"{grade.status}; no feedback: {run.reason()}"))
    return result


def autograde(
    course: Course,
    submissions: str | Path,
    *,
    out: str | Path,
    timeout: float = 900,
    progress: bool = True,
    generate: bool = True,
    feedback: bool = True,
    batch: bool = False,
) -> list[Grade]:
    """Autograde ``submissions`` (``<student>/<assignment>/*.ipynb``) for ``course``.

    Every student is graded for every assignment that appears in ``submissions`` (a student without it
    gets ``missing``). Feedback HTML goes to ``out/feedback/<student>/<assignment>/``, the grades to
    ``out/grades.csv`` (columns :data:`CSV_FIELDS`). The gradebook in ``course.work`` keeps the results
    for nbgrader's formgrader.

    Args:
        course: the course (its masters in ``course.source`` hold the hidden tests).
        submissions: the folder of submissions.
        out: where feedback and ``grades.csv`` are written.
        timeout: seconds one (student, assignment) may take before its grading is killed.
        progress: show a tqdm progress bar.
        generate: store the assignments in the gradebook first (see :func:`prepare`); ``False`` when the
            caller just did.
        feedback: generate feedback HTML.
        batch: grade all students of an assignment in one nbgrader process: faster, for trusted notebooks
            only (self-check); a kernel crash then costs a retry per student.

    Returns:
        One :class:`Grade` per (student, assignment), sorted by assignment then student.
    """
    submissions, out = Path(submissions).resolve(), Path(out).resolve()
    if not submissions.is_dir():
        raise ValueError(f"{submissions} is not a folder of <student>/<assignment>/*.ipynb submissions")
    students = sorted(d.name for d in submissions.iterdir() if d.is_dir() and not d.name.startswith("."))
    named = sorted({a.name for s in students for a in (submissions / s).iterdir() if a.is_dir()})
    known = set(course.assignments())
    grades = [
        Grade(s, a, 0.0, 0.0, f"error: no assignment {a!r} in {course.source}")
        for a in named
        if a not in known
        for s in students
        if (submissions / s / a).is_dir()
    ]
    assignments = [a for a in named if a in known]
    failed = prepare(course, assignments) if generate else {}
    grades += [
        Grade(s, a, 0.0, 0.0, f"error: could not prepare the assignment: {why}")
        for a, why in failed.items()
        for s in students
    ]
    graded = []
    if batch:
        for assignment in progress_bar(
            [a for a in assignments if a not in failed], desc="autograde", unit="assignment", disable=not progress
        ):
            graded += _grade_batch(course, submissions, students, assignment, timeout)
    else:
        jobs = [(s, a) for a in assignments if a not in failed for s in students]
        bar = progress_bar(jobs, desc="autograde", unit="submission", disable=not progress)
        for student, assignment in bar:
            bar.set_postfix_str(f"{student}/{assignment}")
            graded.append(_grade_one(course, submissions, student, assignment, timeout))
    for assignment in assignments if feedback else []:
        graded = _feedback(course, assignment, graded, out, timeout)
    if (out / "feedback").is_dir():
        offline_math(out / "feedback")
    grades = sorted(grades + graded, key=lambda g: (g.assignment, g.student))
    write_grades_csv(grades, out / "grades.csv")
    return grades


def grading_device() -> str:
    """Where the hidden tests run: the CUDA GPU (``quantcourse.grading.hidden.DEVICE``), or the CPU."""
    import torch

    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(0)}; {torch.cuda.device_count()} visible)"
    return "cpu (no CUDA GPU; Triton kernels through the interpreter)"


def write_grades_csv(grades: list[Grade], path: str | Path, *, device: str | None = None) -> Path:
    """Write ``grades`` as CSV with the header :data:`CSV_FIELDS`; ``device`` defaults to :func:`grading_device`."""
    device = grading_device() if device is None else device
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_FIELDS)
        for g in grades:
            writer.writerow([g.student, g.assignment, f"{g.score:g}", f"{g.max_score:g}", g.status, device])
    return path
