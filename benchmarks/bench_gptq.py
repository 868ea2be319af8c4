"""Benchmark: GPTQ on the whole course model, and where its time goes.

Runs the layer-by-layer pipeline with GPTQ on every linear layer of the 30 decoder blocks and splits the
wall time into: capturing the first block's inputs, forward passes through the blocks, Hessian
accumulation, and GPTQ itself (per layer). Beside each layer's GPTQ time it reports the cost of the
layer's matrix algebra alone, on the same shapes and thread count: the Cholesky factorisation of the
inverse Hessian, and the block updates done as matrix products (the lazy updates after each block of
128 columns, plus the in-block rank-1 updates as one triangular product per block). The difference is
the per-column work (rounding, and Python's overhead per column).

Every part is timed twice: wall clock, and this process's CPU time (``time.process_time``, all threads; the
whole run also by ``resource.getrusage``, self and children). The load average is recorded at the start and
the end: on a shared machine the wall times stretch while the CPU times barely move, so the goal (under 3
minutes on 2 cores) is stated against both.

Usage::

    python benchmarks/bench_gptq.py                      # 128 x 512 calibration tokens (the goal)
    python benchmarks/bench_gptq.py --n-samples 16       # quicker
    python benchmarks/bench_gptq.py --true-sequential    # one pass per block (the reference's --true-sequential)
    python benchmarks/bench_gptq.py --true-sequential --forward-dtype bfloat16   # forward passes in bf16

Writes ``benchmarks/results/gptq.md`` and ``benchmarks/results/gptq.json`` (read by chapter 6); with
``--true-sequential``, ``results/gptq_true_sequential.{md,json}``; ``--forward-dtype bfloat16`` adds
``_bfloat16`` to the name.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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
from harness import cpu_name, measure  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "gptq.md"
GOAL_MINUTES = 3.0  # issue 12: the whole model at 128 x 512 calibration tokens, on 2 cores


def rusage_cpu() -> float:
    """CPU seconds (user + system) of this process and its children so far."""
    return sum(
        r.ru_utime + r.ru_stime
        for r in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    )


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


def matmul_gflops(threads: int, dtype: torch.dtype = torch.float32) -> float:
    """This machine's matrix-product rate (GFLOP/s) in ``dtype`` on a course-model shape, ``threads`` threads."""
    gen = torch.Generator().manual_seed(0)
    A, B = torch.randn(4096, 576, generator=gen).to(dtype), torch.randn(576, 1536, generator=gen).to(dtype)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        seconds = timed(lambda: A @ B, repeat=5)
    finally:
        torch.set_num_threads(saved)
    return 2 * A.shape[0] * A.shape[1] * B.shape[1] / seconds / 1e9


def hessian_flop(X: torch.Tensor) -> float:
    """FLOP of one ``_add_upper_gram`` call on ``X`` [tokens, in]: 2·in² a token, of which the upper
    triangle by row blocks does (k + 1) / 2k."""
    tokens, d = X.shape
    k = max(1, round(d / gptq.HESSIAN_ROW_BLOCK))
    return 2 * d * d * (k + 1) / (2 * k) * tokens


def forward_tflop(shapes: dict[str, tuple[int, int]], tokens: int, blocks: int, true_sequential: bool) -> float:
    """TFLOP of the linear layers' forward passes: 2·in·out a token for a linear [out, in].

    The default runs each block twice, the first pass stopping before its last linear (``shapes`` is in
    definition order), true-sequential once. Attention's own products (QKᵀ, PV) are left out: at 512
    tokens they are a few percent of the linears'.
    """
    per_token = [2 * o * i for o, i in shapes.values()]
    full = sum(per_token)
    return (full if true_sequential else 2 * full - per_token[-1]) * tokens * blocks / 1e12


