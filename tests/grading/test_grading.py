"""The grading pipeline on the toy course: release, autograde (one case per kind of submission), feedback, CSV."""

from __future__ import annotations

import csv
from pathlib import Path

import _toy
import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_output

from quantcourse.grading.autograde import CSV_FIELDS, Grade, _check_submission, autograde, write_grades_csv
from quantcourse.grading.config import Course, write_config
from quantcourse.grading.preprocessors import HIDDEN_NOTE, HideHiddenTests, ShortenHiddenTracebacks
from quantcourse.grading.release import release, scan_for_markers
from quantcourse.grading.runner import NbgraderRun

# ---------------------------------------------------------------------------------------------- fast units


def test_course_layout_and_assignments(tmp_path):
    course = _toy.make_course(tmp_path)
    assert course.source == tmp_path.resolve() / "solutions"
    assert course.release == tmp_path.resolve() / "course"
    assert course.db_url == f"sqlite:///{tmp_path.resolve() / '.nbgrader' / 'gradebook.db'}"
    assert course.assignments() == [_toy.ASSIGNMENT]
    assert course.notebooks(_toy.ASSIGNMENT) == [_toy.NOTEBOOK]
    assert "nbgrader_config.py" in {p.name for p in tmp_path.iterdir()}


def test_unknown_assignment_names_the_known_ones(tmp_path):
    course = _toy.make_course(tmp_path)
    with pytest.raises(ValueError, match=r"no assignment 'a99_nothing'.*f01_toy"):
        course.notebooks("a99_nothing")


def test_configure_creates_work_dir_and_feedback_preprocessors(tmp_path):
    from traitlets.config import Config

    from quantcourse.grading.config import configure

    c = Config()
    course = Course.at(tmp_path)
    configure(c, course)
    assert (tmp_path / ".nbgrader" / "exchange").is_dir()
    assert c.CourseDirectory.source_directory == str(tmp_path.resolve() / "solutions")
    pre = c.GenerateFeedback.preprocessors
    assert pre.index("quantcourse.grading.preprocessors.ShortenHiddenTracebacks") < pre.index(
        "quantcourse.grading.preprocessors.HideHiddenTests"
    )


def test_repository_config_points_at_solutions_and_course():
    from traitlets.config.loader import PyFileConfigLoader

    root = Path(__file__).resolve().parents[2]
    config = PyFileConfigLoader("nbgrader_config.py", path=str(root)).load_config()
    assert config.CourseDirectory.source_directory == str(root / "solutions")
    assert config.CourseDirectory.release_directory == str(root / "course")
    assert config.CourseDirectory.db_url == f"sqlite:///{root / '.nbgrader' / 'gradebook.db'}"
    assert ".nbgrader/" in (root / ".gitignore").read_text().split()


def _hidden_cell(error: bool = True):
    cell = new_code_cell("assert f(1) == 1\n### BEGIN HIDDEN TESTS\nassert f(2) == SECRET\n### END HIDDEN TESTS")
    cell.metadata["nbgrader"] = {
        "grade": True,
        "solution": False,
        "locked": True,
        "points": 1,
        "grade_id": "t",
        "schema_version": 3,
    }
    if error:
        cell.outputs = [
            new_output(
                "error",
                ename="AssertionError",
                evalue="wrong for 2",
                traceback=["Traceback", "assert f(2) == SECRET", "AssertionError: wrong for 2"],
            )
        ]
    return cell


def test_shorten_hidden_tracebacks_keeps_only_the_message():
    cell, _ = ShortenHiddenTracebacks().preprocess_cell(_hidden_cell(), {}, 0)
    assert cell.outputs[0]["traceback"] == ["AssertionError: wrong for 2", HIDDEN_NOTE]


def test_shorten_hidden_tracebacks_leaves_other_cells_alone():
    cell = new_code_cell("1 / 0")
    cell.outputs = [new_output("error", ename="ZeroDivisionError", evalue="division by zero", traceback=["a", "b"])]
    out, _ = ShortenHiddenTracebacks().preprocess_cell(cell, {}, 0)
    assert out.outputs[0]["traceback"] == ["a", "b"]


