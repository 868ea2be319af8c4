"""Where a course's nbgrader files live, and the nbgrader configuration that goes with it.

A course is a root folder with instructor masters (``solutions/``), the student release generated from
them (``course/``) and one ignored work folder (``.nbgrader/``) that holds everything else: submitted,
autograded and feedback copies, the gradebook database and the exchange. The repository's
``nbgrader_config.py`` calls :func:`configure` with the repository's layout; the grading commands write
the same two lines into temporary roots (self-check, release check, tests), so every run of nbgrader
sees one configuration.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

__all__ = ["Course", "configure", "write_config", "DEFAULT_CELL_TIMEOUT"]

DEFAULT_CELL_TIMEOUT = 300  # seconds a single cell may run when autograding before it is interrupted
COURSE_ID = "quantcourse"


@dataclasses.dataclass(frozen=True)
class Course:
    """The folders of one course (all absolute paths).

    Attributes:
        root: the course root, where nbgrader runs and ``nbgrader_config.py`` lies.
        source: instructor masters, one sub-folder per assignment (``solutions/``).
        release: student release generated from ``source`` (``course/``).
        work: nbgrader's work folder (submitted, autograded, feedback, gradebook, exchange).
        cell_timeout: seconds one cell may run under autograding before it is interrupted.
    """

    root: Path
    source: Path
    release: Path
    work: Path
    cell_timeout: int = DEFAULT_CELL_TIMEOUT

    @classmethod
    def at(
        cls,
        root: str | Path,
        *,
        source: str | Path = "solutions",
        release: str | Path = "course",
        work: str | Path = ".nbgrader",
        cell_timeout: int = DEFAULT_CELL_TIMEOUT,
    ) -> Course:
        """The course at ``root``; relative folders are taken inside ``root``."""
        root = Path(root).resolve()
        return cls(
            root=root,
            source=(root / source).resolve(),
            release=(root / release).resolve(),
            work=(root / work).resolve(),
            cell_timeout=int(cell_timeout),
        )

    @property
    def gradebook(self) -> Path:
        return self.work / "gradebook.db"

    @property
    def db_url(self) -> str:
        return f"sqlite:///{self.gradebook}"

    def step_dir(self, step: str) -> Path:
        """``submitted``, ``autograded`` or ``feedback`` folder inside the work folder."""
        return self.work / step

    def assignments(self) -> list[str]:
        """Names of the assignments in ``source`` (sub-folders holding at least one notebook), sorted."""
        if not self.source.is_dir():
            return []
        return sorted(
            d.name
            for d in self.source.iterdir()
            if d.is_dir() and not d.name.startswith(".") and any(d.glob("*.ipynb"))
        )

    def notebooks(self, assignment: str) -> list[str]:
        """File names of the notebooks of ``assignment`` in ``source``, sorted."""
        folder = self.source / assignment
        if not folder.is_dir():
            known = ", ".join(self.assignments()) or "none"
            raise ValueError(f"no assignment {assignment!r} in {self.source} (assignments: {known})")
        return sorted(p.name for p in folder.glob("*.ipynb"))

    def with_(self, **changes) -> Course:
        """A copy with some folders replaced (paths are resolved)."""
        changes = {k: (Path(v).resolve() if k != "cell_timeout" else int(v)) for k, v in changes.items()}
        return dataclasses.replace(self, **changes)


def configure(c, course: Course) -> None:
    """Fill nbgrader's traitlets config ``c`` (from ``get_config()``) for ``course``.

    Creates the work folder: nbgrader's sqlite gradebook fails with a misleading "run nbgrader db
    upgrade" message when its folder is missing.
    """
    course.work.mkdir(parents=True, exist_ok=True)
    (course.work / "exchange").mkdir(exist_ok=True)
    c.CourseDirectory.course_id = COURSE_ID
    c.CourseDirectory.root = str(course.root)
    c.CourseDirectory.source_directory = str(course.source)
    c.CourseDirectory.release_directory = str(course.release)
    c.CourseDirectory.submitted_directory = str(course.step_dir("submitted"))
    c.CourseDirectory.autograded_directory = str(course.step_dir("autograded"))
    c.CourseDirectory.feedback_directory = str(course.step_dir("feedback"))
    c.CourseDirectory.solution_directory = str(course.work / "solution")
    c.CourseDirectory.db_url = course.db_url
    c.Exchange.root = str(course.work / "exchange")
    c.Execute.timeout = course.cell_timeout
    c.Execute.interrupt_on_timeout = True
    # Autograde records what quantcourse's trusted grader signed and executes nothing: no ClearOutput
    # (the outputs are the grader's), TrustedResults instead of Execute (see preprocessors.py).
    c.Autograde.sanitize_preprocessors = [
        "nbgrader.preprocessors.DeduplicateIds",
        "nbgrader.preprocessors.OverwriteKernelspec",
        "nbgrader.preprocessors.OverwriteCells",
        "nbgrader.preprocessors.CheckCellMetadata",
    ]
    c.Autograde.autograde_preprocessors = [
        "quantcourse.grading.preprocessors.TrustedResults",
        "nbconvert.preprocessors.ClearMetadataPreprocessor",
        "nbgrader.preprocessors.SaveAutoGrades",
        "nbgrader.preprocessors.AssignLatePenalties",
        "nbgrader.preprocessors.CheckCellMetadata",
    ]
    c.TrustedResults.key_file = str(course.work / "grader.key")
    # Feedback: keep hidden tests and their tracebacks away from students; math from a local copy.
    c.GenerateFeedback.preprocessors = [
        "nbgrader.preprocessors.GetGrades",
        "quantcourse.grading.preprocessors.ShortenHiddenTracebacks",
        "quantcourse.grading.preprocessors.HideHiddenTests",
        "nbconvert.preprocessors.CSSHTMLHeaderPreprocessor",
    ]


def write_config(course: Course) -> Path:
    """Write a ``nbgrader_config.py`` for ``course`` into its root (temporary roots only)."""
    text = (
        "# Written by quantcourse.grading for a temporary course root.\n"
        "from pathlib import Path\n"
        "from quantcourse.grading.config import Course, configure\n\n"
        "configure(get_config(), Course(\n"
        f"    root=Path({str(course.root)!r}),\n"
        f"    source=Path({str(course.source)!r}),\n"
        f"    release=Path({str(course.release)!r}),\n"
        f"    work=Path({str(course.work)!r}),\n"
        f"    cell_timeout={course.cell_timeout!r},\n"
        "))\n"
    )
    course.root.mkdir(parents=True, exist_ok=True)
    path = course.root / "nbgrader_config.py"
    path.write_text(text)
    return path
