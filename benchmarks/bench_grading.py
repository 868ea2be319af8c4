"""Grading throughput: 200 generated submissions of one assignment through the trusted, sandboxed path.

The submissions of ``a02_absmax_zeropoint`` are generated from its release, of mixed quality: correct
answers in several styles, typical mistakes (dividing by 2^(n-1), truncating the zero point, converting
before clamping, uint8 wrap-around), unanswered functions, shortcuts to the library, a syntax error, an
endless loop and a killed kernel. They are graded by ``quantcourse autograde`` with the sandbox on, one
worker per core, feedback and the similarity report included, in a temporary course root. Before timing
counts, the scores are checked against what each generated submission earns.

Run: ``python benchmarks/bench_grading.py [--n 200] [--workers 2]``. Writes
``benchmarks/results/grading.md``. Goal: 200 submissions in under 10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import shutil
import tempfile
import time
from pathlib import Path

import nbformat
import torch

RESULTS = Path(__file__).parent / "results" / "grading.md"
ROOT = Path(__file__).resolve().parents[1]
ASSIGNMENT = "a02_absmax_zeropoint"

# (source, points it earns) per answer cell; several right styles and the usual mistakes
ANSWERS = {
    "absmax_scale": [
        (
            "def absmax_scale(x, n_bits):\n    qmax = 2 ** (n_bits - 1) - 1\n"
            "    return (x.detach().float().abs().amax() / qmax).clamp(min=EPS)\n",
            2,
        ),
        (
            "def absmax_scale(x, n_bits):\n    m = torch.max(torch.abs(x.float()))\n"
            "    return torch.clamp(m / (2**(n_bits-1) - 1), min=EPS)\n",
            2,
        ),
        ("def absmax_scale(x, n_bits):\n    return (x.abs().amax() / 2 ** (n_bits - 1)).clamp(min=EPS)\n", 0),
        ("def absmax_scale(x, n_bits):\n    return qc.choose_qparams(x, n_bits, symmetric=True).scale\n", 0),
    ],
    "zeropoint_qparams": [
        (
            "def zeropoint_qparams(x, n_bits):\n    qmax = 2**n_bits - 1\n    x = x.detach().float()\n"
            "    lo, hi = x.amin().clamp(max=0), x.amax().clamp(min=0)\n"
            "    scale = ((hi - lo) / qmax).clamp(min=EPS)\n"
            "    return scale, torch.round(-lo / scale).clamp(0, qmax).to(torch.int32)\n",
            2,
        ),
        (
            "def zeropoint_qparams(x, n_bits):\n    qmax = 2**n_bits - 1\n    x = x.float()\n"
            "    lo, hi = x.amin().clamp(max=0), x.amax().clamp(min=0)\n"
            "    scale = ((hi - lo) / qmax).clamp(min=EPS)\n"
            "    return scale, (-lo / scale).floor().clamp(0, qmax).to(torch.int32)\n",
            0,
        ),
    ],
    "quantize": [
        (
            "def quantize(x, scale, zero_point, n_bits, symmetric):\n"
            "    if symmetric:\n        lo, hi, dt = -(2 ** (n_bits - 1) - 1), 2 ** (n_bits - 1) - 1, torch.int8\n"
            "    else:\n        lo, hi, dt = 0, 2**n_bits - 1, torch.uint8\n"
            "    return (torch.round(x.detach().float() / scale) + zero_point).clamp(lo, hi).to(dt)\n",
            2,
        ),
        (
            "def quantize(x, scale, zero_point, n_bits, symmetric):\n"
            "    dt = torch.int8 if symmetric else torch.uint8\n"
            "    return (torch.round(x / scale) + zero_point).to(dt)\n",
            0,
        ),
    ],
    "dequantize": [
        ("def dequantize(q, scale, zero_point):\n    return (q.to(torch.int32) - zero_point).float() * scale\n", 2),
        ("def dequantize(q, scale, zero_point):\n    return (q - zero_point).float() * scale\n", 0),
    ],
    "fake_quantize": [
        (
            "def fake_quantize(x, n_bits, symmetric=True):\n    if symmetric:\n"
            "        scale, zp = absmax_scale(x, n_bits), torch.zeros((), dtype=torch.int32)\n"
            "    else:\n        scale, zp = zeropoint_qparams(x, n_bits)\n"
            "    return dequantize(quantize(x, scale, zp, n_bits, symmetric), scale, zp).to(x.dtype)\n",
            2,
        ),
        (
            "def fake_quantize(x, n_bits, symmetric=True):\n"
            "    return qc.fake_quantize(x, n_bits, symmetric=symmetric)\n",
            0,
        ),
    ],
}
SPECIAL = {
    "syntax_error": ("def absmax_scale(x, n_bits)\n    return 1\n", 0),
    "endless_loop": ("def absmax_scale(x, n_bits):\n    while True:\n        pass\n", 0),
    "kills_kernel": ("import os\ndef absmax_scale(x, n_bits):\n    os._exit(1)\n", 0),
}


def generate(release_nb: Path, folder: Path, n: int, seed: int = 0) -> dict[str, float]:
    """Write ``n`` submissions; returns what each one earns (out of 10)."""
    rng = random.Random(seed)
    expected = {}
    for i in range(n):
        student = f"student{i:03d}"
        nb = nbformat.read(release_nb, as_version=4)
        chosen = {}
        for grade_id, options in ANSWERS.items():
            r = rng.random()
            chosen[grade_id] = options[0] if r < 0.55 else rng.choice(options) if r < 0.9 else None
        if i % 40 == 7:  # a few pathological ones, each costing only its own part
            kind = ["syntax_error", "endless_loop", "kills_kernel"][(i // 40) % 3]
            chosen["absmax_scale"] = SPECIAL[kind]
        earned = 0.0
        for grade_id, pick in chosen.items():
            if pick is None:
                continue  # left unanswered
            for cell in nb.cells:
                if cell.metadata.get("nbgrader", {}).get("grade_id") == grade_id:
                    cell.source = pick[0]
        # fake_quantize passes if the functions it uses are right (a quantize without the clamp passes
        # inside fake_quantize too: the range comes from x itself, so nothing leaves it)
        ok = {g: (p is not None and p[1] > 0) for g, p in chosen.items()}
        earned = sum(2.0 for g in ("absmax_scale", "zeropoint_qparams", "quantize", "dequantize") if ok[g])
        no_clamp = chosen["quantize"] is not None and chosen["quantize"][0] == ANSWERS["quantize"][1][0]
        parts = ("absmax_scale", "zeropoint_qparams", "dequantize") + (() if no_clamp else ("quantize",))
        if ok["fake_quantize"] and all(ok[g] for g in parts):
            earned += 2.0
        expected[student] = earned
        (folder / student / ASSIGNMENT).mkdir(parents=True)
        nbformat.write(nb, folder / student / ASSIGNMENT / f"{ASSIGNMENT}.ipynb")
    return expected


def _cpu_seconds() -> float:
    import resource

    return sum(
        r.ru_utime + r.ru_stime
        for r in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    )


def main() -> None:
    from quantcourse.grading.autograde import autograde
    from quantcourse.grading.config import Course, write_config
    from quantcourse.grading.release import release
    from quantcourse.grading.sandbox import Limits

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--no-write", action="store_true", help="do not write benchmarks/results/grading.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-grading-") as tmp:
        tmp = Path(tmp)
        course = Course.at(tmp / "root", source=ROOT / "solutions", cell_timeout=20)
        write_config(course)
        release(course, [ASSIGNMENT])
        expected = generate(course.release / ASSIGNMENT / f"{ASSIGNMENT}.ipynb", tmp / "subs", args.n)
        # warm the per-assignment caches (forbidden functions, stripped library) outside the timing
        shutil.copytree(tmp / "subs" / "student000", tmp / "warm" / "student000")
        autograde(course, tmp / "warm", out=tmp / "warm_out", progress=False, workers=1, feedback=False)
        cpu_before = _cpu_seconds()
        started = time.monotonic()
        grades = autograde(
            course,
            tmp / "subs",
            out=tmp / "out",
            progress=True,
            workers=args.workers,
            limits=Limits(call_timeout=20),
            timeout=300,
        )
        seconds = time.monotonic() - started
        cpu = _cpu_seconds() - cpu_before
        wrong = [(g.student, g.score, expected[g.student], g.status) for g in grades if g.score != expected[g.student]]
        statuses = {}
        for g in grades:
            key = g.status.split(":")[0]
            statuses[key] = statuses.get(key, 0) + 1
    print(f"{len(grades)} submissions in {seconds:.0f} s ({seconds / len(grades):.2f} s each, {args.workers} workers)")
    print(
        f"CPU time (grader, workers, sandboxes, nbgrader): {cpu:.0f} s "
        f"= {cpu / args.workers:.0f} s on {args.workers} idle cores"
    )
    print("statuses:", statuses)
    if wrong:
        print("scores that differ from what was earned:", *wrong[:10], sep="\n  ")
    if args.no_write:
        return
    load = os.getloadavg()[0]
    RESULTS.write_text(
        "# Grading throughput\n\n"
        f"`python benchmarks/bench_grading.py --n {args.n} --workers {args.workers}`, "
        f"{datetime.date.today().isoformat()}: {args.n} generated submissions of `{ASSIGNMENT}` (mixed quality: "
        "correct in several styles, typical mistakes, unanswered parts, library shortcuts, a syntax error, "
        "endless loops, killed kernels) graded by `quantcourse autograde` through the trusted path: bubblewrap "
        "sandbox, tests in the grader, nbgrader gradebook, feedback HTML and similarity report included.\n\n"
        f"Machine: {platform.machine()}, {len(os.sched_getaffinity(0))} CPUs, Python {platform.python_version()}, "
        f"torch {torch.__version__}; load average {load:.1f} when it finished (the machine is shared).\n\n"
        "| submissions | workers | wall time (s) | s per submission | CPU time, all processes (s) | "
        "CPU time / cores (s) | scores equal to what was earned |\n"
        "|---|---|---|---|---|---|---|\n"
        f"| {len(grades)} | {args.workers} | {seconds:.0f} | {seconds / len(grades):.2f} | {cpu:.0f} | "
        f"{cpu / args.workers:.0f} | {len(grades) - len(wrong)} of {len(grades)} |\n\n"
        "CPU time counts the grader, its workers, every sandbox and the nbgrader runs (getrusage of the "
        "process and its children); divided by the cores it is the wall time this run needs on idle cores.\n\n"
        f"Statuses: {', '.join(f'{k}: {v}' for k, v in sorted(statuses.items()))}.\n\n"
        f"Goal: 200 submissions in under 10 minutes on 2 cores. This run: {seconds / len(grades) * 200 / 60:.1f} min "
        f"of wall time per 200 on this shared machine, {cpu / args.workers / len(grades) * 200 / 60:.1f} min of CPU "
        f"time per core per 200 (the wall time on {args.workers} idle cores).\n"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