def test_hide_hidden_tests_removes_the_region_and_is_enabled():
    pre = HideHiddenTests()
    assert pre.enabled and ShortenHiddenTracebacks().enabled
    cell, _ = pre.preprocess_cell(_hidden_cell(error=False), {}, 0)
    assert "SECRET" not in cell.source and "assert f(1) == 1" in cell.source


def test_check_submission_reasons(tmp_path):
    assert _check_submission(tmp_path / "absent", ["a.ipynb"]) == "missing: no submission"
    tmp_path.joinpath("other.ipynb").write_text("{}")
    assert _check_submission(tmp_path, ["a.ipynb"]).startswith("missing: a.ipynb not submitted (found: other.ipynb)")
    tmp_path.joinpath("a.ipynb").write_text('{"cells": [')
    assert _check_submission(tmp_path, ["a.ipynb"]).startswith("malformed: a.ipynb is not a readable notebook")
    nbformat.write(nbformat.v4.new_notebook(), tmp_path / "a.ipynb")
    assert _check_submission(tmp_path, ["a.ipynb"]) is None


def test_write_grades_csv(tmp_path):
    grades = [Grade("ann", "a01", 4.5, 6.0, "ok"), Grade("ben", "a01", 0.0, 6.0, "missing: no submission")]
    path = write_grades_csv(grades, tmp_path / "sub" / "grades.csv")
    rows = list(csv.reader(path.open()))
    assert rows == [
        list(CSV_FIELDS),
        ["ann", "a01", "4.5", "6", "ok"],
        ["ben", "a01", "0", "6", "missing: no submission"],
    ]


def test_run_reason_prefers_the_exception_line():
    output = "[X | ERROR] Traceback\n  File x\nValueError: bad cell\n[X | ERROR] Please see the above traceback\n"
    assert NbgraderRun(("nbgrader",), 1, output, timed_out=False).reason() == "ValueError: bad cell"
    assert NbgraderRun(("nbgrader",), -9, "", timed_out=True).reason() == "timed out"


def test_scan_for_markers(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "nb.ipynb").write_text('{"source": "### BEGIN SOLUTION"}')
    (tmp_path / "a" / "ok.ipynb").write_text('{"source": "raise NotImplementedError()"}')
    assert scan_for_markers(tmp_path) == ["a/nb.ipynb: contains 'BEGIN SOLUTION'"]


def test_autograde_rejects_a_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="is not a folder of <student>/<assignment>"):
        autograde(Course.at(tmp_path), tmp_path / "nope", out=tmp_path / "out", progress=False)


# --------------------------------------------------------------------------- the real pipeline, run once


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    course = _toy.make_course(root / "course_root", cell_timeout=30)
    release(course)
    released = course.release / _toy.ASSIGNMENT / _toy.NOTEBOOK
    cases = _toy.write_submissions(root / "submissions", released)
    grades = autograde(course, root / "submissions", out=root / "out", timeout=600, progress=False)
    return course, root / "out", cases, {g.student: g for g in grades}


