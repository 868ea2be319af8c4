"""Entry points: quantize a float32 matrix to llama.cpp bytes, and dequantize them back.

Chapter 11 (GGUF).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from gguf import GGMLQuantizationType

from .base import BlockFormat, get_format, imatrix_formats
from .legacy import imatrix_weights

__all__ = ["quantize", "dequantize", "bits_per_weight"]


def _check_matrix(x: torch.Tensor, fmt: type[BlockFormat]) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}; use torch.from_numpy for numpy arrays")
    if x.dtype != torch.float32:
        raise TypeError(f"x must be float32 (llama.cpp quantizes from float32), got {x.dtype}; call x.float() first")
    if x.ndim != 2:
        raise ValueError(f"x must be a 2-D [rows, cols] matrix, got shape {tuple(x.shape)}")
    if x.shape[1] % fmt.block_size != 0:
        raise ValueError(
            f"{fmt.name} needs rows whose length is a multiple of {fmt.block_size}, got {x.shape[1]} columns; "
            "llama.cpp falls back to another type for such tensors (see quantcourse.gguf.tensor_type)"
        )
    if x.numel() and not all(torch.isfinite(m) for m in torch.aminmax(x)):  # one pass; NaN makes both NaN
        raise ValueError("x contains NaN or Inf; llama.cpp refuses such weights, and so do we")


CHUNK_WEIGHTS = 2**18


def _check_imatrix(imatrix: torch.Tensor, x: torch.Tensor, fmt: type[BlockFormat]) -> torch.Tensor:
    if fmt.imatrix_sigma is None:
        raise ValueError(
            f"an importance matrix is supported for {imatrix_formats()}, not {fmt.name}: {fmt.no_imatrix_reason}; "
            "call quantize without imatrix"
        )
    if not isinstance(imatrix, torch.Tensor) or imatrix.dtype != torch.float32 or imatrix.shape != (x.shape[1],):
        raise ValueError(f"imatrix must be a float32 tensor of shape ({x.shape[1]},), one weight per input column")
    if not torch.isfinite(imatrix).all() or (imatrix < 0).any():
        raise ValueError("imatrix must hold finite, non-negative values (mean squared activations)")
    return imatrix


def _quantize_chunks(
    fmt: type[BlockFormat], chunks: list[tuple[torch.Tensor, torch.Tensor | None]], workers: int
) -> list[torch.Tensor]:
    """Quantize ``(blocks, imatrix)`` chunks, ``workers`` of them at a time, each on one intra-op thread.

    A chunk's operations are small (about 2**18 weights) and many, so running whole chunks side by
    side on the cores beats splitting every operation across them: torch releases the GIL inside
    each operation, and the Python between operations overlaps with the other chunk's work.
    """

    def one(chunk: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
        blocks, qw = chunk
        return fmt.quantize_blocks(blocks) if qw is None else fmt.quantize_blocks(blocks, imatrix=qw)

    if workers == 1 or len(chunks) == 1:
        return [one(c) for c in chunks]
    saved = torch.get_num_threads()

    def one_thread(chunk):
        torch.set_num_threads(1)  # the worker's own parallelism would fight the other workers'
        return one(chunk)

    try:
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(one_thread, chunks))
    finally:
        torch.set_num_threads(saved)


def quantize(
    x: torch.Tensor,
    qtype: str | GGMLQuantizationType,
    *,
    imatrix: torch.Tensor | None = None,
    chunk_blocks: int | None = None,
    num_threads: int | None = None,
) -> torch.Tensor:
    """Quantize a float32 matrix to llama.cpp's bytes for ``qtype``, byte-identical to ``ggml_quantize_chunk``
    without an importance matrix.

    Args:
        x: float32 ``[rows, cols]``; ``cols`` a multiple of the format's block size (32 or 256). Not modified.
        qtype: gguf-py name (``"Q4_K"``) or a ``gguf.GGMLQuantizationType``.
        imatrix: optional float32 ``[cols]`` importance of each input column (mean x² of the
            activations, :func:`~quantcourse.gguf.imatrix.compute_imatrix`); llama.cpp then uses
            ``quantize_row_q*_impl``. Supported for Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K
            (llama.cpp ignores it for Q8_0; Q2_K and Q3_K with an imatrix are not implemented).
        chunk_blocks: blocks processed per vectorized step (a memory/cache knob; the bytes do not depend
            on it). The default, about 2**18 weights (1 MiB of float32), keeps a search's working
            tensors in cache; chunks 16 times larger run about half as fast.
        num_threads: chunks quantized side by side on the CPU (default ``torch.get_num_threads()``);
            the bytes do not depend on it. With more than one, torch's intra-op thread count is 1
            during the call and restored after. Ignored for tensors on a GPU.
    Returns:
        uint8 tensor ``[rows, cols // block_size * type_size]`` on ``x``'s device, the rows as a GGUF file stores
        them (``.numpy()`` for gguf-py); :func:`dequantize` takes it back.
    """
    fmt = get_format(qtype)
    _check_matrix(x, fmt)
    blocks = x.detach().reshape(-1, fmt.block_size)
    if chunk_blocks is None:
        chunk_blocks = max(1, CHUNK_WEIGHTS // fmt.block_size)
    elif isinstance(chunk_blocks, bool) or not isinstance(chunk_blocks, int) or chunk_blocks < 1:
        raise ValueError(f"chunk_blocks must be a positive int (or None for the default), got {chunk_blocks!r}")
    if num_threads is None:
        num_threads = torch.get_num_threads()
    elif isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads must be a positive int (or None for torch's thread count), got {num_threads!r}")
    if imatrix is None:
        weights: list[torch.Tensor | None] = [None] * -(-len(blocks) // chunk_blocks)
    else:
        imatrix = _check_imatrix(imatrix, x, fmt).detach()
        if fmt.imatrix_sigma == "row":
            qw = imatrix_weights(x.detach(), imatrix).reshape(-1, fmt.block_size)
        else:  # the K-quants combine the imatrix with each super-block's own statistics
            qw = imatrix.repeat(x.shape[0]).reshape(-1, fmt.block_size)
        weights = list(torch.split(qw, chunk_blocks))
    chunks = list(zip(torch.split(blocks, chunk_blocks), weights, strict=True))
    parts = _quantize_chunks(fmt, chunks, 1 if x.device.type != "cpu" else num_threads) if chunks else []
    out = torch.cat(parts) if parts else torch.empty((0, fmt.type_size), dtype=torch.uint8, device=x.device)
    return out.reshape(x.shape[0], -1)


def dequantize(
    data: np.ndarray | torch.Tensor, qtype: str | GGMLQuantizationType, shape: tuple[int, int]
) -> torch.Tensor:
    """Decode llama.cpp bytes to float32, identically to gguf-py's ``dequantize``.

    Args:
        data: uint8 bytes (any shape, ``rows · cols / block_size · type_size`` of them): a tensor (e.g. from
            :func:`quantize`; decoded on its device) or a numpy array (e.g. from gguf-py's reader).
        qtype: gguf-py name or ``GGMLQuantizationType``.
        shape: ``(rows, cols)`` of the float matrix.
    Returns:
        float32 tensor of ``shape`` (on ``data``'s device).
    """
    fmt = get_format(qtype)
    if not isinstance(data, torch.Tensor) and np.asarray(data).dtype != np.uint8:
        raise TypeError(f"data must be uint8 bytes, got {np.asarray(data).dtype}")
    raw = (
        data if isinstance(data, torch.Tensor) else torch.from_numpy(np.array(data, dtype=np.uint8))
    )  # a writable copy
    if raw.dtype != torch.uint8:
        raise TypeError(f"data must be uint8 bytes, got {raw.dtype}")
    rows, cols = shape
    if cols % fmt.block_size != 0:
        raise ValueError(f"{fmt.name} rows must be a multiple of {fmt.block_size}, got shape {tuple(shape)}")
    expected = rows * cols // fmt.block_size * fmt.type_size
    if raw.numel() != expected:
        raise ValueError(f"{fmt.name} of shape {tuple(shape)} takes {expected} bytes, got {raw.numel()}")
    return fmt.dequantize_blocks(raw.reshape(-1, fmt.type_size)).reshape(rows, cols)


def bits_per_weight(qtype: str | GGMLQuantizationType) -> float:
    """Bits per weight of a block format, scales included (Q4_K: 4.5)."""
    return get_format(qtype).bits_per_weight
