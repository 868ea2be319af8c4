"""The one timing harness every benchmark in this folder uses.

Three rules, so that figures from different benchmarks can be compared and trusted:

* **Same statistic everywhere**: :func:`measure` runs a warm-up call, then ``repeats`` timed calls,
  and reports the median wall time together with the median CPU time of this process. On a shared
  machine other processes stretch the wall time of every column alike; the CPU time of a
  single-threaded job barely moves, so both are recorded and the results say which one a table uses.
* **Equal results before any timing**: :func:`check_equal` raises :class:`Mismatch` (the run fails
  with a message naming what differed) instead of printing "no" into a table.
* **One script run writes one results file**, headed by :func:`environment_lines`: date, CPU, core
  count, load average, Python, torch and every peer's version.

Use::

    from harness import check_equal, environment_lines, measure, write_results

    check_equal(ours(), theirs(), what="Q4_K bytes")          # first: same answer
    t = measure(ours, repeats=7)                                # then: how fast
    write_results("results/x.md", "# title", environment_lines(["gguf"]), table)
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["Mismatch", "Timing", "measure", "check_equal", "environment_lines", "cpu_name", "write_results"]


class Mismatch(AssertionError):
    """Two implementations disagree: the benchmark stops before timing anything."""


@dataclass(frozen=True)
class Timing:
    """Median seconds of the timed calls: wall clock and this process's CPU time (all threads)."""

    wall: float
    cpu: float
    repeats: int

    def per_second(self, amount: float, *, cpu: bool = False) -> float:
        """``amount`` (bytes, weights, tokens) per second of the median call."""
        return amount / (self.cpu if cpu else self.wall)


def measure(
    fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1, sync: Callable[[], None] | None = None
) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls (allocator, lazy imports, autotuning), then ``repeats`` timed ones.

    Args:
        fn: the job, with its inputs bound (``lambda: quantize(x)``).
        repeats: timed calls; the medians are reported.
        warmup: untimed calls first.
        sync: called after each call before the clock stops (``torch.cuda.synchronize`` on a GPU).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    for _ in range(warmup):
        fn()
        if sync is not None:
            sync()
    walls, cpus = [], []
    for _ in range(repeats):
        wall0, cpu0 = time.perf_counter(), time.process_time()
        fn()
        if sync is not None:
            sync()
        walls.append(time.perf_counter() - wall0)
        cpus.append(time.process_time() - cpu0)
    return Timing(wall=statistics.median(walls), cpu=statistics.median(cpus), repeats=repeats)


def _as_numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def check_equal(ours, theirs, *, what: str, atol: float = 0.0, rtol: float = 0.0) -> None:
    """Raise :class:`Mismatch` unless ``ours`` equals ``theirs`` (exactly, or within ``atol``/``rtol``).

    Tensors, numpy arrays or bytes; shapes must match. With the default tolerances the comparison is
    exact (bytes, integer codes); give tolerances for floating-point results and say why at the call.
    """
    a, b = _as_numpy(ours), _as_numpy(theirs)
    if a.shape != b.shape:
        raise Mismatch(f"{what}: shapes differ, ours {a.shape} against {b.shape}")
    if atol == 0.0 and rtol == 0.0:
        differ = a != b
    else:
        differ = ~np.isclose(a.astype(np.float64), b.astype(np.float64), atol=atol, rtol=rtol)
    n = int(np.count_nonzero(differ))
    if n:
        first = np.argwhere(differ)[0]
        raise Mismatch(
            f"{what}: {n} of {a.size} values differ (first at index {tuple(int(i) for i in first)}: "
            f"ours {a[tuple(first)]!r}, theirs {b[tuple(first)]!r}); no timing is meaningful until they agree"
        )


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment_lines(peers: Iterable[str] = (), *, device: str | None = None) -> list[str]:
    """Markdown bullet lines naming when and where a run happened, and the versions it ran with.

    Args:
        peers: distribution names of the tools compared against (``"gguf"``, ``"bitsandbytes"``).
        device: what ran the job (``"cpu"``, or a GPU's name); CUDA's device 0 when None and present.
    """
    if device is None:
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    versions = ", ".join(f"{p} {_version(p)}" for p in ["quantcourse", *peers])
    load = os.getloadavg()[0]
    return [
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- machine: {cpu_name()}, {os.cpu_count()} logical cores; device: {device}",
        f"- load average at the start: {load:.1f}"
        + (" (above the core count: the cores were shared)" if load > (os.cpu_count() or 1) else ""),
        f"- Python {platform.python_version()}, torch {torch.__version__}, {versions}",
        f"- torch threads: {torch.get_num_threads()}",
    ]


def write_results(path: str | os.PathLike, title: str, environment: Sequence[str], *sections: str) -> Path:
    """Write one results file: ``title``, the environment lines, then each section; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "\n\n".join([title, "\n".join(environment), *sections])
    path.write_text(body.rstrip() + "\n")
    return path
