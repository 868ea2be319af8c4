"""No answer leaks: not in the student distribution, course/, the book, the wheel or the sdist."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from quantcourse.grading.config import Course
from quantcourse.grading.distribution import check_student_dist, solution_lines, student_dist
from quantcourse.grading.release import FORBIDDEN_MARKERS

ROOT = Path(__file__).resolve().parents[1]
COURSE = Course.at(ROOT)
SECRETS = solution_lines(COURSE)


def _leaks(name: str, text: str) -> list[str]:
    """Markers and lines of the masters' solutions in a notebook or page (the library's .py files are the
    reference the course teaches, and share generic lines with hidden tests)."""
    if not name.endswith((".ipynb", ".md", ".html", ".json", ".txt")):
        return []
    found = [f"{name}: {m!r}" for m in FORBIDDEN_MARKERS if m in text]
    return found + [f"{name}: {line!r}" for line in sorted(SECRETS) if line in text][:3]


def test_the_masters_have_secrets_to_find():
    assert len(SECRETS) > 50  # the leak checks below look for something real
    assert any("forbid(" in line for line in SECRETS)


def test_student_dist_folder_holds_no_answer(tmp_path):
    dest = student_dist(COURSE, tmp_path / "dist")
    names = {p.name for p in dest.iterdir()}
    assert {"course", "src", "book", "README.md", "pyproject.toml"} <= names
    assert not {"solutions", ".nbgrader", "nbgrader_config.py", "tests"} & names
    assert check_student_dist(dest, COURSE) == []
    assert sorted(p.name for p in (dest / "course").iterdir()) == COURSE.assignments()
    assert "student edition" in (dest / "README.md").read_text()


def test_student_dist_archive_holds_no_answer(tmp_path):
    archive = student_dist(COURSE, tmp_path / "student.tar.gz")
    with tarfile.open(archive) as tf:
        names = tf.getnames()
        assert not any("/solutions/" in n or n.endswith("nbgrader_config.py") for n in names)
        leaks = []
        for member in tf.getmembers():
            if member.isfile() and member.name.split("/")[1] == "course":
                leaks += _leaks(member.name, tf.extractfile(member).read().decode(errors="replace"))
    assert leaks == []


def test_student_dist_refuses_a_private_destination(tmp_path):
    with pytest.raises(ValueError, match="instructor's solutions/"):
        student_dist(COURSE, COURSE.source / "dist")


def test_a_planted_answer_is_caught(tmp_path):
    dest = student_dist(COURSE, tmp_path / "dist")
    line = sorted(SECRETS)[0]
    nb = next((dest / "course").rglob("*.ipynb"))
    nb.write_text(nb.read_text() + line)
    assert any("holds a line of a master's solution" in p for p in check_student_dist(dest, COURSE))


def test_course_and_book_hold_no_answer():
    leaks = []
    for folder in ("course", "book"):
        for path in sorted((ROOT / folder).rglob("*.ipynb")):
            text = path.read_text()
            leaks += [f"{path.relative_to(ROOT)}: {m!r}" for m in FORBIDDEN_MARKERS if m in text]
            if folder == "course":
                leaks += _leaks(str(path.relative_to(ROOT)), text)
    built = ROOT / "_build" / "html"
    for page in sorted(built.rglob("*.html")) if built.is_dir() else []:
        leaks += [f"{page.relative_to(ROOT)}: {m!r}" for m in FORBIDDEN_MARKERS if m in page.read_text()]
    assert leaks == []


@pytest.mark.slow
def test_wheel_and_sdist_hold_no_answer(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        timeout=600,
    )
    code = "import setuptools.build_meta as b, sys; print(b.build_sdist(sys.argv[1]))"
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, check=True, timeout=600, capture_output=True)
    wheel, sdist = next(tmp_path.glob("*.whl")), next(tmp_path.glob("*.tar.gz"))
    leaks = []
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        for name in names:
            leaks += _leaks(name, zf.read(name).decode(errors="replace"))
    assert not any("solutions/" in n for n in names)
    with tarfile.open(sdist) as tf:
        names = tf.getnames()
        for member in tf.getmembers():
            if member.isfile():
                leaks += _leaks(member.name, tf.extractfile(member).read().decode(errors="replace"))
    assert not any("/solutions/" in n for n in names), [n for n in names if "/solutions/" in n][:5]
    assert leaks == []
