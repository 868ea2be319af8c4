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

Each figure is the median of ``--repeats`` runs after a warm-up. Run from the repository root:
``python benchmarks/bench_llm_int8.py`` (about a minute on 2 cores). Writes ``benchmarks/results/llm_int8.md``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
from importlib.metadata import version
from pathlib import Path

import torch
from bench_primitives import cpu_name, median_seconds
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
    """float32 activations rounded to fp16, with outlier columns in 70% of the tokens."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d_in, generator=gen)
    cols = torch.randperm(d_in, generator=gen)[: max(1, d_in // 200)]
    hit = torch.rand(tokens, len(cols), generator=gen) < 0.7
    x[:, cols] += hit * torch.empty(tokens, len(cols)).uniform_(10, 60, generator=gen)
    return x.half().float()


def bnb_linear(x, CB, SCB):
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

    for threshold in (0.0, 6.0):
        ours, theirs = llm_int8.vectorwise_quantize(xh, threshold), bF.int8_vectorwise_quant(xh.clone(), threshold)
        assert torch.equal(ours.codes, theirs[0]) and torch.equal(ours.absmax, theirs[1])
        assert threshold == 0 or torch.equal(ours.outlier_cols, theirs[2])
        rows.append(
            {
                "shape": label,
                "operation": f"vector-wise quantize, threshold {threshold:g}",
                "quantcourse": median_seconds(lambda t=threshold: llm_int8.vectorwise_quantize(xh, t), repeats),
                "bitsandbytes": median_seconds(lambda t=threshold: bF.int8_vectorwise_quant(xh, t), repeats),
                "float matmul": None,
            }
        )

    xq = llm_int8.vectorwise_quantize(xh, 6.0)
    assert torch.equal(llm_int8.int8_matmul(xq.codes, wq.codes), bF.int8_linear_matmul(xq.codes, wq.codes))
    rows.append(
        {
            "shape": label,
            "operation": "int8 product (int32 result)",
            "quantcourse": median_seconds(lambda: llm_int8.int8_matmul(xq.codes, wq.codes), repeats),
            "bitsandbytes": median_seconds(lambda: bF.int8_linear_matmul(xq.codes, wq.codes), repeats),
            "float matmul": median_seconds(lambda: x @ W.T, repeats),
        }
    )

    assert torch.equal(llm_int8.int8_linear(x, wq, None, 6.0), bnb_linear(x, wq.codes, wq.absmax))
    cols = xq.outlier_cols
    W_cols = llm_int8.vectorwise_dequantize(wq.codes[:, cols], wq.absmax)
    rows.append(
        {
            "shape": label,
            "operation": f"decomposed linear, threshold 6 ({len(cols)} outlier columns)",
            "quantcourse": median_seconds(lambda: llm_int8.int8_linear(x, wq, None, 6.0), repeats),
            "bitsandbytes": median_seconds(lambda: bnb_linear(x, wq.codes, wq.absmax), repeats),
            "float matmul": median_seconds(lambda: F.linear(x, W), repeats),
            "outlier part alone": median_seconds(lambda: x[:, cols] @ W_cols.T, repeats),
        }
    )
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [
        "| shape | operation | quantcourse ms | bitsandbytes ms | float32 matmul ms | quantcourse / bitsandbytes |"
        " quantcourse / float |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        fl, ours = r["float matmul"], r["quantcourse"]
        op = r["operation"]
        if "outlier part alone" in r:
            op += f"; the outlier part alone: {r['outlier part alone'] * 1e3:.2f} ms"
        lines.append(
            f"| {r['shape']} | {op} | {r['quantcourse'] * 1e3:.2f} | {r['bitsandbytes'] * 1e3:.2f} | "
            f"{'' if fl is None else f'{fl * 1e3:.2f}'} | {r['quantcourse'] / r['bitsandbytes']:.2f}x | "
            f"{'' if fl is None else f'{ours / fl:.2f}x'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(RESULTS), help="results file ('-': print only)")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    parts = [
        "# LLM.int8() on a CPU: quantcourse, bitsandbytes and the float matmul",
        "",
        "Produced by `python benchmarks/bench_llm_int8.py`; median of "
        f"{args.repeats} runs after a warm-up; 512 tokens per product. Codes, scales, outlier columns, int32 "
        "products and the decomposed outputs were checked identical to bitsandbytes' before timing.",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- CPU: {cpu_name()}, {os.cpu_count()} logical cores, torch CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}",
        f"- Python {platform.python_version()}, torch {torch.__version__}, bitsandbytes {version('bitsandbytes')}",
        f"- load average when the run started: {load:.1f} (other processes slow every column alike)",
    ]
    for threads in args.threads:
        torch.set_num_threads(threads)
        rows = [r for shape in SHAPES for r in bench_shape(*shape, args.repeats)]
        parts += ["", f"## {threads} thread{'s' if threads > 1 else ''}", "", format_table(rows)]
    text = "\n".join(parts) + "\n"
    print(text)
    if args.out != "-":
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
