"""Benchmark: the Triton kernels of quantcourse.kernels against torch's fp16 matmul and the bandwidth bound.

For Llama-7B's layer shapes (q/k/v/o 4096 x 4096, gate/up 11008 x 4096, down 4096 x 11008), decode-shaped
(1 token) and prefill-shaped (--prefill tokens) problems:

- torch fp16 ``x @ W.T`` (cuBLAS);
- W4A16 (int4, groups of 128, float32 scales, uint8 zero points): GEMV at batch 1, GEMM for prefill;
- NF4 (bitsandbytes layout, blocks of 64): fused GEMV at batch 1, dequantize + fp16 matmul for prefill;
- W8A8: per-token int8 quantization of x plus the int8 GEMM with scales in the epilogue.

Every kernel's output is checked against its reference (quantcourse.kernels.layout) before it is timed.
Achieved bandwidth counts the bytes the kernel must move at least (weight codes and metadata, x, y), and is
reported as a fraction of the datasheet peak and of the bandwidth a plain device-to-device copy reaches in
the same run. The roofline (quantcourse.kernels.roofline) gives the modelled minimum time of each problem.

Usage::

    python benchmarks/bench_kernels.py                 # on a CUDA GPU: times, writes results/kernels_<device>.json/.png
    python benchmarks/bench_kernels.py --prefill 512   # prefill rows (default 2048)

On CPU the kernels run through Triton's interpreter, which executes every program in Python: its timings
mean nothing, so the benchmark only checks correctness on small shapes and says so.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from harness import check_equal, environment_lines, write_results  # noqa: E402

from quantcourse import kernels  # noqa: E402
from quantcourse.kernels import roofline  # noqa: E402
from quantcourse.weights import rtn_quantize  # noqa: E402

RESULTS = Path(__file__).parent / "results"
LLAMA_7B_LAYERS = {"q/k/v/o_proj": (4096, 4096), "gate/up_proj": (11008, 4096), "down_proj": (4096, 11008)}
GROUP_SIZE = 128
INTERPRETER_NOTE = (
    "No CUDA GPU: the kernels ran through Triton's interpreter, which executes each program in Python with "
    "NumPy. Interpreter timings mean nothing about GPU speed, so none are reported; only correctness is checked."
)


def _int4(N: int, K: int, device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=gen) * 0.02
    record = rtn_quantize(W, 4, group_size=GROUP_SIZE if K % GROUP_SIZE == 0 else None)
    return W, kernels.Int4Weight.from_record(record).to(device)


def _nf4(W: torch.Tensor, device):
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(W.float().cpu(), blocksize=64, quant_type="nf4")
    return packed.to(device), state.absmax.float().to(device), state


def _check(name: str, got: torch.Tensor, ref: torch.Tensor, rel: float) -> float:
    """Stop the run (harness.Mismatch) unless ``got`` equals ``ref`` (``rel=0``) or is within ``rel · max|ref|``.

    Returns the relative error ``max|got - ref| / max|ref|`` for the table.
    """
    scale = ref.float().abs().max().clamp_min(1e-30).item()
    check_equal(got.float(), ref.float(), what=name, atol=rel * scale)
    return ((got.float() - ref.float()).abs().max() / scale).item()


def correctness(device, shapes) -> list[dict]:
    """Each kernel against its reference on ``shapes`` [(M, N, K)]; returns one row per (kernel, shape)."""
    rows = []
    for M, N, K in shapes:
        W, w4 = _int4(N, K, device)
        x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(device, torch.float16)
        ref = kernels.w4a16_reference(x.float(), w4)
        fn = kernels.w4a16_gemv if M <= kernels.GEMV_MAX_ROWS else kernels.w4a16_gemm
        err = _check(fn.__name__, fn(x, w4), ref, 1e-2)
        rows.append({"kernel": fn.__name__, "M": M, "N": N, "K": K, "rel_err": err})
        packed, absmax, state = _nf4(W, device)
        import bitsandbytes.functional as bnbf

        Wn = bnbf.dequantize_4bit(packed.cpu(), state).to(device)
        got = kernels.nf4_dequantize(packed, absmax, (N, K), blocksize=64, dtype=torch.float32)
        rows.append({"kernel": "nf4_dequantize", "M": M, "N": N, "K": K,
                     "rel_err": _check("nf4_dequantize", got, Wn, 0.0)})  # fmt: skip
        if M <= kernels.GEMV_MAX_ROWS:
            got = kernels.nf4_gemv(x, packed, absmax, (N, K), blocksize=64)
            rows.append({"kernel": "nf4_gemv", "M": M, "N": N, "K": K,
                         "rel_err": _check("nf4_gemv", got, x.float() @ Wn.T, 1e-2)})  # fmt: skip
        qx, sx = kernels.quantize_per_token_int8(x)
        qx_ref, sx_ref = kernels.per_token_int8_reference(x)
        check_equal(qx, qx_ref, what="quantize_per_token_int8 codes")
        check_equal(sx, sx_ref, what="quantize_per_token_int8 scales")
        qw, sw = kernels.per_channel_int8(W.to(device))
        got = kernels.w8a8_matmul(qx, sx, qw, sw, out_dtype=torch.float32)
        rows.append({"kernel": "w8a8_matmul", "M": M, "N": N, "K": K,
                     "rel_err": _check("w8a8_matmul", got, kernels.w8a8_reference(qx, sx, qw, sw), 0.0)})  # fmt: skip
    return rows


def _time(fn, *, rep_ms: int = 200) -> float:
    """Median seconds of ``fn()`` on the GPU (triton.testing.do_bench: warm-up, L2 flushed between runs).

    Not harness.measure: a decode-sized int4 weight (24 MB for 11008 x 4096) fits in an H100's 50 MB L2, so
    back-to-back calls would read it from cache and overstate the bandwidth; do_bench clears the L2 before
    each call and times on the GPU's own clock.
    """
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median") / 1e3


def copy_bandwidth(device, nbytes: int = 2**30) -> float:
    """Bytes/s of a device-to-device copy (reads and writes ``nbytes`` each)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / _time(lambda: dst.copy_(src))


