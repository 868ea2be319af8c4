"""The committed student release (course/) is exactly what nbgrader makes from solutions/, and clean."""

from pathlib import Path

import pytest

from quantcourse.grading.config import Course
from quantcourse.grading.release import check_release

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_course_is_in_sync_with_solutions_and_holds_no_solutions():
    course = Course.at(ROOT)
    problems = check_release(course)
    assert problems == [], "course/ is stale or leaks solutions; run `quantcourse release` and commit course/:\n" + (
        "\n".join(problems)
    )
