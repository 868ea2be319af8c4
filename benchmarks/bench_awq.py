"""Benchmark: AWQ on the whole course model, where its time goes, and the chapter 7 table.

1. **Timing** (the goal: under 5 minutes on 2 cores): ``awq_quantize_model`` at 4 bits, groups of 64, on
   32 x 512 calibration tokens, with the time of every block split into statistics (the pass that
   records each linear's inputs, and the mean |x| per channel), scale search (20 ratios per group,
   and the fold) and clip search.
2. **The table** that chapter 7 shows: RTN, AWQ, GPTQ and AWQ+GPTQ at 4 and 3 bits with groups of 64
   on the course model: perplexity on held-out text, time, and the bytes of the quantized layers as
   :func:`quantcourse.serialization.save_quantized` writes them (checked to reload bit-identically).
   RTN is round-to-nearest on AWQ's grid (the AWQ paper's baseline); AWQ+GPTQ runs GPTQ on the
   scaled and clipped weights. The AWQ search of each bit width is run once and reused for AWQ+GPTQ.

Usage::

    python benchmarks/bench_awq.py                 # timing and table (writes results/awq.json)
    python benchmarks/bench_awq.py --timing-only   # the timing run alone

Writes ``benchmarks/results/awq.json`` (read by chapter 7).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch
import transformers

from quantcourse import awq, data, gptq, pipeline, serialization, surgery
from quantcourse.evaluate import perplexity
from quantcourse.models import COURSE_MODEL_NAME, load_model

RESULTS = Path(__file__).parent / "results" / "awq.json"


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def cpu_seconds() -> float:
    """CPU time of this process and its waited-for children (every thread), load-independent."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def awq_search(calibration, n_bits: int, group_size: int, search_dtype) -> tuple[torch.nn.Module, awq.AWQReport, dict]:
    """The course model after AWQ's scale and clip search (float weights), its report, and the timing record."""
    model, _ = load_model()
    load, cpu = os.getloadavg()[0], cpu_seconds()
    report = awq.awq_transform_model(model, calibration, n_bits, group_size=group_size, search_dtype=search_dtype)
    timing = {
        "n_bits": n_bits,
        "group_size": group_size,
        "calibration": list(calibration.shape),
        "search_dtype": str(search_dtype),
        "search_seconds": report.seconds,
        "search_cpu_seconds": cpu_seconds() - cpu,
        "stage_seconds": report.stage_seconds(),
        "blocks": [{"block": b.index, **{k: round(v, 3) for k, v in b.seconds.items()}} for b in report.blocks],
        "load_average_start": load,
        "load_average_end": os.getloadavg()[0],
        "alphas": report.alphas,
        "mean_clip_ratio": {k: float(v.mean()) for k, v in report.clip_ratios.items()},
    }
    return model, report, timing


def compare_search_dtypes(calibration, n_bits: int, group_size: int, n_blocks: int, search_dtype) -> list[dict]:
    """The first ``n_blocks`` blocks searched twice, exactly (float32) and in ``search_dtype``: α and time of each.

    Both searches see the same inputs (the float32-searched blocks before them), so any difference in
    the chosen α is the search dtype's alone.
    """
    model, _ = load_model()
    x, args, kwargs = pipeline.capture_block_inputs(model, calibration, batch_size=8)
    rows = []
    for i, block in enumerate(surgery.decoder_blocks(model)[:n_blocks]):
        row, searched = {"block": i}, None
        for label, dtype in (("float32", None), (str(search_dtype), search_dtype)):
            ctx = pipeline.BlockContext(i, f"model.layers.{i}", copy.deepcopy(block), x, args, kwargs)
            report = awq.awq_block(ctx, n_bits, group_size=group_size, search_dtype=dtype)
            row[label] = {
                "scale_search_seconds": report.seconds["scale search"],
                "alphas": {k: s.alpha for k, s in report.searches.items()},
            }
            searched = searched or ctx
        x = searched.run()  # the next block's inputs, from the exactly searched block
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def saved_size(quantized, fresh_model, workdir: Path, name: str) -> dict:
    saved = serialization.save_quantized(quantized, workdir / f"{name}.safetensors")
    loaded = serialization.load_quantized(saved.path, fresh_model)
    for layer in quantized.layers:  # the bytes hold exactly the weights the model runs with
        a, b = surgery.get_module(quantized.model, layer).weight, surgery.get_module(loaded.model, layer).weight
        if not torch.equal(a, b):
            raise AssertionError(f"{name}: {layer} does not reload bit-identically")
    return {
        "linear_mb": saved.quantized_bytes / 1e6,
        "file_mb": saved.file_bytes / 1e6,
        "bits_per_weight": saved.bits_per_weight,
    }


