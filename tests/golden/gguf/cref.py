"""ctypes access to llama.cpp's C quantizers (``ggml_quantize_chunk`` in libggml-base).

Used by ``make_golden.py`` and by the differential test in ``tests/gguf/test_gguf.py``; neither CI
nor the course needs it. The library comes from the PyPI package ``llama-cpp-python`` (which
compiles llama.cpp); point ``QUANTCOURSE_LIBGGML`` at ``libggml-base.so`` or install the package.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import os

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType


def find_libggml() -> str | None:
    """Path of libggml-base.so, or None."""
    env = os.environ.get("QUANTCOURSE_LIBGGML")
    if env and os.path.exists(env):
        return env
    spec = importlib.util.find_spec("llama_cpp")
    roots = list(spec.submodule_search_locations or []) if spec else []
    for root in roots:
        hits = sorted(glob.glob(os.path.join(root, "**", "libggml-base.so*"), recursive=True))
        if hits:
            return hits[0]
    return None


class CQuantizer:
    """``quantize(x, name, imatrix=None)`` -> the C library's bytes ``[rows, row_bytes]`` uint8."""

    def __init__(self, path: str):
        self.lib = ctypes.CDLL(path)
        f = self.lib.ggml_quantize_chunk
        f.restype = ctypes.c_size_t
        f.argtypes = [
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_void_p,
        ]
        self.lib.ggml_version.restype = ctypes.c_char_p
        self.lib.ggml_commit.restype = ctypes.c_char_p
        self.version = self.lib.ggml_version().decode()
        self.commit = self.lib.ggml_commit().decode()

    def quantize(self, x: np.ndarray, name: str, imatrix: np.ndarray | None = None) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        qtype = GGMLQuantizationType[name]
        block, size = GGML_QUANT_SIZES[qtype]
        rows, cols = x.shape
        out = np.zeros(rows * (cols // block) * size, dtype=np.uint8)
        imat = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
        self.lib.ggml_quantize_chunk(
            int(qtype), x.ctypes.data, out.ctypes.data, 0, rows, cols, None if imat is None else imat.ctypes.data
        )
        return out.reshape(rows, -1)
