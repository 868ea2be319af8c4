"""The block-format base class and the registry of formats, keyed by gguf-py's names.

Chapter 11 (GGUF). Every llama.cpp weight format cuts a row into blocks of ``block_size``
weights and stores each block in ``type_size`` bytes. A format is a class with two
class methods over *all blocks at once*: ``quantize_blocks`` (float32 ``[B, block_size]``
-> uint8 ``[B, type_size]``) and ``dequantize_blocks`` (the inverse), as gguf-py does.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Literal

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

__all__ = ["BlockFormat", "FORMATS", "get_format", "imatrix_formats"]

FORMATS: dict[str, type[BlockFormat]] = {}


class BlockFormat(ABC):
    """One llama.cpp block format. Subclasses set ``name`` (gguf-py's name, e.g. ``"Q4_K"``) and say what they can do.

    Attributes (class attributes):
        name: gguf-py's name.
        qtype: the ``gguf.GGMLQuantizationType``.
        block_size, type_size: weights per block and bytes per block (gguf-py's ``GGML_QUANT_SIZES``).
        bits_per_weight: storage cost, ``type_size * 8 / block_size`` (scales included; Q4_K: 4.5).
        imatrix_sigma: how an importance matrix weights this format's search, ``None`` without one:
            ``"row"`` (``imatrix[j]·sqrt(σ² + x²)`` with σ² the mean square of the whole row, the legacy
            types' ``quantize_row_q*_impl``) or ``"block"`` (the K-quants combine the importance with each
            super-block's own statistics).
        no_imatrix_reason: when ``imatrix_sigma`` is ``None``, why (for the error message).
        fallback: what llama.cpp's ``tensor_type_fallback`` stores instead when a row is not a multiple
            of ``block_size`` (``None``: the 32-weight formats, which every supported row length fits).
    """

    name: ClassVar[str]
    qtype: ClassVar[GGMLQuantizationType]
    block_size: ClassVar[int]
    type_size: ClassVar[int]
    bits_per_weight: ClassVar[float]
    imatrix_sigma: ClassVar[Literal["row", "block"] | None] = None
    no_imatrix_reason: ClassVar[str] = "llama.cpp's importance-matrix search for this type is not implemented here"
    fallback: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:  # an intermediate base class sharing code between formats
            return
        cls.qtype = GGMLQuantizationType[cls.name]
        cls.block_size, cls.type_size = GGML_QUANT_SIZES[cls.qtype]
        cls.bits_per_weight = cls.type_size * 8 / cls.block_size
        FORMATS[cls.name] = cls

    @classmethod
    @abstractmethod
    def quantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        """float32 ``[B, block_size]`` -> uint8 ``[B, type_size]``, byte-identical to llama.cpp."""

    @classmethod
    @abstractmethod
    def dequantize_blocks(cls, data: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, type_size]`` -> float32 ``[B, block_size]``, identical to gguf-py."""


def get_format(qtype: str | GGMLQuantizationType) -> type[BlockFormat]:
    """The format class for a gguf-py name (``"Q4_K"``) or a ``GGMLQuantizationType``."""
    name = qtype.name if isinstance(qtype, GGMLQuantizationType) else qtype
    if not isinstance(name, str):
        raise TypeError(f"qtype must be a name like 'Q4_K' or a gguf.GGMLQuantizationType, got {type(qtype).__name__}")
    if name not in FORMATS:
        raise ValueError(f"unknown or unsupported GGUF type {name!r}; choose one of {sorted(FORMATS)}")
    return FORMATS[name]


def imatrix_formats() -> tuple[str, ...]:
    """Names of the formats whose quantization an importance matrix can weight."""
    return tuple(name for name, fmt in FORMATS.items() if fmt.imatrix_sigma is not None)


def le_bytes(values: torch.Tensor, n_bytes: int) -> torch.Tensor:
    """int ``[...]`` -> its ``n_bytes`` little-endian bytes ``[..., n_bytes]`` uint8."""
    shifts = torch.arange(0, 8 * n_bytes, 8, device=values.device)
    return ((values.to(torch.int64).unsqueeze(-1) >> shifts) & 0xFF).to(torch.uint8)


def half_from_bytes(b: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., 2]`` (little-endian IEEE half) -> float32 ``[..., 1]``."""
    return b.contiguous().view(torch.float16).to(torch.float32)


def split_bytes(data: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """Cut uint8 ``[B, type_size]`` into its fields (``sizes`` sums to ``type_size``)."""
    return list(torch.split(data, sizes, dim=-1))
