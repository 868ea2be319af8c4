"""LLM.int8() on a CPU: quantcourse against bitsandbytes' functional ops and the float matmul.

Three operations on the course model's layer shapes (hidden 576, FFN 1536) and on a 4096 x 4096 layer, with
fp16-rounded activations that carry a few LLM-like outlier columns (|x| of 10-60 in ~0.5% of the hidden
dimensions):

* **vector-wise quantize** of the activations ``[tokens, in]``, threshold 0 and 6: ``vectorwise_quantize``
  against ``bitsandbytes.functional.int8_vectorwise_quant`` (codes, scales and outlier columns checked
  identical first);
* **int8 product**: ``int8_matmul`` (float32 products of 1024-column slices, exact) against
  ``int8_linear_matmul`` (``torch._int_mm`` on AVX-512 CPUs), results checked identical first;
* **the decomposed linear layer** ``int8_linear`` (threshold 6) against bitsandbytes' chain
  (``int8_vectorwise_quant`` then ``int8_mixed_scaled_mm``, what ``MatMul8bitLt`` runs on a GPU), outputs
  checked identical first, beside the float32 matmul ``x @ W.T`` it replaces and the float32 matmul plus
  the outlier part alone.

Each figure is the median CPU time of ``--repeats`` runs after a warm-up, on one thread (steady on a shared
machine; the wall time is recorded beside it). Run from the repository root:
``python benchmarks/bench_llm_int8.py`` (about a minute on 2 cores). Writes ``benchmarks/results/llm_int8.md``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from harness import check_equal, environment_lines, measure, write_results
from torch.nn import functional as F

from quantcourse import llm_int8

RESULTS = Path(__file__).parent / "results" / "llm_int8.md"
SHAPES = (  # (label, tokens, in, out)
    ("course q_proj 576->576", 512, 576, 576),
    ("course gate_proj 576->1536", 512, 576, 1536),
    ("course down_proj 1536->576", 512, 1536, 576),
    ("4096->4096", 512, 4096, 4096),
)


def activations(tokens: int, d_in: int, seed: int) -> torch.Tensor:
    """float32 activations rounded to fp16, with outlier columns (|x| of 10-60) in 70% of the tokens."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d_in, generator=gen)
    cols = torch.randperm(d_in, generator=gen)[: max(1, d_in // 200)]
    hit = torch.rand(tokens, len(cols), generator=gen) < 0.7
    x[:, cols] += hit * torch.empty(tokens, len(cols)).uniform_(10, 60, generator=gen)
    return x.half().float()


def bnb_linear(x: torch.Tensor, CB: torch.Tensor, SCB: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' MatMul8bitLt forward by its functional ops: quantize the fp16 input, then the mixed matmul."""
    import bitsandbytes.functional as bF

    CA, SCA, cols = bF.int8_vectorwise_quant(x.half(), threshold=6.0)
    return torch.ops.bitsandbytes.int8_mixed_scaled_mm(x, CA, CB, SCA, SCB, cols, None)[0]


def bench_shape(label: str, tokens: int, d_in: int, d_out: int, repeats: int) -> list[dict]:
    import bitsandbytes.functional as bF

    x = activations(tokens, d_in, seed=d_in + d_out)
    W = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(1)) * 0.05
    xh = x.half()
    wq = llm_int8.vectorwise_quantize(W.half())
    rows = []

    def row(operation, ours, theirs, float_fn=None):
        rows.append(
            {
                "shape": label,
                "operation": operation,
                "ours": measure(ours, repeats=repeats),
                "theirs": measure(theirs, repeats=repeats),
                "float": None if float_fn is None else measure(float_fn, repeats=repeats),
            }
        )

    for t in (0.0, 6.0):
        ours, theirs = llm_int8.vectorwise_quantize(xh, t), bF.int8_vectorwise_quant(xh.clone(), t)
        check_equal(ours.codes, theirs[0], what=f"{label}: codes, threshold {t:g}")
        check_equal(ours.absmax, theirs[1], what=f"{label}: row absmax, threshold {t:g}")
        if t:
            check_equal(ours.outlier_cols, theirs[2], what=f"{label}: outlier columns")
        row(
            f"vector-wise quantize, threshold {t:g}",
            lambda t=t: llm_int8.vectorwise_quantize(xh, t),
            lambda t=t: bF.int8_vectorwise_quant(xh, t),
        )

    xq = llm_int8.vectorwise_quantize(xh, 6.0)
    check_equal(
        llm_int8.int8_matmul(xq.codes, wq.codes), bF.int8_linear_matmul(xq.codes, wq.codes), what=f"{label}: int32"
    )
    row(
        "int8 product (int32 result)",
        lambda: llm_int8.int8_matmul(xq.codes, wq.codes),
        lambda: bF.int8_linear_matmul(xq.codes, wq.codes),
        lambda: x @ W.T,
    )

    check_equal(llm_int8.int8_linear(x, wq, None, 6.0), bnb_linear(x, wq.codes, wq.absmax), what=f"{label}: output")
    cols = xq.outlier_cols
    W_cols = llm_int8.vectorwise_dequantize(wq.codes[:, cols], wq.absmax)
    outlier_part = measure(lambda: x[:, cols] @ W_cols.T, repeats=repeats)
    row(
        f"decomposed linear, threshold 6 ({len(cols)} outlier columns; their float product alone "
        f"{outlier_part.cpu * 1e3:.2f} ms)",
        lambda: llm_int8.int8_linear(x, wq, None, 6.0),
        lambda: bnb_linear(x, wq.codes, wq.absmax),
        lambda: F.linear(x, W),
    )
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [
        "| shape | operation | quantcourse ms | bitsandbytes ms | float32 matmul ms | quantcourse / bitsandbytes |"
        " quantcourse / float32 | quantcourse wall ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ours, theirs, fl = r["ours"], r["theirs"], r["float"]
        float_ms = "" if fl is None else f"{fl.cpu * 1e3:.2f}"
        float_ratio = "" if fl is None else f"{ours.cpu / fl.cpu:.2f}x"
        lines.append(
            f"| {r['shape']} | {r['operation']} | {ours.cpu * 1e3:.2f} | {theirs.cpu * 1e3:.2f} | {float_ms} | "
            f"{ours.cpu / theirs.cpu:.2f}x | {float_ratio} | {ours.wall * 1e3:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(RESULTS), help="results file ('-': print only)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = [r for shape in SHAPES for r in bench_shape(*shape, args.repeats)]
    title = "# LLM.int8() on a CPU: quantcourse, bitsandbytes and the float32 matmul"
    note = (
        f"Produced by `python benchmarks/bench_llm_int8.py`: median CPU time of {args.repeats} runs after a "
        "warm-up, one thread, 512 tokens per product. Codes, scales, outlier columns, int32 products and the "
        "decomposed outputs were checked identical to bitsandbytes' before timing. bitsandbytes' int8 product on "
        "an AVX-512 CPU is `torch._int_mm`, which `quantcourse.llm_int8.int8_matmul` also uses there."
    )
    table = format_table(rows)
    print(title, note, table, sep="\n\n")
    if args.out != "-":
        write_results(args.out, title, environment_lines(["bitsandbytes"]), note, table)


if __name__ == "__main__":
    main()
