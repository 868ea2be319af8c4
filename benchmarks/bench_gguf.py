"""Quantization throughput of quantcourse.gguf against gguf-py and llama.cpp's C reference.

Chapter 11. Quantizes a seeded float32 matrix (default 4096 x 4096) with each format and reports
millions of weights per second for: quantcourse.gguf (vectorized PyTorch), gguf-py (numpy; it only
has the legacy quantizers) and llama.cpp's single-threaded C reference (``ggml_quantize_chunk`` from
a built ``libggml-base.so``: set ``QUANTCOURSE_LIBGGML`` or install llama-cpp-python; skipped
otherwise). It also checks that the three produce identical bytes. Writes ``results/gguf.md``.

    python benchmarks/bench_gguf.py [rows] [cols]

Ours is timed on one thread (the fair comparison with the C reference) and on every core.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
import time

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gq

import quantcourse.gguf as qg

HERE = os.path.dirname(os.path.abspath(__file__))
LEGACY = {"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"}


def _cref():
    spec = importlib.util.spec_from_file_location(
        "cref", os.path.join(HERE, "..", "tests", "golden", "gguf", "cref.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    path = mod.find_libggml()
    return None if path is None else mod.CQuantizer(path)


def _time(fn, repeat: int = 3) -> tuple[float, object]:
    """Best wall time of ``repeat`` calls, and the last call's result."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(rows: int = 4096, cols: int = 4096) -> None:
    torch.manual_seed(0)
    x = torch.randn(rows, cols)
    n = x.numel()
    cq = _cref()
    all_threads = torch.get_num_threads()
    lines = [
        f"| format | quantcourse, 1 thread (M w/s) | quantcourse, {all_threads} threads (M w/s) | gguf-py (M w/s) "
        "| llama.cpp C ref, 1 thread (M w/s) | identical bytes |",
        "|---|---|---|---|---|---|",
    ]
    for name in qg.FORMATS:
        cells, same = [], []
        for threads in (1, all_threads):  # the C reference runs on one thread: the first column is the fair one
            torch.set_num_threads(threads)
            t_ours, ours = _time(lambda name=name: qg.quantize(x, name))
            cells.append(f"{n / t_ours / 1e6:.2f}")
        if name in LEGACY:
            t_py, theirs = _time(lambda name=name: gq.quantize(x.numpy(), GGMLQuantizationType[name]))
            cells.append(f"{n / t_py / 1e6:.2f}")
            same.append(np.array_equal(ours, theirs))
        else:
            cells.append("(no quantizer)")
        if cq is not None:
            t_c, ref = _time(lambda name=name: cq.quantize(x.numpy(), name))
            cells.append(f"{n / t_c / 1e6:.2f}")
            same.append(np.array_equal(ours, ref))
        else:
            cells.append("(library not found)")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'yes' if all(same) else 'NO'} |")
        print(lines[-1], flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    header = [
        "# GGUF quantization throughput",
        "",
        f"`python benchmarks/bench_gguf.py {rows} {cols}`: a seeded {rows} x {cols} float32 matrix,",
        "best of 3 runs per cell,",
        f"torch {torch.__version__}, {platform.processor() or platform.machine()},",
        f"{os.cpu_count()} CPUs, load average {load:.1f} when it finished"
        + (f"; llama.cpp ggml {cq.version} ({cq.commit})." if cq else "."),
        "",
    ]
    with open(os.path.join(HERE, "results", "gguf.md"), "w") as f:
        f.write("\n".join(header + lines) + "\n")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
