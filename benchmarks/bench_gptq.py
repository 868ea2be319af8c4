"""Benchmark: GPTQ on the whole course model, and where its time goes.

Runs the layer-by-layer pipeline with GPTQ on every linear layer of the 30 decoder blocks and splits the
wall time into: capturing the first block's inputs, forward passes through the blocks, Hessian
accumulation, and GPTQ itself (per layer). Beside each layer's GPTQ time it reports the cost of the
layer's matrix algebra alone, on the same shapes and thread count: the Cholesky factorisation of the
inverse Hessian, and the block updates done as matrix products (the lazy updates after each block of
128 columns, plus the in-block rank-1 updates as one triangular product per block). The difference is
the per-column work (rounding, and Python's overhead per column).

Usage::

    python benchmarks/bench_gptq.py                      # 128 x 512 calibration tokens (the goal)
    python benchmarks/bench_gptq.py --n-samples 16       # quicker

Writes ``benchmarks/results/gptq.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from quantcourse import data, gptq
from quantcourse.evaluate import perplexity
from quantcourse.models import load_model
from quantcourse.pipeline import capture_block_inputs, run_blockwise

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import measure  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "gptq.md"


def timed(fn, *args, repeat=3):
    """Median wall time of ``repeat`` calls after one warm-up (the shared statistic, benchmarks/harness.py)."""
    return measure(lambda: fn(*args), repeats=repeat).wall


def matrix_algebra_seconds(out_f: int, in_f: int, block_size: int = 128) -> tuple[float, float]:
    """(Cholesky chain, block updates) on one thread for a layer of shape [out_f, in_f]."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(4 * in_f, in_f, generator=gen)
    H = 2 * X.T @ X / X.shape[0]
    H.diagonal().add_(0.01 * H.diagonal().mean())
    W = torch.randn(in_f, out_f, generator=gen)  # transposed, as gptq_quantize works
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        chol = timed(lambda: torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True))
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

        def updates():
            Wt = W.clone()
            for i1 in range(0, in_f, block_size):
                i2 = min(i1 + block_size, in_f)
                Err = Wt[i1:i2].clone()
                Wt[i1:i2] -= torch.triu(U[i1:i2, i1:i2]).T @ Err  # the in-block rank-1 updates, at once
                Wt[i2:].addmm_(U[i1:i2, i2:].T, Err, alpha=-1)  # the lazy update
            return Wt

        upd = timed(updates)
    finally:
        torch.set_num_threads(saved)
    return chol, upd


