"""The ``quantcourse`` command: instructor tools around nbgrader, and a health check.

    quantcourse doctor                       versions, device, course model
    quantcourse release [ASSIGNMENT]         regenerate course/ from solutions/
    quantcourse check-release                course/ is in sync with solutions/ and holds no solutions
    quantcourse autograde SUBMISSIONS        grade <student>/<assignment>/*.ipynb: feedback + grades.csv
    quantcourse merge-grades PART ...        combine the --out folders of sharded autograde runs
    quantcourse selfcheck [ASSIGNMENT ...]   solutions score full marks, releases score zero
    quantcourse student-dist DEST            the student-facing copy (folder or archive), without solutions

The logic lives in :mod:`quantcourse.grading`; this module only parses arguments and prints.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import sys
from pathlib import Path

__all__ = ["main"]

_DOCTOR_PACKAGES = (
    "quantcourse",
    "torch",
    "transformers",
    "gguf",
    "nbgrader",
    "jupyter-book",
    "triton",
    "optimum-quanto",
    "bitsandbytes",
)


def _find_root(start: Path) -> Path:
    """The course root: the nearest folder upwards holding ``nbgrader_config.py`` and ``solutions/``."""
    for folder in (start, *start.parents):
        if (folder / "nbgrader_config.py").is_file() and (folder / "solutions").is_dir():
            return folder
    raise SystemExit(
        f"quantcourse: no course root (nbgrader_config.py + solutions/) at or above {start}; "
        "run it from the repository or pass --root"
    )


def _course(args):
    from .grading.config import Course

    root = Path(args.root).resolve() if args.root else _find_root(Path.cwd().resolve())
    return Course.at(root, cell_timeout=getattr(args, "cell_timeout", None) or 300)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cmd_doctor(args) -> int:
    print(f"python        {platform.python_version()} ({sys.executable})")
    for package in _DOCTOR_PACKAGES:
        print(f"{package:<13} {_version(package)}")
    import torch

    if torch.cuda.is_available():
        device = f"CUDA: {torch.cuda.get_device_name(0)} (torch CUDA {torch.version.cuda})"
    else:
        device = (
            f"CPU ({torch.get_num_threads()} threads; torch built {'with' if torch.version.cuda else 'without'} CUDA)"
        )
    print(f"device        {device}")
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        print(f"gpu {i:<9} {props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs")
    print(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '(unset)')}")
    from .kernels import available

    print(f"kernels       {available()['note']}")
    from .grading.autograde import grading_device

    print(f"grading       hidden tests run on {grading_device()}")
    from .grading.sandbox import sandbox_problem

    problem = sandbox_problem()
    print(f"sandbox       {'bubblewrap works' if problem is None else 'UNAVAILABLE: ' + problem}")
    from .models import course_gguf_path

    try:
        path = course_gguf_path()
    except (FileNotFoundError, ImportError, ModuleNotFoundError) as err:
        print(f"course model  MISSING: {err}")
        return 1
    print(f"course model  {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0


def cmd_release(args) -> int:
    from .grading.release import release

    course = _course(args)
    names = release(course, [args.assignment] if args.assignment else None)
    for name in names:
        print(f"released {name} -> {(course.release / name).relative_to(course.root)}/")
    return 0


def cmd_check_release(args) -> int:
    from .grading.release import check_release

    course = _course(args)
    problems = check_release(course)
    for problem in problems:
        print(f"{course.release.name}/{problem}")
    if problems:
        print(f"check-release: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(
        f"check-release: {course.release.name}/ is in sync with {course.source.name}/ "
        f"({len(course.assignments())} assignments) and holds no solutions or hidden tests"
    )
    return 0


def _print_grades(grades, out: Path) -> None:
    width = max([len(g.student) for g in grades] + [7])
    for g in grades:
        print(f"{g.student:<{width}} {g.assignment:<24} {g.score:>6g}/{g.max_score:<6g} {g.status}")
    bad = [g for g in grades if not g.ok]
    print(f"grades: {out / 'grades.csv'}; feedback: {out / 'feedback'}/; {len(bad)} of {len(grades)} not ok")


def cmd_autograde(args) -> int:
    from .grading.autograde import autograde, parse_shard
    from .grading.sandbox import Limits

    course = _course(args)
    course = course.with_(cell_timeout=args.cell_timeout)
    shard = parse_shard(args.shard)  # options are checked before any long work
    if args.no_sandbox:
        print(
            "quantcourse autograde: --no-sandbox: students' code runs unconfined, as you, with your files in "
            "reach; use it only for notebooks you trust",
            file=sys.stderr,
        )
    limits = Limits(call_timeout=args.cell_timeout, memory_bytes=int(args.memory_gb * 2**30))
    out = Path(args.out)
    from .grading.autograde import grading_device

    device = grading_device()
    note = "" if device.startswith("cuda") else " (no CUDA GPU: falling back to the CPU; Triton runs interpreted)"
    print(f"grading on {device}{note}")
    grades = autograde(
        course,
        args.submissions,
        out=out,
        timeout=args.timeout,
        progress=not args.no_progress,
        sandbox=not args.no_sandbox,
        workers=args.workers,
        resume=args.resume,
        shard=shard,
        limits=limits,
    )
    _print_grades(grades, out)
    return 0


def cmd_merge_grades(args) -> int:
    from .grading.autograde import merge_grades

    out = Path(args.out)
    grades = merge_grades(_course(args), args.parts, out=out)
    _print_grades(grades, out)
    return 0


def cmd_student_dist(args) -> int:
    from .grading.distribution import student_dist

    dest = student_dist(_course(args), args.dest)
    print(f"student-dist: wrote {dest} (course/, the library, the book; no solutions, no hidden tests)")
    return 0


def cmd_selfcheck(args) -> int:
    from .grading.selfcheck import selfcheck

    course = _course(args)
    results = selfcheck(course, args.assignments or None, progress=not args.no_progress)
    if not results:
        print(f"selfcheck: no assignments in {course.source}", file=sys.stderr)
        return 1
    for r in results:
        sol = f"{r.solution.score:g}/{r.solution.max_score:g}" if r.solution else "-"
        rel = f"{r.release.score:g}/{r.release.max_score:g}" if r.release else "-"
        print(f"{'ok  ' if r.ok else 'FAIL'} {r.assignment:<28} solution {sol:<9} release {rel}")
        for problem in r.problems:
            print(f"       {problem}")
    failed = [r.assignment for r in results if not r.ok]
    if failed:
        print(f"selfcheck failed for: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"selfcheck: all {len(results)} assignments pass (full marks for solutions, zero for releases)")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quantcourse", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", help="course root (default: the nearest folder upwards with nbgrader_config.py)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("doctor", help="versions, device (CUDA or CPU), whether the course model is installed")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("release", help="regenerate course/ from solutions/ (one assignment or all)")
    p.add_argument("assignment", nargs="?", help="e.g. a01_memory (default: all)")
    p.set_defaults(func=cmd_release)

    p = sub.add_parser("check-release", help="course/ matches a fresh release and holds no solutions")
    p.set_defaults(func=cmd_check_release)

    p = sub.add_parser("autograde", help="autograde <student>/<assignment>/*.ipynb, write feedback and grades.csv")
    p.add_argument("submissions", help="folder of <student>/<assignment>/*.ipynb")
    p.add_argument("--out", default="graded", help="where grades.csv and feedback/ go (default: ./graded)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per student and assignment (default 900)")
    p.add_argument("--cell-timeout", type=int, default=300, help="seconds per cell or call of a student's function")
    p.add_argument("--workers", type=int, default=None, help="submissions graded side by side (default: one per core)")
    p.add_argument(
        "--resume", action="store_true", help="skip submissions already graded unchanged (out/manifest.json)"
    )
    p.add_argument("--shard", help="grade only slice i of N (i/N, 0 <= i < N), e.g. $SLURM_ARRAY_TASK_ID/8")
    p.add_argument("--memory-gb", type=float, default=8, help="address space of a sandbox process (default 8 GiB)")
    p.add_argument(
        "--no-sandbox",
        action="store_true",
        help="run the submissions' code without bubblewrap (only for notebooks you trust)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_autograde)

    p = sub.add_parser("merge-grades", help="combine the --out folders of sharded autograde runs")
    p.add_argument("parts", nargs="+", help="the --out folders of the shards")
    p.add_argument("--out", default="graded", help="where the merged grades.csv and feedback/ go")
    p.set_defaults(func=cmd_merge_grades)

    p = sub.add_parser("student-dist", help="write what students get (folder or .tar.gz/.zip), without solutions")
    p.add_argument("dest", help="a folder, or an archive name ending in .tar.gz, .tgz or .zip")
    p.set_defaults(func=cmd_student_dist)

    p = sub.add_parser("selfcheck", help="solutions score full marks and releases score zero")
    p.add_argument("assignments", nargs="*", help="default: every assignment in solutions/")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_selfcheck)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError) as err:
        print(f"quantcourse {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
