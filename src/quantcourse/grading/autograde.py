"""Autograde a folder of submissions through the trusted path; feedback, gradebook and a grades CSV.

Submissions are laid out ``<submissions>/<student>/<assignment>/<notebook>.ipynb`` (what nbgrader's
exchange collects). For each (student, assignment):

1. the submission is checked (notebook present, valid JSON); a bad one gets its reason as its status;
2. each notebook is graded by :class:`~quantcourse.grading.trusted.TrustedGrader`: the student's answer
   cells run in a bubblewrap sandbox, the master's tests (hidden ones included) run in a worker of this
   grader with the student's functions as proxies, and the result is the master notebook with the
   student's answers and trusted outputs, signed with the course's key (``.nbgrader/grader.key``);
3. nbgrader's ``autograde`` records the signed notebooks in the gradebook: its Execute step is replaced
   by :class:`~quantcourse.grading.preprocessors.TrustedResults`, which refuses any notebook whose
   signature does not verify, so nothing of a student's file reaches the gradebook unchecked.

Submissions are graded side by side (one worker per core by default); ``resume`` skips (student,
assignment) pairs whose submission and master are unchanged since a finished grading (a manifest keyed
on their hashes in ``out/``), and ``shard=(i, n)`` grades a deterministic slice for fan-out across
machines (:func:`merge_grades` combines the slices).
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import hashlib
import hmac
import importlib.util
import json
import multiprocessing
import os
import re
import shutil
import time
from pathlib import Path

import nbformat

from ..progress import progress_bar
from .config import Course
from .runner import run_nbgrader

__all__ = [
    "Grade",
    "prepare",
    "autograde",
    "write_grades_csv",
    "merge_grades",
    "parse_shard",
    "CSV_FIELDS",
    "sign",
    "verify",
    "grading_device",
]

CSV_FIELDS = ("student", "assignment", "score", "max_score", "status", "device")


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


# ------------------------------------------------------------------------------------- signed notebooks


def _key(course: Course) -> bytes:
    """The course's grading key (created on first use, readable by the instructor only)."""
    path = course.work / "grader.key"
    if not path.is_file():
        course.work.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(os.urandom(32).hex().encode())
    return path.read_bytes().strip()


def _cells_digest(nb) -> bytes:
    cells = [[c.get("cell_type"), c.get("source"), c.get("outputs", [])] for c in nb.get("cells", [])]
    return json.dumps(cells, sort_keys=True, separators=(",", ":")).encode()


def sign(key: bytes, nb) -> None:
    """Mark ``nb`` (cells and outputs as written by the trusted grader) with an HMAC of ``key``."""
    nb = nbformat.from_dict(nb)
    nb.metadata.setdefault("quantcourse", {})
    normal = nbformat.reads(nbformat.writes(nb), as_version=4)
    nb.metadata["quantcourse"]["trusted"] = hmac.new(key, _cells_digest(normal), hashlib.sha256).hexdigest()
    return nb


def verify(key: bytes, nb) -> bool:
    """Whether ``nb`` carries a valid signature of ``key`` (see :func:`sign`)."""
    claimed = nb.get("metadata", {}).get("quantcourse", {}).get("trusted")
    if not isinstance(claimed, str):
        return False
    expected = hmac.new(key, _cells_digest(nb), hashlib.sha256).hexdigest()
    return hmac.compare_digest(claimed, expected)


# ------------------------------------------------------------------------------------ assignment plans


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What every worker needs to grade one assignment."""

    assignment: str
    notebooks: tuple[str, ...]
    masters: tuple[str, ...]
    view: tuple  # LibraryView fields
    points: tuple[tuple[str, float], ...]  # (notebook/grade_id, points) of every auto-graded test
    max_score: float
    digest: str  # of the masters and the library: part of every submission's manifest key


def _file_digest(paths) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(str(Path(path).name).encode() + b"\0" + Path(path).read_bytes())
    return h.hexdigest()


def _library_digest() -> str:
    import quantcourse

    return _file_digest(sorted(Path(quantcourse.__path__[0]).rglob("*.py")))


def _discover_targets(course: Course, master_path: Path, limits, sandbox: bool) -> list[str]:
    """The targets the master's hidden tests ``forbid``: found by grading the master itself, cached."""
    from . import hidden
    from .sandbox import build_library_view
    from .trusted import Master, TrustedGrader

    cache = course.work / "trusted" / "targets"
    digest = _file_digest([master_path]) + _library_digest()[:16]
    path = cache / f"{master_path.parent.name}__{master_path.stem}__{digest[:20]}.json"
    if path.is_file():
        return json.loads(path.read_text())
    master = Master(master_path)
    view = build_library_view([], course.work / "trusted" / "plain")
    before = set(hidden.FORBIDDEN)
    hidden.FORBIDDEN.clear()
    try:
        TrustedGrader(master, view, limits, timeout=1800, isolate=sandbox).grade(master.nb)
        targets = sorted(hidden.FORBIDDEN)
    finally:
        hidden.FORBIDDEN.clear()
        hidden.FORBIDDEN.update(before)
    cache.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(targets))
    return targets