def _datasheet(name: str) -> roofline.Device | None:
    """The datasheet figures of the SXM part named like ``name`` (``None`` for other variants, e.g. PCIe cards)."""
    if "PCIe" in name or "NVL" in name:
        return None
    for key, dev in roofline.DEVICES.items():
        if key.split("-")[0] in name.replace(" ", ""):
            return dev
    return None


def _candidates(x, W16, w4, nf4, w8) -> dict:
    """{name: (function of no arguments, weight bytes it reads, its reference output, tolerance)} for ``x [M, K]``.

    Each kernel is checked against its own reference (not against fp16, which would measure quantization);
    the tolerance, relative to ``max |reference|``, covers float16 output rounding.
    """
    N, K = W16.shape
    packed, absmax = nf4
    qw, sw = w8
    nf4_bytes = packed.numel() + 4 * absmax.numel()
    y_int4 = kernels.w4a16_reference(x.float(), w4)
    y_nf4 = x.float() @ kernels.nf4_dequantize_reference(packed, absmax, (N, K), 64).T
    qx, sx = kernels.per_token_int8_reference(x)
    y_w8a8 = kernels.w8a8_reference(qx, sx, qw, sw, torch.float16)

    def w8a8():
        qx, sx = kernels.quantize_per_token_int8(x)
        return kernels.w8a8_matmul(qx, sx, qw, sw)

    out = {"torch fp16 matmul": (lambda: x @ W16.T, 2 * N * K, x.float() @ W16.float().T, 1e-2)}
    if x.shape[0] <= kernels.GEMV_MAX_ROWS:
        out["w4a16_gemv"] = (lambda: kernels.w4a16_gemv(x, w4), w4.nbytes, y_int4, 1e-2)
        out["nf4_gemv"] = (lambda: kernels.nf4_gemv(x, packed, absmax, (N, K)), nf4_bytes, y_nf4, 1e-2)
    else:
        out["w4a16_gemm"] = (lambda: kernels.w4a16_gemm(x, w4), w4.nbytes, y_int4, 1e-2)
        out["nf4 dequantize + fp16 matmul"] = (
            lambda: x @ kernels.nf4_dequantize(packed, absmax, (N, K)).T,
            nf4_bytes,
            y_nf4,
            1e-2,
        )
    out["w8a8 (quantize x + int8 GEMM)"] = (w8a8, N * K + 4 * N, y_w8a8, 1e-3)
    return out


