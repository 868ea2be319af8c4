"""Throughput of quantcourse's primitives against optimum-quanto's on a 4096 x 4096 float32 matrix.

Two schemes, each checked for equal results first and timed second:

* int8, per output channel, symmetric (absmax): ``quantcourse`` vs quanto's ``qint8`` weights
  (``AbsmaxOptimizer`` + ``quantize_weight``), and torch's ``fake_quantize_per_channel_affine``.
* int4, groups of 64 along the input dimension, asymmetric (zero point): ``quantcourse`` vs
  quanto's ``qint4`` with ``group_size=64`` and integer zero points (``MaxOptimizer(zeropoint=True)``).
  quanto also packs two int4 codes per byte, which is part of its "quantize" time.

"fake-quantize" for quanto is quantize then dequantize (what a quanto module computes with when
its weights are not frozen). Each figure is the median of ``--repeats`` timed runs after one
warm-up run; throughput counts the float32 input bytes (or, for dequantize, the float32 output
bytes) per second.

Run: ``python benchmarks/bench_primitives.py`` (about a minute on 2 cores; the first import of
optimum-quanto takes ~10-30 s). Writes ``benchmarks/results/primitives.md``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from harness import check_equal, environment_lines, measure

import quantcourse as qc

RESULTS = Path(__file__).parent / "results" / "primitives.md"


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
    """Time quantize (choose_qparams + quantize), dequantize and fake-quantize for one scheme."""
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

    def seconds(fn) -> float:
        return measure(fn, repeats=repeats, sync=sync).wall

    rows = []
    for op in ours:
        rows.append(
            {
                "op": op,
                "ours": seconds(ours[op]),
                "quanto": seconds(theirs[op]),
                "torch": seconds(torch_fake) if torch_fake and op == "fake_quantize" else None,
            }
        )
    return rows


def format_table(rows: list[dict], n_bytes: int, n_elements: int, copy_seconds: float) -> str:
    header = (
        "| scheme | operation | quantcourse ms | quanto ms | torch ms | quantcourse GB/s | quanto GB/s "
        "| quantcourse M elem/s | speed-up vs quanto | quantcourse / copy time |"
    )
    lines = [header, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        torch_ms = f"{r['torch'] * 1e3:.1f}" if r["torch"] is not None else ""
        lines.append(
            f"| {r['scheme']} | {r['op']} | {r['ours'] * 1e3:.1f} | {r['quanto'] * 1e3:.1f} | {torch_ms} "
            f"| {n_bytes / r['ours'] / 1e9:.2f} | {n_bytes / r['quanto'] / 1e9:.2f} "
            f"| {n_elements / r['ours'] / 1e6:.0f} | {r['quanto'] / r['ours']:.2f}x | {r['ours'] / copy_seconds:.1f}x |"
        )
    lines.append(
        f"| memory bound | a plain copy of the matrix (`clone`) | {copy_seconds * 1e3:.1f} | | "
        f"| {n_bytes / copy_seconds / 1e9:.2f} | | {n_elements / copy_seconds / 1e6:.0f} | | 1.0x |"
    )
    return "\n".join(lines)


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
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    W = (torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(0)) * 0.02).to(device)
    check_int8(W)
    check_int4(W, args.group_size)
    sections = [
        f"# Primitives throughput: {args.size} x {args.size} float32",
        "",
        f"Produced by `python benchmarks/bench_primitives.py`; median wall time of {args.repeats} runs after a "
        "warm-up (benchmarks/harness.py). Results were checked equal to quanto's before timing. GB/s counts float32 "
        "bytes of the matrix (input of quantize/fake_quantize, output of dequantize). The last row is the memory "
        "bound: a plain copy of the same matrix reads and writes it once; 'quantcourse / copy time' says how far "
        "each operation is from it.",
        "",
        *environment_lines(["optimum-quanto"], device=str(device)),
    ]
    for threads in args.threads or [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        sections += ["", f"## {threads} thread{'s' if threads > 1 else ''}", "", scheme_tables(W, args)]
    report = "\n".join(sections) + "\n"
    print(report)
    if str(args.out) != "-":
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)


def scheme_tables(W: torch.Tensor, args: argparse.Namespace) -> str:
    """One markdown table: every scheme and operation, ours against quanto's (and torch's)."""
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
    copy_seconds = measure(W.clone, repeats=args.repeats, sync=sync).wall
    return format_table(rows, W.numel() * 4, W.numel(), copy_seconds)


if __name__ == "__main__":
    main()
