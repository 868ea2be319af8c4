"""Throughput of quantcourse's primitives against optimum-quanto's on a 4096 x 4096 float32 matrix.

Two schemes, each checked for equal results first and timed second:

* int8, per output channel, symmetric (absmax): ``quantcourse`` vs quanto's ``qint8`` weights
  (``AbsmaxOptimizer`` + ``quantize_weight``), and torch's ``fake_quantize_per_channel_affine``.
* int4, groups of 64 along the input dimension, asymmetric (zero point): ``quantcourse`` vs
  quanto's ``qint4`` with ``group_size=64`` and integer zero points (``MaxOptimizer(zeropoint=True)``).
  quanto also packs two int4 codes per byte, which is part of its "quantize" time.

"fake-quantize" for quanto is quantize then dequantize (what a quanto module computes with when
its weights are not frozen). Each figure is the median of ``--repeats`` timed runs after one
warm-up run, in wall time and in CPU time of this process (``harness.measure``); GB/s are from CPU
time, which other processes on a shared machine barely change.

GB/s count the bytes an operation must read and write at least: for quantize the float32 matrix
read and the one-byte codes written (5 bytes an element), for dequantize the reverse (5), for
fake-quantize the matrix read and written (8). The memory bound is measured beside them the same
way: ``dst.copy_(W)`` into an existing matrix reads and writes 8 bytes an element, and ``W.clone()``
does the same into a new one (what an operation that returns a new tensor also pays: the kernel
maps fresh pages for it). Options: ``--compile`` adds torch.compile of the int8 per-channel
formula (checked bit-identical first; never the library's default), ``--huge-pages`` runs the
tables again in a child process with ``THP_MEM_ALLOC_ENABLE=1`` (torch then asks for transparent
huge pages for large tensors, which makes fresh pages much cheaper).

Run: ``python benchmarks/bench_primitives.py --threads 1`` (about a minute on 2 cores; the first
import of optimum-quanto takes ~10-30 s). Writes ``benchmarks/results/primitives.md``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch
from harness import check_equal, environment_lines, measure

import quantcourse as qc

RESULTS = Path(__file__).parent / "results" / "primitives.md"
# Bytes an operation reads and writes at least, per element of the matrix (see the docstring).
BYTES_PER_ELEMENT = {"choose_qparams": 4, "quantize": 5, "dequantize": 5, "fake_quantize": 8, "copy": 8}


def quanto_int8(W: torch.Tensor):
    from optimum import quanto
    from optimum.quanto.tensor.optimizers import AbsmaxOptimizer
    from optimum.quanto.tensor.weights import quantize_weight

    optimizer = AbsmaxOptimizer()

    def quantize():
        scale = optimizer(W, qtype=quanto.qint8, axis=0)
        return quantize_weight(W, qtype=quanto.qint8, axis=0, scale=scale, optimized=False)

    return quantize


def quanto_int4(W: torch.Tensor, group_size: int):
    from optimum import quanto
    from optimum.quanto.tensor.optimizers import MaxOptimizer
    from optimum.quanto.tensor.weights import quantize_weight

    optimizer = MaxOptimizer()

    def quantize():
        scale, zero_point = optimizer(W, qtype=quanto.qint4, axis=0, group_size=group_size, zeropoint=True)
        return quantize_weight(
            W, qtype=quanto.qint4, axis=0, scale=scale, shift=zero_point, group_size=group_size, optimized=False
        )

    return quantize


def check_int8(W: torch.Tensor) -> None:
    qp = qc.choose_qparams(W, 8, symmetric=True, granularity=qc.PerChannel(0))
    ref = quanto_int8(W)()
    check_equal(qc.quantize(W, qp), ref._data, what="int8 per-channel codes against quanto's")
    check_equal(qp.scale, ref._scale, what="int8 per-channel scales against quanto's")


def check_int4(W: torch.Tensor, group_size: int) -> None:
    ref = quanto_int4(W, group_size)().dequantize()
    ours = qc.fake_quantize(W, 4, symmetric=False, granularity=qc.PerGroup(group_size))
    check_equal(ours, ref, what=f"int4 group-{group_size} fake-quantized values against quanto's")


def run_scheme(W, n_bits, symmetric, granularity, quanto_quantize, repeats, sync, torch_fake=None) -> list[dict]:
    """Time quantize (choose_qparams + quantize), dequantize and fake-quantize for one scheme (Timing objects)."""
    qp = qc.choose_qparams(W, n_bits, symmetric=symmetric, granularity=granularity)
    q = qc.quantize(W, qp)
    qt = quanto_quantize()
    ours = {
        "quantize (choose_qparams + quantize)": lambda: qc.quantize(
            W, qc.choose_qparams(W, n_bits, symmetric=symmetric, granularity=granularity)
        ),
        "dequantize": lambda: qc.dequantize(q, qp),
        "fake_quantize": lambda: qc.fake_quantize(W, n_bits, symmetric=symmetric, granularity=granularity),
    }
    theirs = {
        "quantize (choose_qparams + quantize)": quanto_quantize,
        "dequantize": qt.dequantize,
        "fake_quantize": lambda: quanto_quantize().dequantize(),
    }

    def timing(fn):
        return measure(fn, repeats=repeats, sync=sync)

    rows = []
    for op in ours:
        rows.append(
            {
                "op": op,
                "kind": op.split()[0],
                "ours": timing(ours[op]),
                "quanto": timing(theirs[op]),
                "torch": timing(torch_fake) if torch_fake and op == "fake_quantize" else None,
            }
        )
    # where quantize's time goes: the two halves on their own (quantcourse only)
    for op, fn in [
        ("  choose_qparams alone", lambda: qc.choose_qparams(W, n_bits, symmetric=symmetric, granularity=granularity)),
        ("  quantize alone (given qparams)", lambda: qc.quantize(W, qp)),
    ]:
        kind = op.split()[0]
        rows.append({"op": op, "kind": kind, "ours": timing(fn), "quanto": None, "torch": None})
    return rows


def format_table(rows: list[dict], n_elements: int, copy, clone) -> str:
    """Markdown table; GB/s from CPU time, bytes as in BYTES_PER_ELEMENT; the last rows are the memory bound."""
    copy_gbs = BYTES_PER_ELEMENT["copy"] * n_elements / copy.cpu / 1e9

    def ms(t) -> str:
        return f"{t.cpu * 1e3:.1f}" if t is not None else ""

    lines = [
        "| scheme | operation | quantcourse wall ms | quantcourse CPU ms | quanto CPU ms | torch CPU ms "
        "| quantcourse GB/s | quanto GB/s | speed-up vs quanto (CPU) | copy_ GB/s / quantcourse GB/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        n_bytes = BYTES_PER_ELEMENT[r["kind"]] * n_elements
        ours_gbs = n_bytes / r["ours"].cpu / 1e9
        quanto = r["quanto"]
        quanto_gbs = f"{n_bytes / quanto.cpu / 1e9:.2f}" if quanto else ""
        speed_up = f"{quanto.cpu / r['ours'].cpu:.2f}x" if quanto else ""
        lines.append(
            f"| {r['scheme']} | {r['op']} | {r['ours'].wall * 1e3:.1f} | {ms(r['ours'])} | {ms(quanto)} "
            f"| {ms(r['torch'])} | {ours_gbs:.2f} | {quanto_gbs} | {speed_up} | {copy_gbs / ours_gbs:.1f}x |"
        )
    for name, t in [("`dst.copy_(W)` into an existing matrix", copy), ("`W.clone()` (a new matrix)", clone)]:
        gbs = BYTES_PER_ELEMENT["copy"] * n_elements / t.cpu / 1e9
        lines.append(
            f"| memory bound | {name} | {t.wall * 1e3:.1f} | {ms(t)} | | | {gbs:.2f} | | | {copy_gbs / gbs:.1f}x |"
        )
    return "\n".join(lines)


def compiled_int8(W: torch.Tensor, repeats: int, sync) -> str:
    """Option, never the default: torch.compile of the int8 per-channel formula, checked bit-identical first."""

    def formula(x):
        absmax = torch.maximum(x.amax(dim=1, keepdim=True), -x.amin(dim=1, keepdim=True))
        scale = (absmax / 127).clamp(min=qc.primitives.SCALE_EPS)
        return torch.clamp(torch.round(x / scale), -127, 127).to(torch.int8), scale

    import time

    start = time.perf_counter()
    compiled = torch.compile(formula)
    q, scale = compiled(W)
    compile_s = time.perf_counter() - start
    qp = qc.choose_qparams(W, 8, symmetric=True, granularity=qc.PerChannel(0))
    check_equal(q, qc.quantize(W, qp), what="torch.compile'd int8 codes against quantcourse's")
    check_equal(scale, qp.scale, what="torch.compile'd int8 scales against quantcourse's")
    t = measure(lambda: compiled(W), repeats=repeats, sync=sync)
    dst = torch.empty_like(W)
    copy = measure(lambda: dst.copy_(W), repeats=repeats, sync=sync)
    gbs = BYTES_PER_ELEMENT["quantize"] * W.numel() / t.cpu / 1e9
    copy_gbs = BYTES_PER_ELEMENT["copy"] * W.numel() / copy.cpu / 1e9
    return (
        "Option (not the library's default): `torch.compile` of the int8 per-channel formula "
        f"(choose the scales and quantize, one fused loop), bit-identical codes and scales: {t.wall * 1e3:.1f} ms "
        f"wall, {t.cpu * 1e3:.1f} ms CPU, {gbs:.2f} GB/s, {copy_gbs / gbs:.1f}x below `copy_` measured beside it "
        f"({copy_gbs:.2f} GB/s); the first call compiled for {compile_s:.0f} s."
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="the matrix is size x size float32")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per figure (median)")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument(
        "--threads",
        type=int,
        nargs="*",
        default=None,
        help="torch thread counts to run with, one table each (default: torch's choice)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS, help="markdown file to write ('-': do not write)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the int8 formula")
    parser.add_argument(
        "--huge-pages", action="store_true", help="also run the tables with THP_MEM_ALLOC_ENABLE=1 (a child process)"
    )
    parser.add_argument("--tables-only", action="store_true", help=argparse.SUPPRESS)  # the --huge-pages child
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    W = (torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(0)) * 0.02).to(device)
    check_int8(W)
    check_int4(W, args.group_size)
    tables = []
    for threads in args.threads or [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        tables += ["", f"## {threads} thread{'s' if threads > 1 else ''}", "", scheme_tables(W, args)]
        if args.compile:
            sync = torch.cuda.synchronize if W.device.type == "cuda" else None
            tables += ["", compiled_int8(W, args.repeats, sync)]
    if args.tables_only:
        print("\n".join(tables))
        return
    sections = [
        f"# Primitives throughput: {args.size} x {args.size} float32",
        "",
        f"Produced by `python benchmarks/bench_primitives.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
        f"; median of {args.repeats} runs after a warm-up (benchmarks/harness.py), in wall time and in CPU time "
        "of this process. Results were checked equal to quanto's before timing. GB/s are from CPU time and count "
        "the bytes each operation reads and writes at least: 5 bytes an element for quantize (float32 in, "
        "one-byte codes out) and dequantize, 4 for choose_qparams alone (float32 in), 8 for fake_quantize "
        "(float32 in and out). The last two rows are the "
        "memory bound, counted the same way (8 bytes an element): `copy_` into an existing matrix, and `clone` "
        "into a new one, which also pays for the fresh pages that every operation returning a new tensor gets; "
        "the last column says how many times below `copy_` each operation's GB/s is.",
        "",
        *environment_lines(["optimum-quanto"], device=str(device)),
        f"- THP_MEM_ALLOC_ENABLE: {os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}",
        *tables,
    ]
    if args.huge_pages:
        child = [sys.executable, __file__, "--tables-only", "--size", str(args.size), "--repeats", str(args.repeats)]
        child += ["--group-size", str(args.group_size), "--device", args.device]
        child += ["--threads", *map(str, args.threads)] if args.threads else []
        env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "1"}
        out = subprocess.run(child, env=env, check=True, capture_output=True, text=True).stdout
        sections += [
            "",
            "# Option: THP_MEM_ALLOC_ENABLE=1",
            "",
            "The same tables from a child process started with `THP_MEM_ALLOC_ENABLE=1`: torch then aligns large "
            "tensors to 2 MiB and asks the kernel for transparent huge pages, so a new tensor's pages are mapped "
            "512 at a time. A setting of the process (or machine), not something the library does.",
            out.rstrip(),
        ]
    report = "\n".join(sections) + "\n"
    print(report)
    if str(args.out) != "-":
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)


def scheme_tables(W: torch.Tensor, args: argparse.Namespace) -> str:
    """One markdown table: every scheme and operation, ours against quanto's (and torch's), and the memory bound."""
    sync = torch.cuda.synchronize if W.device.type == "cuda" else (lambda: None)
    qp8 = qc.choose_qparams(W, 8, symmetric=True, granularity=qc.PerChannel(0))

    def torch_fake():
        return torch.fake_quantize_per_channel_affine(
            W, qp8.scale.flatten(), qp8.zero_point.flatten(), 0, qp8.qmin, qp8.qmax
        )

    schemes = [
        ("int8 per-channel symmetric", 8, True, qc.PerChannel(0), quanto_int8(W), torch_fake),
        (
            f"int4 per-group {args.group_size} asymmetric",
            4,
            False,
            qc.PerGroup(args.group_size),
            quanto_int4(W, args.group_size),
            None,
        ),
    ]
    rows = []
    for name, n_bits, symmetric, granularity, quanto_quantize, reference in schemes:
        for row in run_scheme(W, n_bits, symmetric, granularity, quanto_quantize, args.repeats, sync, reference):
            rows.append({"scheme": name, **row})
    dst = torch.empty_like(W)
    copy = measure(lambda: dst.copy_(W), repeats=args.repeats, sync=sync)
    clone = measure(W.clone, repeats=args.repeats, sync=sync)
    return format_table(rows, W.numel(), copy, clone)


if __name__ == "__main__":
    main()
