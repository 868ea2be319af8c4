"""Quantization throughput of quantcourse.gguf against gguf-py and llama.cpp's C reference.

Chapter 11. Quantizes a seeded float32 matrix (default 4096 x 4096) with each format and reports
millions of weights per second for: quantcourse.gguf (vectorized PyTorch), gguf-py (numpy; it only
has the legacy quantizers) and llama.cpp's single-threaded C reference (``ggml_quantize_chunk`` from
a built ``libggml-base.so``: set ``QUANTCOURSE_LIBGGML`` or install llama-cpp-python; skipped
otherwise). It also checks that the three produce identical bytes. Writes ``results/gguf.md``.

    python benchmarks/bench_gguf.py [rows] [cols] [repeats]

Ours is timed on one thread (the fair comparison with the C reference: CPU time, see harness.py) and on every core.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from gguf import GGMLQuantizationType
from gguf import quants as gq
from harness import check_equal, environment_lines, measure, write_results

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


def main(rows: int = 4096, cols: int = 4096, repeats: int = 3) -> None:
    torch.manual_seed(0)
    x = torch.randn(rows, cols)
    n = x.numel()
    cq = _cref()
    all_threads = torch.get_num_threads()
    environment = environment_lines(["gguf"])
    if cq is not None:
        environment.append(f"- llama.cpp ggml {cq.version} ({cq.commit}), single-threaded C reference")
    lines = [
        "| format | quantcourse, 1 thread (M w/s) | gguf-py, 1 thread (M w/s) | llama.cpp C ref, 1 thread (M w/s) "
        f"| quantcourse / best peer | quantcourse, {all_threads} threads, wall (M w/s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in qg.FORMATS:
        torch.set_num_threads(1)
        ours = qg.quantize(x, name)
        # identical bytes first: a mismatch stops the run
        if name in LEGACY:
            check_equal(ours, gq.quantize(x.numpy(), GGMLQuantizationType[name]), what=f"{name} bytes against gguf-py")
        if cq is not None:
            check_equal(ours, cq.quantize(x.numpy(), name), what=f"{name} bytes against llama.cpp's C reference")
        # one thread: CPU time of this process (each side runs in it), steady on a shared machine
        t_ours = measure(lambda name=name: qg.quantize(x, name, num_threads=1), repeats=repeats)
        cells = [n / t_ours.cpu / 1e6]
        t_py = (
            measure(lambda name=name: gq.quantize(x.numpy(), GGMLQuantizationType[name]), repeats=repeats)
            if name in LEGACY
            else None
        )
        t_c = measure(lambda name=name: cq.quantize(x.numpy(), name), repeats=repeats) if cq is not None else None
        peers = [t.cpu for t in (t_py, t_c) if t is not None]
        torch.set_num_threads(all_threads)
        t_all = measure(lambda name=name: qg.quantize(x, name), repeats=repeats)
        row = [
            name,
            f"{cells[0]:.1f}",
            f"{n / t_py.cpu / 1e6:.1f}" if t_py else "(no quantizer)",
            f"{n / t_c.cpu / 1e6:.1f}" if t_c else "(library not found)",
            f"{min(peers) / t_ours.cpu:.2f}x" if peers else "",
            f"{n / t_all.wall / 1e6:.1f}",
        ]
        lines.append("| " + " | ".join(row) + " |")
        print(lines[-1], flush=True)
    write_results(
        os.path.join(HERE, "results", "gguf.md"),
        "# GGUF quantization throughput",
        [
            f"`python benchmarks/bench_gguf.py {rows} {cols}`: a seeded {rows} x {cols} float32 matrix; every format's "
            "bytes were checked identical to each peer's before timing. Median of "
            f"{repeats} runs after a warm-up (benchmarks/harness.py). One-thread columns are CPU seconds of this "
            "process (all three run in it), which other load on the machine barely changes; the last column is wall "
            "time on every core. 'quantcourse / best peer' > 1 means faster than the fastest peer.",
            "",
            *environment,
        ],
        "\n".join(lines),
    )


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", type=int, nargs="?", default=4096, help="rows of the matrix (default 4096)")
    parser.add_argument("cols", type=int, nargs="?", default=4096, help="columns, a multiple of 256 (default 4096)")
    parser.add_argument("repeats", type=int, nargs="?", default=3, help="timed runs after the warm-up (default 3)")
    args = parser.parse_args()
    if args.rows < 1 or args.cols < 256 or args.cols % 256 or args.repeats < 1:
        parser.error("rows and repeats must be positive and cols a positive multiple of 256 (the K-quant super-block)")
    main(args.rows, args.cols, args.repeats)
