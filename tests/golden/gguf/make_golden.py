"""Make the golden vectors for quantcourse.gguf from llama.cpp's own C quantizers.

Run once, by hand (CI never builds llama.cpp)::

    python -m venv /tmp/llamavenv
    CMAKE_ARGS="-DGGML_NATIVE=OFF" /tmp/llamavenv/bin/pip install llama-cpp-python   # ~15 min, compiles llama.cpp
    QUANTCOURSE_LIBGGML=$(find /tmp/llamavenv -name 'libggml-base.so' | head -1) python tests/golden/gguf/make_golden.py

It writes ``golden.npz`` beside itself: the float32 inputs (``x``: hand-picked hard rows;
``x_random``: seeded normal rows) and, for each of the ten formats, the bytes that
``ggml_quantize_chunk`` returns without an importance matrix and, for the formats in
``IMATRIX_FORMATS``, with the
fixed ``imatrix`` stored alongside, plus the library's version and commit.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cref import CQuantizer, find_libggml  # noqa: E402

FORMATS = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
IMATRIX_FORMATS = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]
COLS = 512  # two K-quant super-blocks, sixteen 32-blocks


def hard_rows(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One row per situation that trips a naive reimplementation."""
    n = COLS
    randn = lambda: rng.standard_normal(n)  # noqa: E731
    halves = np.zeros(n)
    halves[n // 2 :] = randn()[n // 2 :]
    ties = np.full(n, 0.5) + np.arange(n) % 127  # half-integers: roundf and nearest_int ties
    ties[::32] = 127.0  # absmax 127 -> Q8_0 scale exactly 1
    signed_zeros = np.where(np.arange(n) % 2 == 0, 0.0, -0.0)
    signed_zeros[::7] = randn()[::7]
    runs = np.repeat(randn()[: n // 16], 16)
    outlier = randn()
    outlier[::32] *= 100
    sparse = np.where(rng.random(n) < 0.9, 0.0, randn())
    rows = {
        "zeros": np.zeros(n),
        "constant_pos": np.full(n, 1.0),
        "constant_neg": np.full(n, -3.5),
        "half_zero_blocks": halves,
        "normal": randn(),
        "huge_1e30": randn() * 1e30,
        "huge_1e38": np.clip(randn() * 1e38, -3.4e38, 3.4e38),
        "square_overflow_1e25": randn() * 1e25,  # x*x overflows: NaN scales must never win a max
        "square_underflow_1e-25": randn() * 1e-25,
        "tiny_1e-30": randn() * 1e-30,
        "boundary_1e-38": randn() * 1e-38,
        "subnormal": randn() * 1e-42,
        "cauchy": rng.standard_cauchy(n),
        "student_t3": rng.standard_t(3, n),
        "ties": ties,
        "small_integers": rng.integers(-8, 9, n).astype(float),
        "positive": rng.random(n),
        "negative": -rng.random(n),
        "outlier_per_block": outlier,
        "constant_runs": runs,
        "sparse": sparse,
        "alternating": np.where(np.arange(n) % 2 == 0, 1.0, -1.0),
        "fp16_overflow": randn() * 1e5,
        "signed_zeros": signed_zeros,
        "ramp": np.linspace(-2, 3, n),
        "uniform": rng.uniform(-1, 1, n),
    }
    return {k: v.astype(np.float32) for k, v in rows.items()}


def main() -> None:
    path = find_libggml()
    if path is None:
        sys.exit("libggml-base.so not found: set QUANTCOURSE_LIBGGML or install llama-cpp-python")
    cq = CQuantizer(path)
    rng = np.random.default_rng(20240611)
    rows = hard_rows(rng)
    x = np.stack(list(rows.values()))
    x_random = rng.standard_normal((8, COLS)).astype(np.float32)
    out = {"x": x, "x_random": x_random, "row_names": np.array(list(rows))}
    for name in FORMATS:
        out[name] = cq.quantize(x, name)
        out[f"{name}_random"] = cq.quantize(x_random, name)
    # importance-matrix variants (quantize_row_q*_K_impl): one fixed, seeded imatrix for every row
    imatrix = (rng.random(COLS) ** 3 * 10).astype(np.float32)
    imatrix[:7] = 0.0  # zero importance must not break anything
    out["imatrix"] = imatrix
    for name in IMATRIX_FORMATS:
        out[f"{name}_imatrix"] = cq.quantize(x, name, imatrix)
        out[f"{name}_imatrix_random"] = cq.quantize(x_random, name, imatrix)
    try:
        from importlib.metadata import version

        llama_cpp_python = version("llama-cpp-python")
    except Exception:  # the script may run in another environment than the package
        llama_cpp_python = os.environ.get("LLAMA_CPP_PYTHON_VERSION", "unknown")
    meta = {
        "ggml_version": cq.version,
        "ggml_commit": cq.commit,
        "llama_cpp_python": llama_cpp_python,
        "function": "ggml_quantize_chunk(type, x, dst, 0, rows, cols, imatrix=NULL or the stored imatrix)",
    }
    out["meta"] = np.array(json.dumps(meta))
    np.savez_compressed(os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden.npz"), **out)
    print(json.dumps(meta), {k: v.shape for k, v in out.items() if k not in ("meta",)})


if __name__ == "__main__":
    main()
