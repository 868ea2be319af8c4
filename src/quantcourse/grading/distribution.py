"""What students receive: the course without solutions, written explicitly and checked.

The repository is the instructor's: ``solutions/`` (masters with solutions and hidden tests), the
gradebook in ``.nbgrader/`` and the nbgrader configuration stay private. :func:`student_dist` writes the
student-facing copy (the release ``course/``, the library, the book's notebooks, the packaging and the
README) into a folder or a ``.tar.gz``/``.zip`` archive, then :func:`check_student_dist` proves that it
holds no solution or hidden-test marker and no line of any master's solution code.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from pathlib import Path

import nbformat

from .config import Course
from .release import FORBIDDEN_MARKERS

__all__ = ["STUDENT_PATHS", "student_dist", "check_student_dist", "solution_lines"]

#: What students get, relative to the course root (anything else stays with the instructor).
STUDENT_PATHS = (
    "course",
    "src/quantcourse",
    "book",
    "pyproject.toml",
    "environment.yml",
    "_config.yml",
    "_toc.yml",
    "README.md",
    "LICENSE",
    "Makefile",
)
_SKIP = {"__pycache__", ".ipynb_checkpoints", "_build", ".nbgrader", ".DS_Store", ".jupyter_cache"}
_SOLUTION = re.compile(r"### BEGIN SOLUTION\n(.*?)### END SOLUTION", re.S)
_HIDDEN = re.compile(r"### BEGIN HIDDEN TESTS\n(.*?)### END HIDDEN TESTS", re.S)


def solution_lines(course: Course, *, min_length: int = 24) -> set[str]:
    """Distinctive lines of the masters' solutions and hidden tests (stripped, at least ``min_length``)."""
    lines, public = set(), []
    for assignment in course.assignments():
        for name in course.notebooks(assignment):
            nb = nbformat.read(course.source / assignment / name, as_version=4)
            for cell in nb.cells:
                for block in _SOLUTION.findall(cell.source) + _HIDDEN.findall(cell.source):
                    lines |= {line.strip() for line in block.splitlines() if len(line.strip()) >= min_length}
                rest = _HIDDEN.sub("", _SOLUTION.sub("", cell.source))
                public.append(rest)
    public_text = "\n".join(public)  # a line the students see anyway (a given helper, a hint) is no secret
    return {line for line in lines if line not in public_text}


def _tracked(root: Path) -> set[str] | None:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True, timeout=60
        ).stdout.decode()
    except (OSError, subprocess.SubprocessError):
        return None
    return {p for p in out.split("\0") if p}


def _files(course: Course) -> list[Path]:
    """The student files (git-tracked ones when the root is a repository), relative to the root."""
    tracked = _tracked(course.root)
    found = []
    for entry in STUDENT_PATHS:
        path = course.root / entry
        candidates = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in candidates:
            rel = file.relative_to(course.root)
            if _SKIP.intersection(rel.parts) or (tracked is not None and str(rel) not in tracked):
                continue
            found.append(rel)
    return found


_NOTE = """# For students

This is the student edition of quantcourse: the book's chapters (`book/`), the library (`src/quantcourse`)
and the assignments (`course/`). Open an assignment in JupyterLab, write your answers in the cells whose
body is still the placeholder that raises `NotImplementedError`, run the visible tests under them, and
hand the notebook in as your instructor says (nbgrader's exchange on JupyterHub, or a file). Hidden
tests, run by the grader, compare your functions with the library on fresh inputs; calling the library
function you are asked to write scores nothing.

"""


def student_dist(course: Course, dest: str | Path) -> Path:
    """Write the student distribution to ``dest``: a folder, or an archive (``.tar.gz``, ``.tgz``, ``.zip``).

    Raises:
        ValueError: ``dest`` is inside the course root's private folders, or the result holds an answer
            (see :func:`check_student_dist`; nothing is left behind then).
    """
    dest = Path(dest).resolve()
    archive = dest.name.endswith((".tar.gz", ".tgz", ".zip"))
    for private in (course.source, course.work):
        if dest == private or private in dest.parents:
            raise ValueError(f"{dest} is inside the instructor's {private.name}/: choose another place")
    with tempfile.TemporaryDirectory(prefix="quantcourse-dist-") as tmp:
        folder = Path(tmp) / "quantcourse-student"
        for rel in _files(course):
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(course.root / rel, folder / rel)
        readme = folder / "README.md"
        readme.write_text(_NOTE + (readme.read_text() if readme.is_file() else ""))
        problems = check_student_dist(folder, course)
        if problems:
            raise ValueError("the student distribution would hold answers:\n" + "\n".join(problems[:20]))
        if not archive:
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(folder, dest)
        elif dest.name.endswith(".zip"):
            with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
                for file in sorted(folder.rglob("*")):
                    if file.is_file():
                        zf.write(file, file.relative_to(folder.parent))
        else:
            with tarfile.open(dest, "w:gz") as tf:
                tf.add(folder, arcname=folder.name)
    return dest


def check_student_dist(folder: str | Path, course: Course) -> list[str]:
    """Problems with a student distribution folder: private parts, markers, lines of master solutions."""
    folder = Path(folder)
    problems = []
    for private in ("solutions", ".nbgrader", "nbgrader_config.py", "tests"):
        if (folder / private).exists():
            problems.append(f"{private}: the instructor's, must not be there")
    secret_lines = solution_lines(course)
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            text = file.read_text(errors="replace")
        except OSError:
            continue
        rel = file.relative_to(folder)
        if file.suffix in (".ipynb", ".md"):  # the library's grading code names the markers, as constants
            problems += [f"{rel}: contains {m!r}" for m in FORBIDDEN_MARKERS if m in text]
        if rel.parts[0] == "course":  # the releases: where a master's code would leak
            leaked = sorted(line for line in secret_lines if line in text)
            problems += [f"{rel}: holds a line of a master's solution or hidden tests: {line!r}" for line in leaked[:3]]
    return problems
