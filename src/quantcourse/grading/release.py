"""Generate the student release (``course/``) from the instructor masters (``solutions/``) and check it.

``release`` runs ``nbgrader generate_assignment --force`` per assignment (it deletes the old release
folder first, so ``course/`` is always exactly what nbgrader makes). ``check_release`` regenerates into a
temporary folder and compares byte for byte, then scans ``course/`` for solution and hidden-test markers.
"""

from __future__ import annotations

import filecmp
import shutil
import tempfile
from pathlib import Path

from .config import Course, write_config
from .runner import run_nbgrader

__all__ = ["ReleaseError", "release", "check_release", "FORBIDDEN_MARKERS"]

FORBIDDEN_MARKERS = ("BEGIN SOLUTION", "END SOLUTION", "BEGIN HIDDEN TESTS", "END HIDDEN TESTS")
_IGNORED = {".ipynb_checkpoints", "__pycache__", ".DS_Store"}


class ReleaseError(RuntimeError):
    """nbgrader could not generate an assignment's release."""


def release(course: Course, assignments: list[str] | None = None, *, timeout: float = 600) -> list[str]:
    """Regenerate ``course.release/<A>`` from ``course.source/<A>`` for ``assignments`` (default: all).

    Releasing all also removes release folders whose source no longer exists. Returns the names released.

    Raises:
        ValueError: an assignment is not in the source folder.
        ReleaseError: nbgrader failed (its last error line is in the message).
    """
    known = course.assignments()
    names = known if assignments is None else list(assignments)
    for name in names:
        course.notebooks(name)  # raises ValueError naming the known assignments
    for name in names:
        run = run_nbgrader(course, "generate_assignment", name, "--force", timeout=timeout)
        if not run.ok:
            raise ReleaseError(f"nbgrader could not release {name}: {run.reason()}\n{run.output[-3000:]}")
    if assignments is None and course.release.is_dir():
        for stale in course.release.iterdir():
            if stale.is_dir() and stale.name not in known and stale.name not in _IGNORED:
                shutil.rmtree(stale)
    return names


def _files(folder: Path) -> set[Path]:
    if not folder.is_dir():
        return set()
    return {
        p.relative_to(folder)
        for p in folder.rglob("*")
        if p.is_file() and not _IGNORED.intersection(p.relative_to(folder).parts)
    }


def scan_for_markers(folder: Path) -> list[str]:
    """Files under ``folder`` that contain a solution or hidden-test marker, as ``"path: marker"``."""
    found = []
    for rel in sorted(_files(folder)):
        try:
            text = (folder / rel).read_text(errors="replace")
        except OSError:
            continue
        found += [f"{rel}: contains {marker!r}" for marker in FORBIDDEN_MARKERS if marker in text]
    return found


def check_release(course: Course, *, timeout: float = 600) -> list[str]:
    """Problems with ``course.release`` (empty when it is in sync with a fresh release and clean).

    Each problem is one line: a file missing, extra or different compared with a fresh generation, or
    a file containing a solution / hidden-test marker.
    """
    problems = scan_for_markers(course.release)
    with tempfile.TemporaryDirectory(prefix="quantcourse-release-") as tmp:
        fresh = Course.at(tmp, source=course.source, release="course", work=".nbgrader")
        write_config(fresh)
        release(fresh, timeout=timeout)
        expected, actual = _files(fresh.release), _files(course.release)
        hint = "run `quantcourse release` and commit course/"
        problems += [f"{rel}: missing from {course.release.name}/ ({hint})" for rel in sorted(expected - actual)]
        problems += [
            f"{rel}: in {course.release.name}/ but not generated from the source ({hint})"
            for rel in sorted(actual - expected)
        ]
        problems += [
            f"{rel}: differs from a fresh release ({hint})"
            for rel in sorted(expected & actual)
            if not filecmp.cmp(fresh.release / rel, course.release / rel, shallow=False)
        ]
    return problems