def _plan(course: Course, assignment: str, limits, sandbox: bool) -> _Plan:
    from .sandbox import library_view_for
    from .trusted import Master

    names = course.notebooks(assignment)
    masters = [course.source / assignment / n for n in names]
    targets = sorted({t for m in masters for t in _discover_targets(course, m, limits, sandbox)})
    view = library_view_for(targets, course.work / "trusted" / "views")
    points = []
    for name, path in zip(names, masters, strict=True):
        for cell in Master(path).tests:
            meta = cell_meta(Master(path).nb.cells[cell.index])
            points.append((f"{Path(name).stem}/{cell.grade_id}", float(meta.get("points", 0))))
    return _Plan(
        assignment,
        tuple(names),
        tuple(map(str, masters)),
        (view.mounts, view.runtime, view.stripped),
        tuple(points),
        sum(p for _, p in points),
        _file_digest(masters) + _library_digest()[:16],
    )


def cell_meta(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {}) or {}


# ----------------------------------------------------------------------------------------- the workers

_SLOT = 0


def _init_worker(slots) -> None:
    global _SLOT
    _SLOT = slots.get()
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _submission_digest(folder: Path, plan: _Plan) -> str:
    files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
    h = hashlib.sha256(plan.digest.encode())
    for path in files:
        h.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _grade_job(job: dict) -> dict:
    """Grade one (student, assignment) through the trusted path (runs in a worker process)."""
    import torch

    from .sandbox import LibraryView, Limits
    from .trusted import Master, TrustedGrader

    torch.set_num_threads(1)
    plan: _Plan = job["plan"]
    limits = Limits(**job["limits"])
    folder, staged = Path(job["folder"]), Path(job["staged"])
    started = time.monotonic()
    problem = _check_submission(folder, list(plan.notebooks))
    base = {"student": job["student"], "assignment": plan.assignment, "max_score": plan.max_score}
    if problem:
        return {**base, "score": 0.0, "status": problem, "tests": {}}
    view = LibraryView(*plan.view)
    key = job["key"].encode()
    earned, problems, tests = 0.0, [], {}
    points = dict(plan.points)
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    for name, master_path in zip(plan.notebooks, plan.masters, strict=True):
        left = job["timeout"] - (time.monotonic() - started)
        grader = TrustedGrader(
            Master(master_path), view, limits, slot=_SLOT, timeout=max(left, 1), isolate=job["sandbox"]
        )
        result = grader.grade(nbformat.read(folder / name, as_version=4))
        problems += result.problems
        for test in result.tests:
            ident = f"{Path(name).stem}/{test.grade_id}"
            tests[ident] = test.passed
            earned += points.get(ident, 0.0) if test.passed else 0.0
        nbformat.write(sign(key, result.notebook), staged / name)
    if time.monotonic() - started > job["timeout"]:
        problems.insert(0, f"grading ran past {job['timeout']:g} s; the tests left were failed")
    status = "ok" if not problems else "graded, but " + "; ".join(problems)[:1000]
    return {**base, "score": earned, "status": status, "tests": tests}


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"i/N"`` (0 <= i < N) as ``(i, N)``; ``None`` for no sharding. Raises ValueError when malformed."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match or not 0 <= int(match[1]) < int(match[2]):
        raise ValueError(f"--shard {text!r}: expected i/N with 0 <= i < N, e.g. 0/4 ... 3/4")
    return int(match[1]), int(match[2])


def _in_shard(student: str, assignment: str, shard: tuple[int, int] | None) -> bool:
    if shard is None:
        return True
    h = int(hashlib.sha256(f"{assignment}/{student}".encode()).hexdigest()[:12], 16)
    return h % shard[1] == shard[0]