@pytest.mark.slow
@pytest.mark.xdist_group("toy_grading")
class TestToyPipeline:
    def test_release_strips_solutions_and_hidden_tests(self, graded):
        course, _, _, _ = graded
        text = (course.release / _toy.ASSIGNMENT / _toy.NOTEBOOK).read_text()
        assert "NotImplementedError" in text
        assert "0.5 rounds to code 64" in text  # visible tests stay
        for marker in ("BEGIN SOLUTION", "BEGIN HIDDEN TESTS", _toy.HIDDEN_SENTINEL, "abs().max() /"):
            assert marker not in text
        assert scan_for_markers(course.release) == []

    def test_every_student_has_one_row(self, graded):
        _, _, cases, grades = graded
        assert set(grades) == set(cases)
        assert all(g.max_score == _toy.MAX_SCORE for g in grades.values())

    def test_correct_submission_scores_full_marks(self, graded):
        assert graded[3]["alice"] == Grade("alice", _toy.ASSIGNMENT, _toy.MAX_SCORE, _toy.MAX_SCORE, "ok")

    def test_unsolved_release_scores_zero(self, graded):
        assert (graded[3]["bob"].score, graded[3]["bob"].status) == (0.0, "ok")

    def test_calling_the_library_scores_zero_for_that_part(self, graded):
        carol = graded[3]["carol"]
        assert (carol.score, carol.status) == (2.0, "ok")  # absmax_scale (2) honest, fake_quant (3) forbidden

    def test_malformed_notebook_is_reported(self, graded):
        dave = graded[3]["dave"]
        assert dave.score == 0 and dave.status.startswith("malformed: f01_toy.ipynb") and "NotJSONError" in dave.status

    def test_missing_notebook_is_reported(self, graded):
        erin = graded[3]["erin"]
        assert erin.score == 0 and erin.status == "missing: f01_toy.ipynb not submitted (found: my_work.ipynb)"

    def test_endless_loop_is_interrupted_and_the_rest_graded(self, graded):
        frank = graded[3]["frank"]
        assert frank.score == 3.0  # fake_quant does not call the looping absmax_scale
        assert frank.status == "graded, but a cell ran past the time limit and was interrupted"

    def test_kernel_crash_is_reported(self, graded):
        grace = graded[3]["grace"]
        assert grace.score == 0 and grace.status.startswith("error:") and "DeadKernelError" in grace.status

    def test_feedback_shows_no_hidden_test_code(self, graded):
        course, out, _, _ = graded
        autograded = (course.step_dir("autograded") / "carol" / _toy.ASSIGNMENT / _toy.NOTEBOOK).read_text()
        assert _toy.HIDDEN_SENTINEL in autograded  # nbgrader put the hidden tests back to run them...
        pages = sorted((out / "feedback").glob(f"*/{_toy.ASSIGNMENT}/*.html"))
        assert [p.parts[-3] for p in pages] == ["alice", "bob", "carol", "frank"]
        for page in pages:  # ...and feedback does not show them
            html = page.read_text()
            assert _toy.HIDDEN_SENTINEL not in html and "BEGIN HIDDEN TESTS" not in html
            assert "random_inputs" not in html
            assert "cdnjs.cloudflare.com" not in html and 'src="../../_mathjax/tex-chtml.js"' in html  # offline math
        assert (out / "feedback" / "_mathjax" / "tex-chtml.js").is_file()
        carol = (out / "feedback" / "carol" / _toy.ASSIGNMENT / _toy.NOTEBOOK.replace(".ipynb", ".html")).read_text()
        assert "calling quantcourse.fake_quantize does not count" in carol
        assert "the hidden tests&#39; code is not shown" in carol or "the hidden tests' code is not shown" in carol

    def test_grades_csv(self, graded):
        _, out, _, grades = graded
        rows = list(csv.DictReader((out / "grades.csv").open()))
        assert [r["student"] for r in rows] == sorted(grades)
        assert {r["student"]: (float(r["score"]), float(r["max_score"])) for r in rows} == {
            "alice": (5, 5),
            "bob": (0, 5),
            "carol": (2, 5),
            "dave": (0, 5),
            "erin": (0, 5),
            "frank": (3, 5),
            "grace": (0, 5),
        }
        assert {r["student"]: r["status"] for r in rows}["alice"] == "ok"

    def test_regrading_overwrites_the_previous_result(self, graded, tmp_path):
        course, _, _, _ = graded
        folder = tmp_path / "subs" / "alice" / _toy.ASSIGNMENT
        folder.mkdir(parents=True)
        nbformat.write(_toy.answered(course.release / _toy.ASSIGNMENT / _toy.NOTEBOOK, {}), folder / _toy.NOTEBOOK)
        again = autograde(
            course, tmp_path / "subs", out=tmp_path / "out", progress=False, generate=False, feedback=False
        )
        assert [(g.student, g.score, g.status) for g in again] == [("alice", 0.0, "ok")]


def test_a_temporary_root_gets_its_own_config(tmp_path):
    course = Course.at(tmp_path, source="/somewhere/else")
    text = write_config(course).read_text()
    assert "source=Path('/somewhere/else')" in text and f"root=Path('{tmp_path.resolve()}')" in text