def timings(device, prefill: int) -> dict:
    """Time every kernel and torch's fp16 matmul on Llama-7B layer shapes, decode and prefill."""
    name = torch.cuda.get_device_name(device)
    copy = copy_bandwidth(device)
    sheet = _datasheet(name)
    rows = []
    for layer, (N, K) in LLAMA_7B_LAYERS.items():
        W, w4 = _int4(N, K, device)
        W16 = W.to(device, torch.float16)
        packed, absmax, _ = _nf4(W, device)
        w8 = kernels.per_channel_int8(W.to(device))
        for phase, M in (("decode", 1), ("prefill", prefill)):
            x = (torch.randn(M, K, device=device) * 0.5).to(torch.float16)
            for kernel, (fn, weight_bytes, ref, tol) in _candidates(x, W16, w4, (packed, absmax), w8).items():
                rel = _check(f"{kernel} {layer} M={M}", fn(), ref, tol)  # every kernel checked before timing
                seconds = _time(fn)
                moved = weight_bytes + 2 * (M * K + M * N)
                flops = 2 * M * N * K
                row = {
                    "layer": layer, "phase": phase, "kernel": kernel, "M": M, "N": N, "K": K,
                    "seconds": seconds, "tflops": flops / seconds / 1e12,
                    "bytes": moved, "gb_per_s": moved / seconds / 1e9, "fraction_of_copy": moved / seconds / copy,
                    "intensity": flops / moved, "rel_err": rel,
                }  # fmt: skip
                if sheet:
                    row["fraction_of_datasheet"] = moved / seconds / sheet.bandwidth
                    row["roofline_seconds"] = max(flops / sheet.fp16_flops, moved / sheet.bandwidth)
                rows.append(row)
    fp16 = {(r["layer"], r["phase"]): r["seconds"] for r in rows if r["kernel"] == "torch fp16 matmul"}
    for r in rows:
        r["speedup_vs_fp16"] = fp16[(r["layer"], r["phase"])] / r["seconds"]
    return {"device": name, "copy_bandwidth": copy, "datasheet": sheet.__dict__ if sheet else None, "rows": rows}


def goals(result: dict) -> list[str]:
    """The issue's goals on the 4096 x 11008 layer at batch 1, checked on this run."""
    gemv = next(r for r in result["rows"] if r["kernel"] == "w4a16_gemv" and r["layer"] == "gate/up_proj")
    return [
        f"W4A16 GEMV reads at {gemv['fraction_of_copy']:.0%} of the copy bandwidth (goal >= 80%): "
        f"{'met' if gemv['fraction_of_copy'] >= 0.8 else 'NOT met'}",
        f"W4A16 GEMV is {gemv['speedup_vs_fp16']:.2f}x the fp16 matmul on 11008 x 4096 (goal >= 2.5x): "
        f"{'met' if gemv['speedup_vs_fp16'] >= 2.5 else 'NOT met'}",
    ]