def run(n_samples: int, seq_len: int, n_bits: int, group_size: int, batch_size: int, ppl_windows: int) -> str:
    load_start = os.getloadavg()[0]
    model, tokenizer = load_model()
    calibration = data.calibration_samples(tokenizer, n_samples, seq_len, seed=0)
    clock = defaultdict(float)
    layer_seconds: dict[str, float] = {}
    shapes: dict[str, tuple[int, int]] = {}
    hessians = gptq.HessianCollector()

    def collect(name, linear, X):
        start = time.perf_counter()
        hessians(name, linear, X)
        clock["hessian"] += time.perf_counter() - start

    def quantize(name, linear):
        start = time.perf_counter()
        r = gptq.gptq_quantize(linear.weight, hessians.take(name), n_bits, group_size=group_size)
        layer_seconds[name] = time.perf_counter() - start
        shapes[name.split(".", 3)[-1]] = tuple(linear.weight.shape)
        linear.weight = torch.nn.Parameter(r.weight, requires_grad=False)

    start = time.perf_counter()
    capture_block_inputs(model, calibration, batch_size=batch_size)  # timed alone; run_blockwise repeats it
    clock["capture"] = time.perf_counter() - start
    start = time.perf_counter()
    run_blockwise(
        model,
        calibration,
        collect=collect,
        quantize_linear=quantize,
        batch_size=batch_size,
        desc=f"GPTQ {n_bits}-bit g{group_size}",
    )
    total = time.perf_counter() - start
    clock["gptq"] = sum(layer_seconds.values())
    clock["forward"] = total - clock["capture"] - clock["hessian"] - clock["gptq"]

    eval_tokens = data.eval_tokens(tokenizer)
    ppl_gptq = perplexity(model, eval_tokens, seq_len=512, n_windows=ppl_windows)
    rtn_model, _ = load_model()
    gptq.quantize_model(rtn_model, None, n_bits=n_bits, group_size=group_size, method="rtn", progress=False)
    ppl_rtn = perplexity(rtn_model, eval_tokens, seq_len=512, n_windows=ppl_windows)
    float_model, _ = load_model()
    ppl_float = perplexity(float_model, eval_tokens, seq_len=512, n_windows=ppl_windows)

    by_layer = defaultdict(list)
    for name, seconds in layer_seconds.items():
        by_layer[name.split(".", 3)[-1]].append(seconds)
    rows = []
    for layer, times in by_layer.items():
        chol, upd = matrix_algebra_seconds(*shapes[layer])
        median = statistics.median(times)
        rows.append(
            f"| {layer} | {shapes[layer][0]} x {shapes[layer][1]} | {median * 1e3:.0f} | {chol * 1e3:.0f} | "
            f"{upd * 1e3:.0f} | {(chol + upd) / median:.0%} |"
        )
    load_end = os.getloadavg()[0]
    tokens = n_samples * seq_len
    return "\n".join(
        [
            "# GPTQ on the course model",
            "",
            f"Generated by `python benchmarks/bench_gptq.py --n-samples {n_samples} --seq-len {seq_len}` "
            f"on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
            "",
            f"- Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch "
            f"{torch.__version__}, {torch.get_num_threads()} intra-op threads (GPTQ's own loop runs on one). "
            f"Load average {load_start:.1f} at the start and {load_end:.1f} at the end: a load above the core count "
            "means other processes shared the CPU and every time below is inflated.",
            "- Model: SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32), 30 blocks x 7 linear layers.",
            f"- GPTQ {n_bits}-bit, groups of {group_size}, asymmetric, damp 0.01, lazy blocks of 128, no act-order; "
            f"calibration {n_samples} x {seq_len} = {tokens:,} tokens of the course text, batches of {batch_size}.",
            "",
            "## Where the time goes",
            "",
            "| part | seconds | share |",
            "|---|---|---|",
            *[
                f"| {part} | {clock[part]:.1f} | {clock[part] / total:.0%} |"
                for part in ("capture", "forward", "hessian", "gptq")
            ],
            f"| **total** | **{total:.1f}** ({total / 60:.1f} min; goal < 10 min) | 100% |",
            "",
            "`forward` is two passes of every block over the calibration tokens (one to collect the float block's "
            "inputs, one to propagate the quantized block's outputs); `hessian` is `H = 2XᵀX/N` for the four "
            "distinct inputs of each block (q/k/v and gate/up share theirs).",
            "",
            "## GPTQ per layer beside its matrix algebra (milliseconds, median over the 30 blocks, one thread)",
            "",
            "| layer | W [out x in] | GPTQ | Cholesky of H⁻¹ | block updates | algebra / GPTQ |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            "The rest of each layer's time is the column loop's per-column work: rounding one column and the "
            "Python overhead of ~10 small tensor operations per column (`in` columns per layer).",
            "",
            f"## Perplexity ({ppl_windows} windows of 512 held-out tokens)",
            "",
            "| model | perplexity |",
            "|---|---|",
            f"| float32 (dequantized Q4_1) | {ppl_float:.2f} |",
            f"| RTN {n_bits}-bit g{group_size} | {ppl_rtn:.2f} |",
            f"| GPTQ {n_bits}-bit g{group_size} ({n_samples} x {seq_len} calibration) | {ppl_gptq:.2f} |",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-samples", type=int, default=128, help="calibration sequences (default 128)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default 512)")
    parser.add_argument("--n-bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    parser.add_argument("--ppl-windows", type=int, default=8, help="perplexity windows of 512 tokens")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    report = run(args.n_samples, args.seq_len, args.n_bits, args.group_size, args.batch_size, args.ppl_windows)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
