"""Run one nbgrader command in a subprocess, with the course's settings and a wall-clock limit.

A subprocess per command keeps nbgrader's global state (traitlets singletons, kernels, the sqlite
session) out of the caller, and lets a runaway notebook be killed with its kernel: the command runs in
its own process group, and the whole group is killed when the limit passes.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import signal
import subprocess
import sys

from .config import Course

__all__ = ["NbgraderRun", "run_nbgrader", "grading_env"]


@dataclasses.dataclass(frozen=True)
class NbgraderRun:
    """What one nbgrader command did: exit status, combined output, and whether it was killed."""

    args: tuple[str, ...]
    returncode: int
    output: str
    timed_out: bool

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def reason(self) -> str:
        """A one-line reason for a failure, from nbgrader's log: its last exception line, else last ERROR."""
        if self.timed_out:
            return "timed out"
        lines = [line.strip() for line in self.output.splitlines() if line.strip()]
        exceptions = [line for line in lines if _EXCEPTION_LINE.match(line)]
        errors = [line for line in lines if "| ERROR]" in line and "see the" not in line]
        picked = (exceptions or errors or lines or ["no output"])[-1]
        return picked[:300]


_EXCEPTION_LINE = re.compile(r"^[\w.]*(Error|Exception|Exit)\b.*:")


@functools.lru_cache(maxsize=1)
def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def grading_env() -> dict[str, str]:
    """Environment for nbgrader and its kernels: Triton's interpreter unless a CUDA GPU is present."""
    env = dict(os.environ)
    if "TRITON_INTERPRET" not in env and not _cuda_available():
        env["TRITON_INTERPRET"] = "1"
    bin_dir = os.path.dirname(sys.executable)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("QUANTCOURSE_PROGRESS", "plain")  # no tqdm widget (CDN scripts) in feedback pages
    return env


def _course_flags(course: Course) -> list[str]:
    return [
        f"--CourseDirectory.root={course.root}",
        f"--CourseDirectory.source_directory={course.source}",
        f"--CourseDirectory.release_directory={course.release}",
        f"--CourseDirectory.submitted_directory={course.step_dir('submitted')}",
        f"--CourseDirectory.autograded_directory={course.step_dir('autograded')}",
        f"--CourseDirectory.feedback_directory={course.step_dir('feedback')}",
        f"--CourseDirectory.db_url={course.db_url}",
        f"--Execute.timeout={course.cell_timeout}",
    ]


def run_nbgrader(course: Course, command: str, *args: str, timeout: float | None = None) -> NbgraderRun:
    """Run ``nbgrader COMMAND ARGS`` in ``course.root`` (where its ``nbgrader_config.py`` lies).

    Args:
        course: the course whose folders nbgrader uses (passed as flags, so they win over any config).
        command: an nbgrader sub-command, e.g. ``"autograde"``.
        args: further arguments, e.g. ``("a01_memory", "--student", "alice", "--force")``.
        timeout: seconds before the command and its kernels are killed (``None``: no limit).
    """
    course.work.mkdir(parents=True, exist_ok=True)
    argv = (sys.executable, "-m", "nbgrader", command, *args, *_course_flags(course))
    proc = subprocess.Popen(
        argv,
        cwd=course.root,
        env=grading_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
        return NbgraderRun(argv, proc.returncode, output, timed_out=False)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        return NbgraderRun(argv, proc.returncode, output, timed_out=True)