def roofline_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    intensity = torch.logspace(-1, 4, 200)
    sheet = result["datasheet"]
    if sheet:
        dev = roofline.Device(**sheet)
        ax.loglog(intensity, [roofline.attainable_flops(float(i), dev) / 1e12 for i in intensity], "k-",
                  label=f"{dev.name} datasheet roofline")  # fmt: skip
    ax.loglog(intensity, intensity * result["copy_bandwidth"] / 1e12, "k:", label="measured copy bandwidth")
    for kernel in sorted({r["kernel"] for r in result["rows"]}):
        pts = [r for r in result["rows"] if r["kernel"] == kernel]
        ax.loglog([r["intensity"] for r in pts], [r["tflops"] for r in pts], "o", label=kernel)
    ax.set_xlabel("arithmetic intensity (flop / byte moved)")
    ax.set_ylabel("TFLOP/s")
    ax.set_title(f"Llama-7B layers on {result['device']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for pkg in ("triton", "bitsandbytes"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefill", type=int, default=2048, help="tokens of the prefill problems (default 2048)")
    parser.add_argument("--out", default=str(RESULTS), help="folder for kernels_<device>.json/.png ('-': none)")
    args = parser.parse_args(argv)
    info = kernels.available()
    print(f"quantcourse.kernels: {info['note']} (triton {info['triton']})")
    if torch.cuda.is_available() and "cuda" in info["kernels"]["w4a16_gemv"]:
        device = torch.device("cuda")
        rows = correctness(device, [(1, 4096, 4096), (3, 11008, 4096), (64, 4096, 11008)])
    else:
        device = torch.device("cpu")
        rows = correctness(device, [(1, 96, 256), (3, 40, 128), (20, 48, 256)])
    for r in rows:
        print(f"  correct  {r['kernel']:<24} M={r['M']:<5} N={r['N']:<6} K={r['K']:<6} rel. error {r['rel_err']:.1e}")
    if device.type != "cuda":
        print(INTERPRETER_NOTE)
        return 0
    result = timings(device, args.prefill)
    result.update(
        correctness=rows,
        versions=_versions(),
        machine={"platform": platform.platform(), "cpu_count": os.cpu_count()},
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        command=" ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
    )
    print(f"device {result['device']}: device-to-device copy {result['copy_bandwidth'] / 1e9:.0f} GB/s")
    print(f"{'layer':<13} {'phase':<8} {'kernel':<30} {'us':>9} {'GB/s':>7} {'of copy':>8} {'x fp16':>7}")
    for r in result["rows"]:
        print(f"{r['layer']:<13} {r['phase']:<8} {r['kernel']:<30} {r['seconds'] * 1e6:9.1f} {r['gb_per_s']:7.0f} "
              f"{r['fraction_of_copy']:8.0%} {r['speedup_vs_fp16']:7.2f}")  # fmt: skip
    result["goals"] = goals(result)
    print("\n".join(result["goals"]))
    if args.out != "-":
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        slug = "".join(c if c.isalnum() else "_" for c in result["device"]).strip("_")
        (out / f"kernels_{slug}.json").write_text(json.dumps(result, indent=1) + "\n")
        roofline_plot(result, out / f"kernels_{slug}.png")
        table = ["| layer | phase | kernel | µs | GB/s | of copy | x fp16 |", "|---|---|---|---|---|---|---|"]
        table += [
            f"| {r['layer']} | {r['phase']} | {r['kernel']} | {r['seconds'] * 1e6:.1f} | {r['gb_per_s']:.0f} | "
            f"{r['fraction_of_copy']:.0%} | {r['speedup_vs_fp16']:.2f} |"
            for r in result["rows"]
        ]
        write_results(
            out / f"kernels_{slug}.md",
            f"# Triton kernels on {result['device']}",
            environment_lines(["triton", "bitsandbytes"], device=result["device"]),
            f"Device-to-device copy: {result['copy_bandwidth'] / 1e9:.0f} GB/s. Times: triton.testing.do_bench "
            "medians, L2 cleared before each call.",
            "\n".join(table),
            "\n".join(f"- {g}" for g in result["goals"]),
        )
        print(f"wrote {out / f'kernels_{slug}.json'}, .md and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