def table(
    calibration, eval_tokens, group_size: int, bits: tuple[int, ...], windows: int, save, search_dtype
) -> dict[int, dict]:
    """The chapter's table; ``save(rows)`` after every row. Returns the timing record of each AWQ search."""
    workdir = Path(tempfile.mkdtemp())
    float_model, _ = load_model()
    rows = [{"method": "float32", "n_bits": 32, "ppl": perplexity(float_model, eval_tokens, n_windows=windows)}]
    del float_model
    timings = {}

    def add(method, n_bits, model, quantized, seconds, **extra):
        rows.append(
            {
                "method": method,
                "n_bits": n_bits,
                "seconds": seconds,
                "ppl": perplexity(model, eval_tokens, n_windows=windows),
                **extra,
                **saved_size(quantized, load_model()[0], workdir, f"{method}-{n_bits}"),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        save(rows, timings)

    searched = {}
    for n_bits in bits:  # the cheap rows first: RTN and AWQ at every width, then GPTQ and AWQ+GPTQ
        model, _ = load_model()
        quantized = awq.round_model(model, n_bits, group_size=group_size)
        add("RTN", n_bits, model, quantized, quantized.seconds)
        model, report, timings[n_bits] = awq_search(calibration, n_bits, group_size, search_dtype)
        save(rows, timings)
        alpha = sum(report.alphas.values()) / len(report.alphas)
        awq_model = copy.deepcopy(model)
        quantized = awq.round_model(awq_model, n_bits, group_size=group_size)
        add("AWQ", n_bits, awq_model, quantized, report.seconds + quantized.seconds, mean_alpha=alpha)
        searched[n_bits] = (model, report.seconds)
        del awq_model, quantized
    for n_bits in bits:
        model, _ = load_model()
        quantized = gptq.quantize_model(model, calibration, n_bits=n_bits, group_size=group_size, progress=False)
        add("GPTQ", n_bits, model, quantized, quantized.seconds)
        model, search_seconds = searched.pop(n_bits)
        quantized = gptq.quantize_model(model, calibration, n_bits=n_bits, group_size=group_size, progress=False)
        add("AWQ+GPTQ", n_bits, model, quantized, search_seconds + quantized.seconds)
        del model, quantized
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-samples", type=int, default=32, help="calibration sequences of the table (default 32)")
    parser.add_argument("--timing-samples", type=int, default=32, help="calibration sequences of the timing run")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3], help="bit widths of the table")
    parser.add_argument("--ppl-windows", type=int, default=4, help="perplexity windows of 512 held-out tokens")
    parser.add_argument(
        "--search-dtype",
        choices=["float32", "bfloat16"],
        default="bfloat16",
        help="dtype of the scale search's replays (default bfloat16, the reference's half-precision search)",
    )
    parser.add_argument(
        "--compare-blocks", type=int, default=3, help="blocks searched in both dtypes to compare the chosen α"
    )
    parser.add_argument("--timing-only", action="store_true")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    tokenizer = load_model()[1]
    eval_tokens = data.eval_tokens(tokenizer)
    result = {
        "meta": {
            "generated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": machine(),
            "load_average_start": os.getloadavg()[0],
            "model": COURSE_MODEL_NAME,
            "table_calibration": f"data.calibration_samples(tokenizer, {args.n_samples}, {args.seq_len}, seed=0)",
            "perplexity": f"evaluate.perplexity(seq_len=512, n_windows={args.ppl_windows}) on data.eval_tokens",
        }
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    if args.timing_only and args.output.exists():  # keep the recorded table; replace the timing run
        recorded = json.loads(args.output.read_text())
        recorded["timing_meta"] = result["meta"]
        result = recorded

    def save(rows=None, searches=None):
        if rows is not None:
            result["table"] = rows
        if searches is not None:  # the table's AWQ searches, with their time per block and stage
            result["table_searches"] = {str(n): t for n, t in searches.items()}
        result["timing_meta" if "timing_meta" in result else "meta"]["load_average_end"] = os.getloadavg()[0]
        args.output.write_text(json.dumps(result, indent=1))

    search_dtype = {"float32": None, "bfloat16": torch.bfloat16}[args.search_dtype]
    timing_calibration = data.calibration_samples(tokenizer, args.timing_samples, args.seq_len, seed=0)
    if args.compare_blocks and search_dtype is not None:
        result["search_dtype_comparison"] = compare_search_dtypes(
            timing_calibration, 4, args.group_size, args.compare_blocks, search_dtype
        )
        save()
    timings = {}
    if not args.timing_only:
        calibration = data.calibration_samples(tokenizer, args.n_samples, args.seq_len, seed=0)
        timings = table(
            calibration, eval_tokens, args.group_size, tuple(args.bits), args.ppl_windows, save, search_dtype
        )
    if args.timing_only or args.timing_samples != args.n_samples or 4 not in timings:
        timings[4] = awq_search(timing_calibration, 4, args.group_size, search_dtype)[2]
    result["timing"] = timings[4]
    save()
    summary = {k: v for k, v in timings[4].items() if k not in ("blocks", "alphas", "mean_clip_ratio")}
    print(json.dumps(summary, indent=1))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
