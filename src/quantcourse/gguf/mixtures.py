"""llama.cpp's quantization mixtures: which type each tensor gets in a Q4_K_M (etc.) file.

Chapter 11 (GGUF). ``llama-quantize model.gguf out.gguf Q4_K_M`` does not store every tensor as
Q4_K: ``llama_tensor_get_type`` in ``src/llama-quant.cpp`` raises some tensors (``attn_v`` and
``ffn_down`` on the ``use_more_bits`` layers, the output matrix) and then falls back to a
32-block type when a row is not a multiple of 256 (``tensor_type_fallback``). This module
reproduces those rules for the mixtures the course uses, for Llama-family models (llama.cpp
version of llama-cpp-python 0.3.36; no importance matrix).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import LlamaFileType

from .base import get_format

__all__ = ["MIXTURES", "TensorChoice", "use_more_bits", "tensor_type", "plan_mixture"]

# mixture -> (base type, general.file_type)
MIXTURES: dict[str, tuple[str, LlamaFileType]] = {
    "Q4_0": ("Q4_0", LlamaFileType.MOSTLY_Q4_0),
    "Q8_0": ("Q8_0", LlamaFileType.MOSTLY_Q8_0),
    "Q4_K_S": ("Q4_K", LlamaFileType.MOSTLY_Q4_K_S),
    "Q4_K_M": ("Q4_K", LlamaFileType.MOSTLY_Q4_K_M),
    "Q5_K_M": ("Q5_K", LlamaFileType.MOSTLY_Q5_K_M),
    "Q6_K": ("Q6_K", LlamaFileType.MOSTLY_Q6_K),
}


@dataclass(frozen=True)
class TensorChoice:
    """The type llama.cpp gives one tensor.

    Attributes:
        name: GGUF tensor name (``blk.3.attn_v.weight``).
        qtype: gguf-py type name (``"Q6_K"``, or ``"F32"`` for tensors left unquantized).
        wanted: the type the mixture rules asked for before the row-size fallback.
        reason: the rule that decided, in words.
    """

    name: str
    qtype: str
    wanted: str
    reason: str

    @property
    def fell_back(self) -> bool:
        return self.qtype != self.wanted


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers that get more bits: the first and last eighth, and every third between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _layer(name: str) -> int:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def _mixture_rule(name: str, base: str, mixture: str, n_layers: int, tied: bool) -> tuple[str, str]:
    """``llama_tensor_get_type_impl`` restricted to Llama-family models and the mixtures above."""
    i = _layer(name)
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        # the output matrix (or the embedding that doubles as it) is kept at 6+ bits
        if base == "Q8_0":
            return "Q8_0", "output matrix: already Q8_0"
        return "Q6_K", "output matrix -> Q6_K" + (" (tied embeddings: token_embd is the output)" if tied else "")
    if "attn_v.weight" in name:
        if mixture in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n_layers):
            return "Q6_K", f"attn_v on a use_more_bits layer ({i}) -> Q6_K"
        if mixture == "Q4_K_S" and i < 4:
            return "Q5_K", "attn_v in the first 4 layers -> Q5_K"
    if "ffn_down" in name:
        if mixture in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n_layers):
            return "Q6_K", f"ffn_down on a use_more_bits layer ({i}) -> Q6_K"
        if mixture == "Q4_K_S" and i < n_layers // 8:
            return "Q5_K", f"ffn_down in the first n/8 layers ({i}) -> Q5_K"
    return base, f"base type of {mixture}"


def tensor_type(
    name: str, shape: tuple[int, ...], mixture: str, *, n_layers: int, tied_embeddings: bool
) -> TensorChoice:
    """The type llama.cpp's ``llama_tensor_get_type`` gives one tensor.

    Args:
        name: GGUF name (``blk.N.attn_q.weight``, ``token_embd.weight``, ``output.weight``, ...).
        shape: PyTorch shape ``[out, in]``; ``in`` is llama.cpp's ``ne[0]``, the row length.
        mixture: one of :data:`MIXTURES`.
        n_layers: number of decoder layers.
        tied_embeddings: True when the file has no ``output.weight`` (token_embd is then treated as the output).
    Returns:
        :class:`TensorChoice`. 1-D tensors and norms stay ``F32``.
    """
    if mixture not in MIXTURES:
        raise ValueError(f"unknown mixture {mixture!r}; choose one of {sorted(MIXTURES)}")
    if len(shape) < 2 or not name.endswith("weight") or "_norm.weight" in name:
        return TensorChoice(name, "F32", "F32", "1-D tensors and norms are not quantized")
    base = MIXTURES[mixture][0]
    wanted, reason = _mixture_rule(name, base, mixture, n_layers, tied_embeddings)
    qtype, ne0, fmt = wanted, shape[-1], get_format(wanted)
    if ne0 % fmt.block_size != 0:  # tensor_type_fallback: a 256-block type on a row that 256 does not divide
        qtype = fmt.fallback or wanted
        if ne0 % get_format(qtype).block_size != 0:
            qtype = "F16"
        reason += f"; rows of {ne0} are not a multiple of {fmt.block_size} -> fallback {qtype}"
    return TensorChoice(name, qtype, wanted, reason)


def plan_mixture(shapes: dict[str, tuple[int, ...]], mixture: str, *, n_layers: int) -> dict[str, TensorChoice]:
    """:func:`tensor_type` for every tensor of a model (``shapes``: GGUF name -> PyTorch shape)."""
    tied = "output.weight" not in shapes
    return {
        name: tensor_type(name, shape, mixture, n_layers=n_layers, tied_embeddings=tied)
        for name, shape in shapes.items()
    }
