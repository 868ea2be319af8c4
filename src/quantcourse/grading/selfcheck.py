"""Self-check: every solution scores full marks and every released notebook scores zero.

Runs the real pipeline in a temporary course root: ``generate_assignment`` from the masters, then
``autograde`` of two submissions per assignment, the masters themselves (student ``solution``) and the
fresh release (student ``release``), through the trusted path: the solution must score full marks with
the functions its hidden tests forbid taken out of the sandbox's library. The repository's ``course/``
and ``.nbgrader/`` are not touched. Without bubblewrap the (trusted) notebooks run unsandboxed.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

from .autograde import Grade, autograde, prepare
from .config import Course, write_config
from .sandbox import sandbox_problem

__all__ = ["SelfCheck", "selfcheck"]


@dataclasses.dataclass(frozen=True)
class SelfCheck:
    """The outcome for one assignment; ``problems`` is empty when it passes."""

    assignment: str
    solution: Grade | None
    release: Grade | None
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


def _problems(solution: Grade | None, release: Grade | None) -> list[str]:
    problems = []
    if solution is None or release is None:
        return ["the assignment could not be autograded"]
    if solution.max_score <= 0:
        problems.append(f"no points to grade (max_score {solution.max_score:g}): are the test cells marked as graded?")
    if not solution.ok:
        problems.append(f"solution: {solution.status}")
    elif solution.score != solution.max_score:
        problems.append(f"solution scores {solution.score:g}/{solution.max_score:g}, expected full marks")
    if not release.ok:
        problems.append(f"release: {release.status}")
    elif release.score != 0:
        problems.append(
            f"release scores {release.score:g}/{release.max_score:g}, expected 0 "
            "(a test that passes on the unsolved notebook gives free points)"
        )
    return problems


def selfcheck(
    course: Course, assignments: list[str] | None = None, *, timeout: float = 900, progress: bool = True
) -> list[SelfCheck]:
    """Autograde the masters and a fresh release of ``assignments`` (default: all) of ``course``."""
    names = course.assignments() if assignments is None else list(assignments)
    for name in names:
        course.notebooks(name)  # raises ValueError for an unknown assignment
    with tempfile.TemporaryDirectory(prefix="quantcourse-selfcheck-") as tmp:
        tmp = Path(tmp)
        scratch = Course.at(
            tmp / "root", source=course.source, release="release", work="work", cell_timeout=course.cell_timeout
        )
        write_config(scratch)
        failed = prepare(scratch, names, timeout=timeout)
        submissions = tmp / "submissions"
        for name in names:
            if name in failed:
                continue
            shutil.copytree(course.source / name, submissions / "solution" / name)
            shutil.copytree(scratch.work / "release" / name, submissions / "release" / name)
        grades = (
            autograde(
                scratch,
                submissions,
                out=tmp / "out",
                timeout=timeout,
                progress=progress,
                generate=False,
                feedback=False,
                sandbox=sandbox_problem() is None,  # the masters and releases are the instructor's own
            )
            if (submissions.is_dir())
            else []
        )
    results = []
    for name in names:
        if name in failed:
            results.append(SelfCheck(name, None, None, (f"nbgrader could not generate it: {failed[name]}",)))
            continue
        by_student = {g.student: g for g in grades if g.assignment == name}
        solution, release = by_student.get("solution"), by_student.get("release")
        results.append(SelfCheck(name, solution, release, tuple(_problems(solution, release))))
    return results
