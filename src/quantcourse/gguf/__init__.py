"""GGUF and llama.cpp's quantization formats, byte for byte (chapter 11).

One small class per block format (:mod:`.legacy`: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1;
:mod:`.kquants`: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K), each quantizing all blocks at once and
producing the bytes of llama.cpp's reference quantizers; :func:`quantize` and
:func:`dequantize` are the entry points. :mod:`.mixtures` assigns each tensor of a model the
type llama.cpp's Q4_K_M (etc.) would, :mod:`.names` holds llama.cpp's tensor names and q/k layout,
and :mod:`.writer` exports a model to a ``.gguf`` file.
"""

from .api import bits_per_weight, dequantize, quantize
from .base import FORMATS, BlockFormat, get_format, imatrix_formats
from .imatrix import compute_imatrix
from .kquants import Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, pack_scale_min_k4, unpack_scale_min_k4
from .legacy import Q4_0, Q4_1, Q5_0, Q5_1, Q8_0
from .mixtures import MIXTURES, TensorChoice, plan_mixture, tensor_type, use_more_bits
from .names import gguf_name, permute_qk, unpermute_qk
from .writer import ExportResult, dequantized_model, export_gguf, gguf_state_dict, load_gguf_weights

__all__ = [
    "quantize",
    "dequantize",
    "bits_per_weight",
    "FORMATS",
    "BlockFormat",
    "get_format",
    "imatrix_formats",
    "Q8_0",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
    "pack_scale_min_k4",
    "unpack_scale_min_k4",
    "compute_imatrix",
    "MIXTURES",
    "TensorChoice",
    "plan_mixture",
    "tensor_type",
    "use_more_bits",
    "ExportResult",
    "dequantized_model",
    "export_gguf",
    "gguf_state_dict",
    "load_gguf_weights",
    "gguf_name",
    "permute_qk",
    "unpermute_qk",
]