def run(
    n_samples: int,
    seq_len: int,
    n_bits: int,
    group_size: int,
    batch_size: int,
    ppl_windows: int,
    true_sequential: bool = False,
    forward_dtype: str | None = None,
    seed: int = 0,
) -> tuple[str, dict]:
    load_start = os.getloadavg()
    model, tokenizer = load_model()
    calibration = data.calibration_samples(tokenizer, n_samples, seq_len, seed=seed)
    wall, cpu = defaultdict(float), defaultdict(float)
    layer_seconds: dict[str, float] = {}
    shapes: dict[str, tuple[int, int]] = {}
    hessians = gptq.HessianCollector()

    seen_X: list = [None]  # the last input: layers fed the same X share one Hessian (the collector's rule)
    flop = defaultdict(float)

    def collect(name, linear, X):
        if X is not seen_X[0]:
            seen_X[0] = X
            flop["hessian"] += hessian_flop(X)
        w0, c0 = time.perf_counter(), time.process_time()
        hessians(name, linear, X)
        wall["hessian"] += time.perf_counter() - w0
        cpu["hessian"] += time.process_time() - c0

    def quantize(name, linear):
        w0, c0 = time.perf_counter(), time.process_time()
        r = gptq.gptq_quantize(linear.weight, hessians.take(name), n_bits, group_size=group_size)
        layer_seconds[name] = time.perf_counter() - w0
        wall["gptq"] += layer_seconds[name]
        cpu["gptq"] += time.process_time() - c0
        shapes[name.split(".", 3)[-1]] = tuple(linear.weight.shape)
        linear.weight = torch.nn.Parameter(r.weight, requires_grad=False)

    w0, c0 = time.perf_counter(), time.process_time()
    if true_sequential:
        batch_size = n_samples  # the pipeline runs every sequence in one pass per block
    capture_block_inputs(model, calibration, batch_size=batch_size)  # timed alone; run_blockwise repeats it
    wall["capture"], cpu["capture"] = time.perf_counter() - w0, time.process_time() - c0
    w0, c0, r0 = time.perf_counter(), time.process_time(), rusage_cpu()
    run_blockwise(
        model,
        calibration,
        collect=collect,
        quantize_linear=quantize,
        batch_size=batch_size,
        true_sequential=true_sequential,
        forward_dtype=None if forward_dtype is None else getattr(torch, forward_dtype),
        desc=f"GPTQ {n_bits}-bit g{group_size}",
    )
    total_wall, total_cpu, total_rusage = time.perf_counter() - w0, time.process_time() - c0, rusage_cpu() - r0
    load_after_gptq = os.getloadavg()
    for clock, total in ((wall, total_wall), (cpu, total_cpu)):
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
    layers = []
    for layer, times in by_layer.items():
        chol, upd = matrix_algebra_seconds(*shapes[layer])
        median = statistics.median(times)
        layers.append(
            dict(layer=layer, out=shapes[layer][0], inp=shapes[layer][1], gptq_ms=median * 1e3, cholesky_ms=chol * 1e3,
                 updates_ms=upd * 1e3, algebra_share=(chol + upd) / median)
        )  # fmt: skip
    load_end = os.getloadavg()
    tokens = n_samples * seq_len
    threads = torch.get_num_threads()
    # what the run would take on `threads` quiet cores: the multi-threaded parts' CPU time spread over the
    # threads, GPTQ's single-threaded loop at its own CPU time
    quiet_estimate = (total_cpu - cpu["gptq"]) / threads + cpu["gptq"]
    # the floor of the matrix products alone at this machine's measured rate, all threads busy
    n_blocks = len(next(iter(by_layer.values())))  # one GPTQ time per block for each layer
    tflop = dict(forward=forward_tflop(shapes, tokens, n_blocks, true_sequential), hessian=flop["hessian"] / 1e12)
    gflops = matmul_gflops(threads)  # the Hessians' products are float32 in every run
    forward_gflops = gflops if forward_dtype is None else matmul_gflops(threads, getattr(torch, forward_dtype))
    floor_s = tflop["forward"] * 1e3 / forward_gflops + tflop["hessian"] * 1e3 / gflops + cpu["gptq"]
    parts = {
        part: dict(wall_s=wall[part], cpu_s=cpu[part], share=wall[part] / total_wall)
        for part in ("capture", "forward", "hessian", "gptq")
    }
    results = dict(
        meta=dict(
            command=f"python benchmarks/bench_gptq.py --n-samples {n_samples} --seq-len {seq_len}"
            + (" --true-sequential" if true_sequential else "")
            + (f" --forward-dtype {forward_dtype}" if forward_dtype else "")
            + (f" --seed {seed}" if seed else ""),
            generated=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            machine=dict(cpu=cpu_name(), cores=os.cpu_count(), torch=torch.__version__, torch_threads=threads),
            load_average=dict(start=load_start[0], after_gptq=load_after_gptq[0], end=load_end[0]),
            model="SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32), 30 blocks x 7 linear layers",
            gptq=dict(
                n_bits=n_bits, group_size=group_size, symmetric=False, damp=0.01, block_size=128, act_order=False,
                true_sequential=true_sequential, forward_dtype=forward_dtype or "float32",
            ),
            calibration=dict(n_samples=n_samples, seq_len=seq_len, tokens=tokens, batch_size=batch_size, seed=seed),
        ),
        parts=parts,
        total=dict(
            wall_s=total_wall, cpu_s=total_cpu, rusage_cpu_s=total_rusage, minutes=total_wall / 60,
            quiet_estimate_s=quiet_estimate, goal_minutes=GOAL_MINUTES,
            tflop=tflop, matmul_gflops=gflops, forward_matmul_gflops=forward_gflops, arithmetic_floor_s=floor_s,
        ),
        layers=layers,
        perplexity=dict(windows=ppl_windows, seq_len=512, float=ppl_float, rtn=ppl_rtn, gptq=ppl_gptq),
    )  # fmt: skip
    stem = ("gptq_true_sequential" if true_sequential else "gptq") + (f"_seed{seed}" if seed else "")
    sibling = RESULTS.with_name(f"{stem}.json")
    if forward_dtype and sibling.exists():  # the same run with float32 forward passes, for the perplexity it costs
        same = json.loads(sibling.read_text())
        if {**same["meta"]["calibration"], "seed": same["meta"]["calibration"].get("seed", 0)} == results["meta"][
            "calibration"
        ]:
            results["perplexity"]["gptq_float32_forward"] = same["perplexity"]["gptq"]
            results["perplexity"]["float32_forward_run"] = f"{sibling.stem}.md, {same['meta']['generated']}"
    return render(results), results


