"""quantcourse: reference implementations for a course on LLM quantization.

The public API is curated here; every name in ``__all__`` is documented and tested.
"""

from .granularity import Granularity, PerChannel, PerGroup, PerTensor, PerToken
from .primitives import QParams, choose_qparams, dequantize, fake_quantize, quantize

__version__ = "0.1.0"

__all__ = [
    "Granularity", "PerTensor", "PerChannel", "PerToken", "PerGroup",
    "QParams", "choose_qparams", "quantize", "dequantize", "fake_quantize",
]
