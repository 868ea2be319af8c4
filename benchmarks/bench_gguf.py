"""Quantization throughput of quantcourse.gguf against gguf-py and llama.cpp's C reference.

Chapter 11. Quantizes a seeded float32 matrix (default 4096 x 4096) with each format and reports
millions of weights per second for: quantcourse.gguf (vectorized PyTorch), gguf-py (numpy; it only
has the legacy quantizers) and llama.cpp's single-threaded C reference (``ggml_quantize_chunk`` from
a built ``libggml-base.so``: set ``QUANTCOURSE_LIBGGML`` or install llama-cpp-python; skipped
otherwise). The three must produce identical bytes before anything is timed. Writes ``results/gguf.md``.

    python benchmarks/bench_gguf.py [rows] [cols]

Ours is timed on one thread (the fair comparison with the C reference) and on every core.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch
from gguf import GGMLQuantizationType
from gguf import quants as gq

import quantcourse.gguf as qg

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import check_same, machine_description, median_seconds  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
LEGACY = {"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"}
REPEATS = 3


def _cref():
    spec = importlib.util.spec_from_file_location(
        "cref", os.path.join(HERE, "..", "tests", "golden", "gguf", "cref.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    path = mod.find_libggml()
    return None if path is None else mod.CQuantizer(path)


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
        # bytes first: a mismatch stops the run before anything is timed
        ours = qg.quantize(x, name)
        if name in LEGACY:
            check_same(f"{name} vs gguf-py", ours, gq.quantize(x.numpy(), GGMLQuantizationType[name]))
        if cq is not None:
            check_same(f"{name} vs llama.cpp", ours, cq.quantize(x.numpy(), name))
        cells = []
        for threads in (1, all_threads):  # the C reference runs on one thread: the first column is the fair one
            torch.set_num_threads(threads)
            cells.append(f"{n / median_seconds(lambda name=name: qg.quantize(x, name), REPEATS) / 1e6:.2f}")
        if name in LEGACY:
            t_py = median_seconds(lambda name=name: gq.quantize(x.numpy(), GGMLQuantizationType[name]), REPEATS)
            cells.append(f"{n / t_py / 1e6:.2f}")
        else:
            cells.append("(no quantizer)")
        if cq is not None:
            cells.append(f"{n / median_seconds(lambda name=name: cq.quantize(x.numpy(), name), REPEATS) / 1e6:.2f}")
        else:
            cells.append("(library not found)")
        lines.append(f"| {name} | " + " | ".join(cells) + " | yes |")
        print(lines[-1], flush=True)
    header = [
        "# GGUF quantization throughput",
        "",
        f"`python benchmarks/bench_gguf.py {rows} {cols}`: a seeded {rows} x {cols} float32 matrix, the median of",
        f"{REPEATS} runs per cell after a warm-up; bytes checked identical before timing"
        + (f"; llama.cpp ggml {cq.version} ({cq.commit})." if cq else "."),
        "",
        *machine_description("cpu", ["gguf", "numpy"]),
        "",
    ]
    with open(os.path.join(HERE, "results", "gguf.md"), "w") as f:
        f.write("\n".join(header + lines) + "\n")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
