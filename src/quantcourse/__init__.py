"""quantcourse: reference implementations for a course on LLM quantization.

The public API is curated here. The quantization primitives and the everyday helpers are
top-level names (``qc.fake_quantize``, ``qc.perplexity``); each method or format lives in its own
submodule, imported on first use (``qc.gptq``, ``qc.gguf``, ``qc.calibration``, ...), so that
``import quantcourse`` stays fast and needs neither transformers nor Triton.
"""

import importlib

from .evaluate import layer_output_error, perplexity, relative_error, sqnr_db
from .formats import FloatFormat, IntFormat, get_format
from .granularity import Granularity, PerChannel, PerGroup, PerTensor, PerToken
from .memory import (
    bits_per_weight,
    count_parameters,
    decode_tokens_per_second_bound,
    kv_cache_bytes,
    kv_cache_bytes_for,
    memory_table,
    model_bytes,
)
from .primitives import QParams, choose_qparams, dequantize, fake_quantize, fake_quantize_ste, quantize

__version__ = "0.1.0"

SUBMODULES = (
    "memory",
    "formats",
    "granularity",
    "primitives",
    "data",
    "models",
    "evaluate",
    "surgery",
    "calibration",
    "activations",
    "qat",
    "pipeline",
    "weights",
    "gptq",
    "awq",
    "smoothquant",
    "llm_int8",
    "nf4",
    "qlora",
    "packing",
    "serialization",
    "gguf",
    "grading",
    "progress",
    "kernels",
)

__all__ = [
    # primitives (chapters 2-3)
    "Granularity",
    "PerTensor",
    "PerChannel",
    "PerToken",
    "PerGroup",
    "QParams",
    "choose_qparams",
    "quantize",
    "dequantize",
    "fake_quantize",
    "fake_quantize_ste",
    # memory arithmetic and number formats (chapter 1)
    "bits_per_weight",
    "model_bytes",
    "memory_table",
    "kv_cache_bytes",
    "kv_cache_bytes_for",
    "decode_tokens_per_second_bound",
    "count_parameters",
    "IntFormat",
    "FloatFormat",
    "get_format",
    # evaluation
    "perplexity",
    "sqnr_db",
    "relative_error",
    "layer_output_error",
    *SUBMODULES,
]


def __getattr__(name: str):
    if name in SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'quantcourse' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(SUBMODULES))
