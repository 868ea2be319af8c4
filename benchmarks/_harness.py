"""What every benchmark shares: one timing statistic, bytes checked before timing, the machine and versions.

- :func:`median_seconds`: the median of ``repeats`` timed calls after one warm-up (``sync`` waits for a GPU).
  Every figure in ``results/`` is this statistic, so tables compare.
- :func:`check_same`: the outputs of ours and the peer must agree *before* anything is timed; a mismatch
  raises :class:`OutputMismatch` and the run stops, instead of printing a table with "NO" in it.
- :func:`machine_description`: date, device, CPU, core count, Python, torch and the given packages' versions,
  and the load average, as markdown bullet lines for the results file the same run writes.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch

__all__ = ["OutputMismatch", "check_same", "median_seconds", "cpu_name", "machine_description"]


class OutputMismatch(AssertionError):
    """Ours and the peer disagree: a speed comparison of different results means nothing."""


def median_seconds(fn: Callable[[], object], repeats: int = 5, sync: Callable[[], None] = lambda: None) -> float:
    """Median wall time of ``repeats`` calls of ``fn`` after one warm-up call (allocator, lazy imports)."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()  # on a GPU, wait for the kernels before stopping the clock
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def check_same(what: str, ours, theirs) -> None:
    """Raise :class:`OutputMismatch` unless ``ours`` and ``theirs`` (tensors or arrays) are identical."""
    a = ours.detach().cpu().numpy() if isinstance(ours, torch.Tensor) else np.asarray(ours)
    b = theirs.detach().cpu().numpy() if isinstance(theirs, torch.Tensor) else np.asarray(theirs)
    if a.shape != b.shape or not np.array_equal(a, b):
        where = int((a != b).sum()) if a.shape == b.shape else "shapes differ"
        raise OutputMismatch(f"{what}: outputs differ ({where} elements); fix this before timing anything")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description(device: torch.device | str = "cpu", packages: Iterable[str] = ()) -> list[str]:
    """Markdown bullet lines: when, on what, with which versions."""
    device = torch.device(device)
    versions = []
    for name in ("quantcourse", *packages):
        try:
            versions.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            versions.append(f"{name} (not installed)")
    lines = [
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        f"- CPU: {cpu_name()}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads",
        f"- Python {platform.python_version()}, torch {torch.__version__}, " + ", ".join(versions),
    ]
    if hasattr(os, "getloadavg"):
        lines.append(
            f"- load average at the end of the run: {os.getloadavg()[0]:.1f} (a busy machine slows every column)"
        )
    return lines
