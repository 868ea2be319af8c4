"""NF4 quantize / dequantize throughput: quantcourse.nf4 against bitsandbytes' CPU path, on a 4096 x 4096 matrix.

Both sides are checked for identical bytes (packed codes, absmax, double-quantized state) and identical
dequantized values first, and timed second, in one process, alternating (round robin) so that a busy
machine slows both alike. Each figure is the best of ``--repeats`` runs after a warm-up; throughput counts
the float32 values per second. bitsandbytes quantizes 4 bits with PyTorch ops on a CPU and dequantizes with
its C++ kernel (AVX-512 where the CPU has it; the 4096-wide rows are a multiple of the block size, where that
kernel is right).

Run: ``python benchmarks/bench_nf4.py [--threads N]``. Writes ``benchmarks/results/nf4.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from quantcourse import nf4

RESULTS = Path(__file__).parent / "results" / "nf4.json"


def check_equal(W: torch.Tensor, double_quant: bool) -> None:
    import bitsandbytes.functional as F

    ref, state = F.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    q = nf4.quantize_4bit(W, block_size=64, double_quant=double_quant)
    assert torch.equal(q.data, ref), "packed codes differ"
    if double_quant:
        assert torch.equal(q.absmax.codes, state.absmax) and torch.equal(q.absmax.absmax2, state.state2.absmax)
    else:
        assert torch.equal(q.absmax, state.absmax), "absmax differs"
    assert torch.equal(nf4.dequantize_4bit(q), F.dequantize_4bit(ref, state)), "dequantized values differ"


def round_robin(contenders: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    for fn in contenders.values():
        fn()  # warm-up
    best = dict.fromkeys(contenders, float("inf"))
    for _ in range(repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import bitsandbytes
    import bitsandbytes.functional as F

    torch._dynamo.config.disable = True  # bitsandbytes' PyTorch fallbacks are compiled otherwise (not used here)
    W = torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(0))
    rows = []
    for double_quant in (False, True):
        check_equal(W, double_quant)
        ref, state = F.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
        ours = nf4.quantize_4bit(W, block_size=64, double_quant=double_quant)
        quantize = round_robin(
            {
                "quantcourse": lambda dq=double_quant: nf4.quantize_4bit(W, double_quant=dq),
                "bitsandbytes": lambda dq=double_quant: F.quantize_4bit(W, quant_type="nf4", compress_statistics=dq),
            },
            args.repeats,
        )
        dequantize = round_robin(
            {
                "quantcourse": lambda q=ours: nf4.dequantize_4bit(q),
                "bitsandbytes": lambda r=ref, s=state: F.dequantize_4bit(r, s),
            },
            args.repeats,
        )
        for op, times in (("quantize", quantize), ("dequantize", dequantize)):
            rows.append(
                {
                    "op": op,
                    "double_quant": double_quant,
                    "seconds": times,
                    "mvalues_per_s": {k: W.numel() / v / 1e6 for k, v in times.items()},
                    "speedup_vs_bitsandbytes": times["bitsandbytes"] / times["quantcourse"],
                }
            )
            print(
                f"{op:10s} dq={double_quant!s:5s} quantcourse {times['quantcourse'] * 1e3:7.1f} ms   "
                f"bitsandbytes {times['bitsandbytes'] * 1e3:7.1f} ms   x{rows[-1]['speedup_vs_bitsandbytes']:.2f}"
            )
    record = {
        "benchmark": "NF4 blockwise quantize/dequantize, block 64, float32",
        "shape": [args.size, args.size],
        "bytes_equal": True,
        "threads": args.threads,
        "repeats": args.repeats,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "versions": {"torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
