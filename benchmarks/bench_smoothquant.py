"""Benchmark: SmoothQuant's int8 GEMM against the float32 matmul on this CPU, and its statistics pass.

Two parts, each checked before it is timed:

1. GEMM: for the course model's linear shapes (512 tokens) and a 7B-sized one, the float32 ``F.linear``,
   ``torch._int_mm`` (int8 x int8 -> int32: oneDNN on x86, with VNNI where the CPU has it), the exact
   integer fallback of :func:`quantcourse.smoothquant.int8_matmul` (a float64 GEMM, exact for int8 codes),
   and the whole :class:`quantcourse.smoothquant.Int8Linear` (per-token quantization of the input, the
   int32 GEMM, the two scales). The integer results must be identical, and the W8A8 layer's output equal
   to the fake-quantized layer's within float rounding, before anything is timed.
2. Statistics: :func:`quantcourse.smoothquant.collect_act_scales` on the whole course model against the
   authors' way (``calibration.py``: a hook on every linear reduces its input with ``abs().max()``, q/k/v
   and gate/up each reducing the same tensor again), same tokens, same result checked.

Usage::

    python benchmarks/bench_smoothquant.py                    # 64 x 512 calibration tokens
    python benchmarks/bench_smoothquant.py --n-samples 16 --repeats 3

Writes ``benchmarks/results/smoothquant.md``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from harness import check_equal, environment_lines, measure, write_results
from torch import nn
from torch.nn import functional as F

from quantcourse import data, smoothquant
from quantcourse.activations import QuantizedLinear
from quantcourse.models import load_model
from quantcourse.smoothquant import Int8Linear, int8_matmul

RESULTS = Path(__file__).parent / "results" / "smoothquant.md"

# (label, tokens M, in K, out N): the course model's layers on one 512-token sequence, and a 7B layer
SHAPES = [
    ("q_proj / o_proj", 512, 576, 576),
    ("k_proj / v_proj", 512, 576, 192),
    ("gate_proj / up_proj", 512, 576, 1536),
    ("down_proj", 512, 1536, 576),
    ("7B q_proj (4096 x 4096)", 512, 4096, 4096),
]


def ms(fn, repeats: int) -> float:
    """Median wall milliseconds of ``repeats`` calls after a warm-up (the shared harness)."""
    return 1e3 * measure(fn, repeats=repeats).wall


def gemm_row(label: str, M: int, K: int, N: int, repeats: int, int_mm: bool) -> str:
    gen = torch.Generator().manual_seed(M + K + N)
    x = torch.randn(M, K, generator=gen)
    x[:, :4] *= 30  # outlier channels, as the course model's activations have
    linear = nn.Linear(K, N, bias=False)
    with torch.no_grad():
        linear.weight.normal_(0, 0.02, generator=gen)
    w = linear.weight.detach()
    layer = Int8Linear.from_float(linear)
    x_q, _ = smoothquant.quantize_per_token_int8(x)
    # checks first: identical integers, and the integer layer equals the fake-quantized one
    exact = int8_matmul(x_q, layer.weight_q, backend="exact")
    check_equal(exact, (x_q.long() @ layer.weight_q.long().T).to(torch.int32), what=f"{label}: exact fallback")
    if int_mm:
        check_equal(int8_matmul(x_q, layer.weight_q, backend="int_mm"), exact, what=f"{label}: torch._int_mm")
    fake = QuantizedLinear(linear, w_bits=8, act=smoothquant._act_quantizer("per_token", None))
    # float rounding only: the scales are applied in another order than in the fake-quantized product
    check_equal(layer(x), fake(x), what=f"{label}: Int8Linear against fake quantization", rtol=1e-5, atol=1e-5)

    t_float = ms(lambda: F.linear(x, w), repeats)
    t_int = ms(lambda: int8_matmul(x_q, layer.weight_q, backend="int_mm"), repeats) if int_mm else float("nan")
    t_exact = ms(lambda: int8_matmul(x_q, layer.weight_q, backend="exact"), repeats)
    t_layer = ms(lambda: layer(x), repeats)
    t_fake = ms(lambda: fake(x), repeats)
    gflop = 2 * M * K * N / 1e9
    return (
        f"| {label} | {M} x {K} x {N} | {t_float:.2f} ({1e3 * gflop / t_float:.0f}) | "
        f"{t_int:.2f} ({1e3 * gflop / t_int:.0f}) | {t_float / t_int:.2f}x | {t_exact:.2f} | "
        f"{t_layer:.2f} | {t_fake:.2f} |"
    )


def gemm_rows(repeats: int) -> list[str]:
    int_mm = smoothquant._int_mm_works("cpu")
    return [gemm_row(label, M, K, N, repeats, int_mm) for label, M, K, N in SHAPES]


def reference_act_scales(model: nn.Module, calibration: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    """The authors' calibration.py, restated: one hook per linear, each reducing its own input."""
    scales: dict[str, torch.Tensor] = {}

    def stat(name, x):
        x = x.reshape(-1, x.shape[-1]).abs().detach()
        m = torch.max(x, dim=0)[0].float().cpu()
        scales[name] = torch.max(scales[name], m) if name in scales else m

    handles = [
        m.register_forward_hook(lambda mod, x, y, name=name: stat(name, x[0]))
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not name.endswith("lm_head")
    ]
    try:
        with torch.no_grad():
            for batch in calibration.split(batch_size):
                model(input_ids=batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return scales


def stats_rows(n_samples: int, seq_len: int, batch_size: int) -> tuple[list[str], float]:
    model, tokenizer = load_model()
    calibration = data.calibration_samples(tokenizer, n_samples, seq_len, seed=0)
    start = time.perf_counter()
    with torch.no_grad():
        for batch in calibration.split(batch_size):
            model(input_ids=batch, use_cache=False)
    t_forward = time.perf_counter() - start
    start = time.perf_counter()
    ours = smoothquant.collect_act_scales(model, calibration, batch_size=batch_size, progress=False)
    t_ours = time.perf_counter() - start
    start = time.perf_counter()
    ref = reference_act_scales(model, calibration, batch_size)
    t_ref = time.perf_counter() - start
    check_equal(sorted(ours), sorted(ref), what="watched linears")
    for name in ref:
        check_equal(ours[name], ref[name], what=f"max |x| of {name}")
    return [
        f"| forward passes alone (no hooks) | {t_forward:.1f} |",
        f"| `collect_act_scales` (shared inputs reduced once, no \\|x\\| copy) | {t_ours:.1f} |",
        f"| the authors' hooks (`abs().max()` per linear) | {t_ref:.1f} |",
    ], t_ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-samples", type=int, default=64, help="calibration sequences (default 64)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    environment = environment_lines()
    int_mm = "runs" if smoothquant._int_mm_works("cpu") else "not available (the exact fallback is used)"
    gemm = gemm_rows(args.repeats)
    stats, t_ours = stats_rows(args.n_samples, args.seq_len, args.batch_size)
    path = write_results(
        args.output,
        "# SmoothQuant: int8 GEMM and statistics on this CPU",
        [
            *environment,
            f"- command: `python benchmarks/bench_smoothquant.py --n-samples {args.n_samples} --seq-len "
            f"{args.seq_len} --repeats {args.repeats}`; `torch._int_mm` on the CPU: {int_mm}",
        ],
        "Checked before timing, per shape: `torch._int_mm` and the exact fallback give identical int32 results "
        "(equal to an int64 matmul), and `Int8Linear` equals the fake-quantized W8A8 layer within 1e-5.",
        "\n".join(
            [
                "## GEMM: median wall milliseconds (GFLOP/s)",
                "",
                "| layer | M x K x N | float32 `F.linear` | int8 `torch._int_mm` | int8 speed-up | exact fallback | "
                "`Int8Linear` (quantize + GEMM + scales) | fake-quantized layer |",
                "|---|---|---|---|---|---|---|---|",
                *gemm,
            ]
        ),
        "\n".join(
            [
                f"## Activation statistics on the whole course model ({args.n_samples} x {args.seq_len} tokens, "
                f"batches of {args.batch_size})",
                "",
                "| pass | seconds |",
                "|---|---|",
                *stats,
                "",
                f"Goal: well under 3 minutes on 2 cores; measured {t_ours:.0f} s. Both give identical maxima.",
            ]
        ),
    )
    print(path.read_text())


if __name__ == "__main__":
    main()