class _Manifest:
    """``out/manifest.json``: finished (student, assignment) results keyed on their submission's hash."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.entries = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, json.JSONDecodeError):
            self.entries = {}

    def done(self, key: str, digest: str) -> dict | None:
        entry = self.entries.get(key)
        return entry["result"] if entry and entry.get("digest") == digest else None

    def record(self, key: str, digest: str, result: dict) -> None:
        self.entries[key] = {"digest": digest, "result": result}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.entries, indent=1, sort_keys=True))
        tmp.replace(self.path)


def _run_jobs(jobs: list[dict], workers: int, progress: bool, on_done) -> None:
    """Run ``jobs`` on ``workers`` processes; a worker that dies costs only its own job."""
    if not jobs:
        return
    ctx = multiprocessing.get_context("spawn")
    pending = list(jobs)
    bar = progress_bar(total=len(jobs), desc="autograde", unit="submission", disable=not progress)
    while pending:
        slots = ctx.Queue()
        for slot in range(workers):
            slots.put(slot)
        broken = False
        with concurrent.futures.ProcessPoolExecutor(
            max_workers=min(workers, len(pending)), mp_context=ctx, initializer=_init_worker, initargs=(slots,)
        ) as pool:
            futures = {pool.submit(_grade_job, job): job for job in pending}
            for future in concurrent.futures.as_completed(futures):
                job = futures[future]
                try:
                    result = future.result()
                except concurrent.futures.process.BrokenProcessPool:
                    broken = True
                    continue
                except Exception as err:  # noqa: BLE001 - one failed grading never stops the rest
                    result = {
                        "student": job["student"],
                        "assignment": job["plan"].assignment,
                        "score": 0.0,
                        "max_score": job["plan"].max_score,
                        "status": f"error: the grader failed ({type(err).__name__}: {str(err)[:200]})",
                        "tests": {},
                    }
                pending.remove(job)
                on_done(job, result)
                bar.update(1)
        if broken and pending:  # the pool died: the job running when it did is reported, the rest re-run
            job = pending.pop(0)
            on_done(
                job,
                {
                    "student": job["student"],
                    "assignment": job["plan"].assignment,
                    "score": 0.0,
                    "max_score": job["plan"].max_score,
                    "status": "error: the grading worker died on this submission",
                    "tests": {},
                },
            )
            bar.update(1)
    bar.close()


def _record(course: Course, assignment: str, timeout: float) -> str | None:
    """Store the signed notebooks of ``assignment`` in the gradebook (nbgrader, nothing executed)."""
    if not any(course.step_dir("submitted").glob(f"*/{assignment}/*.ipynb")):
        return None
    run = run_nbgrader(course, "autograde", assignment, "--force", timeout=timeout)
    return None if run.ok else run.reason()


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
    sandbox: bool = True,
    workers: int | None = None,
    resume: bool = False,
    shard: tuple[int, int] | str | None = None,
    limits=None,
    similarity: bool = True,
) -> list[Grade]:
    """Autograde ``submissions`` (``<student>/<assignment>/*.ipynb``) for ``course``.

    Every student is graded for every assignment that appears in ``submissions`` (a student without it
    gets ``missing``): exactly one :class:`Grade` per (student, assignment). Feedback HTML goes to
    ``out/feedback/<student>/<assignment>/``, the grades to ``out/grades.csv`` (columns
    :data:`CSV_FIELDS`), the signed graded notebooks to ``out/trusted/`` (what :func:`merge_grades`
    combines); the gradebook in ``course.work`` keeps the results for nbgrader's formgrader.

    Args:
        course: the course (its masters in ``course.source`` hold the hidden tests).
        submissions: the folder of submissions.
        out: where feedback, ``grades.csv`` and ``manifest.json`` are written.
        timeout: seconds one (student, assignment) may take in all.
        progress: show a progress bar.
        generate: store the assignments in the gradebook first (see :func:`prepare`).
        feedback: generate feedback HTML.
        batch: kept for callers of the old interface; grading is always per submission.
        sandbox: run students' code in the bubblewrap sandbox. ``False`` runs it in a plain process:
            only for notebooks you trust (the masters, a release).
        workers: grading processes side by side (default: one per core, one per GPU when there are GPUs).
        resume: skip (student, assignment) pairs already graded with the same submission and masters.
        shard: ``(i, n)`` or ``"i/n"``: grade only the deterministic i-th of n slices.
        limits: :class:`~quantcourse.grading.sandbox.Limits` (default: the cell timeout of ``course``).
        similarity: write ``out/similarity/<assignment>.csv`` and ``.md``, near-copies for review
            (:mod:`~quantcourse.grading.similarity`; grades are never changed by it).

    Raises:
        ValueError: ``submissions`` is not a folder, or an option is malformed.
        SandboxUnavailable: ``sandbox`` is on and bubblewrap cannot make a sandbox here.
    """
    from .sandbox import Limits, SandboxUnavailable, sandbox_problem

    submissions, out = Path(submissions).resolve(), Path(out).resolve()
    if not submissions.is_dir():
        raise ValueError(f"{submissions} is not a folder of <student>/<assignment>/*.ipynb submissions")
    shard = parse_shard(shard) if isinstance(shard, str) else shard
    workers = workers or _default_workers()
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if sandbox and (why := sandbox_problem()):
        raise SandboxUnavailable(
            f"{why}. Students' code is only graded inside the sandbox; to grade notebooks you trust "
            "without it (your own masters), pass --no-sandbox"
        )
    limits = limits or Limits(call_timeout=course.cell_timeout)
    staging = course.step_dir("submitted")
    if submissions == staging or staging in submissions.parents:  # `nbgrader collect` put them there
        snapshot = course.work / "collected"  # the grader stages signed notebooks in submitted/
        shutil.rmtree(snapshot, ignore_errors=True)
        shutil.copytree(submissions, snapshot)
        submissions = snapshot
    students = sorted(d.name for d in submissions.iterdir() if d.is_dir() and not d.name.startswith("."))
    named = sorted({a.name for s in students for a in (submissions / s).iterdir() if a.is_dir()})
    known = set(course.assignments())
    grades = [
        Grade(s, a, 0.0, 0.0, f"error: no assignment {a!r} in {course.source}")
        for a in named
        if a not in known
        for s in students
        if (submissions / s / a).is_dir() and _in_shard(s, a, shard)
    ]
    assignments = [a for a in named if a in known]
    failed = prepare(course, assignments) if generate else {}
    grades += [
        Grade(s, a, 0.0, 0.0, f"error: could not prepare the assignment: {why}")
        for a, why in failed.items()
        for s in students
        if _in_shard(s, a, shard)
    ]
    out.mkdir(parents=True, exist_ok=True)
    manifest = _Manifest(out / "manifest.json")
    key = _key(course).decode()
    plans = {a: _plan(course, a, limits, sandbox) for a in assignments if a not in failed}
    results: dict[tuple[str, str], dict] = {}
    jobs = []
    for assignment, plan in plans.items():
        for student in students:
            if not _in_shard(student, assignment, shard):
                continue
            folder = submissions / student / assignment
            digest = _submission_digest(folder, plan)
            staged = course.step_dir("submitted") / student / assignment
            done = manifest.done(f"{assignment}/{student}", digest) if resume else None
            if done is not None and (done["status"].startswith("missing") or staged.is_dir()):
                results[(student, assignment)] = done
                continue
            shutil.rmtree(staged, ignore_errors=True)
            jobs.append(
                {
                    "student": student,
                    "plan": plan,
                    "folder": str(folder),
                    "staged": str(staged),
                    "digest": digest,
                    "key": key,
                    "timeout": timeout,
                    "sandbox": sandbox,
                    "limits": dataclasses.asdict(limits),
                }
            )

    def on_done(job, result):
        results[(job["student"], job["plan"].assignment)] = result
        manifest.record(f"{job['plan'].assignment}/{job['student']}", job["digest"], result)

    _run_jobs(jobs, workers, progress, on_done)
    graded = []
    for assignment in plans:
        why = _record(course, assignment, timeout=max(600, 5 * len(students)))
        for (student, a), r in sorted(results.items()):
            if a != assignment:
                continue
            status = r["status"]
            if why and status.startswith(("ok", "graded")):
                status = f"error: nbgrader could not record the grade: {why}"
            graded.append(Grade(student, a, float(r["score"]), float(r["max_score"]), status))
        staged_root = course.step_dir("submitted")
        for folder in staged_root.glob(f"*/{assignment}"):
            if (folder.parent.name, assignment) in results and _in_shard(folder.parent.name, assignment, shard):
                target = out / "trusted" / folder.parent.name / assignment
                shutil.rmtree(target, ignore_errors=True)
                shutil.copytree(folder, target)
    graded = _check_gradebook(course, graded)
    for assignment in plans if feedback else []:
        graded = _feedback(course, assignment, graded, out, timeout)
    if (out / "feedback").is_dir():
        offline_math(out / "feedback")
    for plan in plans.values() if similarity else []:
        _similarity(course, plan, submissions, students, out)
    grades = sorted(grades + graded, key=lambda g: (g.assignment, g.student))
    write_grades_csv(grades, out / "grades.csv")
    return grades


def _similarity(course: Course, plan: _Plan, submissions: Path, students: list[str], out: Path) -> None:
    """The similarity report of one assignment, per notebook (never fails the grading)."""
    from .similarity import similarity_report

    for name, master in zip(plan.notebooks, plan.masters, strict=True):
        found = {s: submissions / s / plan.assignment / name for s in students}
        found = {s: p for s, p in found.items() if p.is_file()}
        label = plan.assignment if len(plan.notebooks) == 1 else f"{plan.assignment}__{Path(name).stem}"
        try:
            similarity_report(label, master, found, targets=list(plan.view[2]), out=out / "similarity")
        except Exception as err:  # noqa: BLE001 - a report, never a reason to lose grades
            (out / "similarity").mkdir(parents=True, exist_ok=True)
            (out / "similarity" / f"{label}.md").write_text(f"similarity report failed: {err}\n")


def _default_workers() -> int:
    try:
        import torch

        if torch.cuda.is_available():
            return max(1, torch.cuda.device_count())
    except ImportError:
        pass
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _check_gradebook(course: Course, grades: list[Grade]) -> list[Grade]:
    """Each graded row's score as the gradebook holds it; a mismatch with the trusted score is an error."""
    from nbgrader.api import Gradebook, MissingEntry

    checked = []
    with Gradebook(course.db_url, "quantcourse") as gb:
        for g in grades:
            if not g.status.startswith(("ok", "graded")):
                checked.append(g)
                continue
            try:
                stored = float(gb.find_submission(g.assignment, g.student).score)
            except MissingEntry:
                stored = float("nan")
            if not abs(stored - g.score) <= 1e-9:
                g = dataclasses.replace(
                    g, status=f"error: the gradebook holds {stored:g}, the trusted grading {g.score:g}"
                )
            checked.append(g)
    return checked


def merge_grades(course: Course, parts: list[str | Path], *, out: str | Path, feedback: bool = True) -> list[Grade]:
    """Combine the ``out`` folders of shards (``autograde(..., shard=(i, n))``) into one gradebook and CSV.

    The shards' signed notebooks (``<part>/trusted/``) are stored in ``course``'s gradebook (re-signed
    with this course's key: the parts are the instructor's own grading outputs), their grades.csv rows
    are combined (a (student, assignment) in two parts is an error), and feedback is generated.
    """
    out = Path(out).resolve()
    rows: dict[tuple[str, str], Grade] = {}
    for part in map(Path, parts):
        csv_path = part / "grades.csv"
        if not csv_path.is_file():
            raise ValueError(f"{part} holds no grades.csv: is it the --out folder of a sharded autograde?")
        for row in csv.DictReader(csv_path.open()):
            grade = Grade(
                row["student"], row["assignment"], float(row["score"]), float(row["max_score"]), row["status"]
            )
            if (grade.student, grade.assignment) in rows:
                raise ValueError(f"{grade.student}/{grade.assignment} is graded in two parts (one is {part})")
            rows[(grade.student, grade.assignment)] = grade
    key = _key(course)
    assignments = sorted({a for _, a in rows})
    failed = prepare(course, assignments)
    for part in map(Path, parts):
        for nb_path in sorted((part / "trusted").glob("*/*/*.ipynb")):
            student, assignment = nb_path.parent.parent.name, nb_path.parent.name
            target = course.step_dir("submitted") / student / assignment / nb_path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            nbformat.write(sign(key, nbformat.read(nb_path, as_version=4)), target)
    graded = list(rows.values())
    for assignment in assignments:
        why = failed.get(assignment) or _record(course, assignment, timeout=600)
        if why:
            graded = [
                dataclasses.replace(g, status=f"error: nbgrader could not record the grade: {why}")
                if g.assignment == assignment and g.status.startswith(("ok", "graded"))
                else g
                for g in graded
            ]
    graded = _check_gradebook(course, graded)
    for assignment in assignments if feedback else []:
        graded = _feedback(course, assignment, graded, out, 600)
    if (out / "feedback").is_dir():
        offline_math(out / "feedback")
    graded = sorted(graded, key=lambda g: (g.assignment, g.student))
    write_grades_csv(graded, out / "grades.csv")
    return graded


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