def render(r: dict) -> str:
    """The markdown report of :func:`run`'s results."""
    meta, total, ppl = r["meta"], r["total"], r["perplexity"]
    cal, q, load = meta["calibration"], meta["gptq"], meta["load_average"]
    setting = f"{q['n_bits']}-bit g{q['group_size']}"
    shared = max(load.values()) > meta["machine"]["cores"]
    machine = meta["machine"]
    return "\n".join(
        [
            "# GPTQ on the course model",
            "",
            f"Generated by `{meta['command']}` on {meta['generated']}.",
            "",
            f"- Machine: {machine['cpu']}, {machine['cores']} CPU cores, torch {machine['torch']}, "
            f"{machine['torch_threads']} intra-op threads (GPTQ's own loop runs on one). Load average "
            f"{load['start']:.1f} at the start, {load['after_gptq']:.1f} after GPTQ, {load['end']:.1f} at the end"
            + (
                ": **the cores were shared**, so the wall times are inflated; the CPU times much less."
                if shared
                else ": the machine was quiet."
            ),
            f"- Model: {meta['model']}.",
            f"- GPTQ {setting}, asymmetric, damp 0.01, lazy blocks of 128, no act-order, "
            + ("true-sequential" if q.get("true_sequential") else "every layer from the float block's inputs")
            + (
                f"; forward passes in {q['forward_dtype']} (torch.autocast; Hessians and solve in float32)"
                if q.get("forward_dtype", "float32") != "float32"
                else ""
            )
            + f"; calibration {cal['n_samples']} x {cal['seq_len']} = {cal['tokens']:,} tokens of the course text, "
            f"batches of {cal['batch_size']}" + (f", calibration seed {cal['seed']}." if cal.get("seed") else "."),
            "",
            "## Where the time goes",
            "",
            "| part | wall s | CPU s (all threads) | share of wall |",
            "|---|---|---|---|",
            *[
                f"| {name} | {p['wall_s']:.1f} | {p['cpu_s']:.1f} | {p['share']:.0%} |"
                for name, p in r["parts"].items()
            ],
            f"| **total** | **{total['wall_s']:.1f}** ({total['minutes']:.1f} min) | {total['cpu_s']:.1f} "
            f"(getrusage: {total['rusage_cpu_s']:.1f}) | 100% |",
            "",
            f"Goal: under {total['goal_minutes']:.0f} minutes on 2 cores. Wall time: {total['minutes']:.1f} min. "
            f"From the CPU times (the multi-threaded parts' CPU seconds over {machine['torch_threads']} "
            f"threads, plus GPTQ's single-threaded loop): {total['quiet_estimate_s'] / 60:.1f} min on quiet cores, "
            "a lower bound (it assumes both threads always busy in parallel).",
            "",
            f"The floor of the arithmetic: the linear layers' forward passes are {total['tflop']['forward']:.1f} "
            f"TFLOP and the Hessians {total['tflop']['hessian']:.1f} TFLOP; at the {total['matmul_gflops']:.0f} "
            f"GFLOP/s a float32 product of a course-model shape reaches here on {machine['torch_threads']} threads "
            "(measured in this run"
            + (
                f"; {total['forward_matmul_gflops']:.0f} GFLOP/s in {q['forward_dtype']}, the forward passes' precision"
                if q.get("forward_dtype", "float32") != "float32"
                else ""
            )
            + f"), plus GPTQ's own loop, that is {total['arithmetic_floor_s'] / 60:.1f} min.",
            "",
            (
                "`forward` is one pass per block over all the calibration tokens at once, in which each linear "
                "layer is quantized just before it computes (true-sequential: every layer sees the outputs of "
                "the quantized layers before it); "
                if q.get("true_sequential")
                else "`forward` is the block passes over the calibration tokens: one per block that stops at the "
                "input of the last linear layer (`down_proj`) to collect the float block's inputs, and one full "
                "pass to propagate the quantized block's outputs; "
            )
            + "`hessian` is `H = 2XᵀX/N` for the four distinct inputs of each block "
            "(q/k/v and gate/up share theirs), upper triangle only.",
            "",
            "## GPTQ per layer beside its matrix algebra (milliseconds, median over the 30 blocks, one thread)",
            "",
            "| layer | W [out x in] | GPTQ | Cholesky of H⁻¹ | block updates | algebra / GPTQ |",
            "|---|---|---|---|---|---|",
            *[
                f"| {x['layer']} | {x['out']} x {x['inp']} | {x['gptq_ms']:.0f} | {x['cholesky_ms']:.0f} | "
                f"{x['updates_ms']:.0f} | {x['algebra_share']:.0%} |"
                for x in r["layers"]
            ],
            "",
            "The rest of each layer's time is the column loop's per-column work: rounding one column and the "
            "Python overhead of ~10 small tensor operations per column (`in` columns per layer).",
            "",
            f"## Perplexity ({ppl['windows']} windows of {ppl['seq_len']} held-out tokens)",
            "",
            "| model | perplexity |",
            "|---|---|",
            f"| float32 (dequantized Q4_1) | {ppl['float']:.2f} |",
            f"| RTN {setting} | {ppl['rtn']:.2f} |",
            f"| GPTQ {setting} ({cal['n_samples']} x {cal['seq_len']} calibration) | {ppl['gptq']:.2f} |",
            *(
                [
                    f"| GPTQ {setting}, float32 forward passes (`{ppl['float32_forward_run']}`) | "
                    f"{ppl['gptq_float32_forward']:.2f} |",
                    "",
                    f"The {q['forward_dtype']} forward passes cost "
                    f"{ppl['gptq'] / ppl['gptq_float32_forward'] - 1:+.1%} of perplexity against float32 ones "
                    "on the same calibration: "
                    f"{(ppl['gptq'] - ppl['gptq_float32_forward']) / (ppl['rtn'] - ppl['gptq_float32_forward']):.0%} "
                    "of GPTQ's gain over RTN.",
                ]
                if "gptq_float32_forward" in ppl
                else []
            ),
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
    parser.add_argument(
        "--true-sequential",
        action="store_true",
        help="quantize each layer from the quantized layers' outputs, one pass per block (default output: "
        "results/gptq_true_sequential.md)",
    )
    parser.add_argument(
        "--forward-dtype",
        choices=("bfloat16", "float16"),
        default=None,
        help="run the calibration forward passes in this precision (torch.autocast); default float32",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration draw (default 0)")
    parser.add_argument("--output", type=Path, default=None, help="default: results/gptq.md")
    args = parser.parse_args()
    if args.output is None:
        stem = "gptq" + ("_true_sequential" if args.true_sequential else "")
        stem += f"_{args.forward_dtype}" if args.forward_dtype else ""
        stem += f"_seed{args.seed}" if args.seed else ""
        args.output = RESULTS.with_name(f"{stem}.md")
    report, results = run(
        args.n_samples, args.seq_len, args.n_bits, args.group_size, args.batch_size, args.ppl_windows,
        args.true_sequential, args.forward_dtype, args.seed,
    )  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)
    args.output.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    print(report)


if __name__ == "__main__":
    main()
