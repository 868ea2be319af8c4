"""Triton kernels for quantized inference, each beside the library reference it must equal.

Chapter 12 (Triton kernels) teaches them. Four kernels, one per way a quantized layer is computed, each
with the library code it must equal:

- :func:`quantize_per_token_int8`: int8 codes and one absmax scale per token; reference
  ``quantize(x, choose_qparams(x, 8, granularity=PerToken()))``.
- :func:`w4a16_linear` (:func:`w4a16_gemv` for decode, :func:`w4a16_gemm` for prefill): ``x @ dequant(W4)ᵀ``
  for a 4-bit group-wise :class:`Int4Weight`; reference ``Int4Weight.dequantize`` (``weights.dequantize_codes``).
- :func:`nf4_dequantize` and the fused :func:`nf4_gemv`: bitsandbytes NF4; reference
  :func:`layout.nf4_dequantize_reference`, itself tested against ``bitsandbytes.functional``.
- :func:`w8a8_matmul`: ``(q_x @ q_wᵀ) * s_x * s_w``, the int8 GEMM with both scales in its epilogue;
  reference :func:`layout.w8a8_reference`.

Triton is imported on first use, so ``import quantcourse`` (and this package) works without it. Tensors on a
CUDA device run compiled kernels; CPU tensors run through Triton's interpreter, which needs
``TRITON_INTERPRET=1`` in the environment before the kernels are first imported (this package sets it when no
CUDA device exists and nobody set it). :func:`available` says what runs where.
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache

import torch

from .layout import (
    NF4_CODE,
    Int4Weight,
    check_activation,
    nf4_dequantize_reference,
    per_channel_int8,
    per_token_int8_reference,
    w4a16_reference,
    w8a8_reference,
)

__all__ = [
    "available",
    "Int4Weight",
    "NF4_CODE",
    "quantize_per_token_int8",
    "w4a16_gemv",
    "w4a16_gemm",
    "w4a16_linear",
    "nf4_dequantize",
    "nf4_gemv",
    "w8a8_matmul",
    "per_token_int8_reference",
    "per_channel_int8",
    "w4a16_reference",
    "w8a8_reference",
    "nf4_dequantize_reference",
    "choose_split_k",
]

KERNELS = ("quantize_per_token_int8", "w4a16_gemv", "w4a16_gemm", "nf4_dequantize", "nf4_gemv", "w8a8_matmul")
GEMV_MAX_ROWS = 4  # up to this many tokens the GEMV (one program per row and output block) beats tiling M


def _triton_installed() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ValueError, ImportError):  # a module set to None in sys.modules (how tests hide it)
        return False


def available() -> dict:
    """What runs where: Triton's version, the CUDA device, the interpreter, and each kernel's backends.

    Returns:
        ``{"triton": version or None, "cuda": device name or None, "interpreter": bool,
        "kernels": {name: ["cuda", "interpreter"] subset}, "note": str}``. ``interpreter`` is True when
        ``TRITON_INTERPRET=1`` (CPU tensors can run); CUDA tensors need a GPU and the compiled mode.
    """
    version = None
    if _triton_installed():
        import importlib.metadata

        try:
            version = importlib.metadata.version("triton")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1" or (version is not None and cuda is None)
    backends = []
    if version is not None and cuda is not None and not interpret:
        backends.append("cuda")
    if version is not None and interpret:
        backends.append("interpreter")
    if version is None:
        note = "Triton is not installed: only the eager references run (pip install triton)"
    elif "cuda" in backends:
        note = f"compiled Triton kernels on {cuda}"
    elif cuda is not None:
        note = f"TRITON_INTERPRET=1: the kernels run through the interpreter on CPU tensors although {cuda} is present"
    else:
        note = "no CUDA device: the kernels run through Triton's interpreter on CPU (correct numbers, no speed)"
    return {
        "triton": version,
        "cuda": cuda,
        "interpreter": bool(version is not None and interpret),
        "kernels": {name: list(backends) for name in KERNELS},
        "note": note,
    }


@lru_cache(maxsize=1)
def _kernels():
    """Import the Triton kernels once (turning the interpreter on when there is no CUDA device)."""
    if not _triton_installed():
        raise RuntimeError("quantcourse.kernels needs Triton: pip install triton (the eager references work without)")
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from . import _triton

    return _triton


def _check_device(*tensors: torch.Tensor) -> None:
    k = _kernels()
    device = tensors[0].device
    for t in tensors:
        if t.device != device:
            raise ValueError(f"all tensors must be on one device, got {device} and {t.device}")
    if device.type == "cuda" and k.INTERPRET:
        raise RuntimeError(
            "TRITON_INTERPRET=1 is set, so the kernels run on CPU tensors only: move the tensors to CPU or unset it"
        )
    if device.type == "cpu" and not k.INTERPRET:
        raise RuntimeError(
            "compiled Triton kernels need CUDA tensors; for CPU tensors set TRITON_INTERPRET=1 before importing "
            "quantcourse.kernels (the interpreter runs them, slowly)"
        )
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"the kernels run on CUDA (compiled) or CPU (interpreter), not on {device}")


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def choose_split_k(programs: int, K: int, device: torch.device, *, block_k: int = 128) -> int:
    """How many K-slices to split a skinny product into so that the GPU has enough programs.

    With ``programs`` output tiles and ``S`` streaming multiprocessors, split until there are about two
    programs per SM, keeping each slice at least 4 blocks of ``block_k`` long. On CPU (interpreter) 1.
    """
    sms = _num_sms(device)
    if device.type != "cuda" or programs >= 2 * sms:
        return 1
    return max(1, min(-(-2 * sms // programs), K // (4 * block_k), 16))


def _check_split_k(split_k: int | None) -> None:
    if split_k is not None and (isinstance(split_k, bool) or not isinstance(split_k, int) or split_k < 1):
        raise ValueError(f"split_k must be a positive int (or None to choose), got {split_k!r}")


def _check_half_or_float(x: torch.Tensor) -> None:
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")


def quantize_per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax int8 of activations ``x [..., K]`` (float16/bfloat16/float32) in one kernel launch.

    Returns:
        ``(codes, scale)``: int8 ``[..., K]`` in ``[-127, 127]`` and float32 ``[..., 1]``, equal to
        ``quantize(x, choose_qparams(x, 8, granularity=PerToken()))`` and its scale.
    """
    from ..primitives import SCALE_EPS, check_float_tensor

    check_float_tensor(x)
    _check_half_or_float(x)
    k = _kernels()
    _check_device(x)
    K = x.shape[-1]
    x2 = x.reshape(-1, K).contiguous()
    q = torch.empty(x2.shape, dtype=torch.int8, device=x.device)
    s = torch.empty((x2.shape[0], 1), dtype=torch.float32, device=x.device)
    block_k = 64 if k.INTERPRET else min(4096, max(128, 1 << (K - 1).bit_length()))
    k.per_token_int8_kernel[(x2.shape[0],)](x2, q, s, K, x2.stride(0), q.stride(0), EPS=SCALE_EPS, BLOCK_K=block_k)
    return q.reshape(x.shape), s.reshape(*x.shape[:-1], 1)


def _check_int4(x: torch.Tensor, weight: Int4Weight) -> torch.Tensor:
    if not isinstance(weight, Int4Weight):
        raise TypeError(
            f"weight must be an Int4Weight (Int4Weight.from_record(weights.rtn_quantize(W, 4, ...))), got "
            f"{type(weight).__name__}"
        )
    check_activation(x, weight.in_features)
    _check_half_or_float(x)
    _check_device(x, weight.packed, weight.scale, weight.zero)
    return x.reshape(-1, weight.in_features).contiguous()


def w4a16_gemv(x: torch.Tensor, weight: Int4Weight, *, split_k: int | None = None) -> torch.Tensor:
    """Fused dequantize-and-multiply for a few tokens (decode): ``x [..., K] @ dequant(weight)ᵀ -> [..., N]``.

    One program per (block of ``BLOCK_N`` outputs, token, K-slice); the 4-bit weight is read once and
    dequantized in registers. ``split_k`` K-slices (default: :func:`choose_split_k`) give the GPU enough
    programs when ``N`` alone does not; their float32 partial sums are added in a fixed order.
    Result dtype: ``x.dtype``; accumulation in float32.
    """
    _check_split_k(split_k)
    x2 = _check_int4(x, weight)
    w = weight
    return _gemv(
        _kernels().w4a16_gemv_kernel, x, x2, w.out_features, (w.packed, w.scale, w.zero),
        (w.packed.stride(0), w.scale.stride(0), w.zero.stride(0)), split_k, GROUP_SIZE=w.group_size,
    )  # fmt: skip


def _gemv(kernel, x, x2, N, weights, weight_strides, split_k, **constexprs) -> torch.Tensor:
    """Launch a split-K GEMV ``kernel`` on ``x2 [M, K]`` (grid: N blocks x M rows x K-slices) and add the slices."""
    M, K = x2.shape
    if split_k is None:
        split_k = choose_split_k(-(-N // 64) * M, K, x.device)
    part = torch.empty((split_k, M, N), dtype=torch.float32, device=x.device)

    def grid(meta):
        return (triton_cdiv(N, meta["BLOCK_N"]), M, split_k)

    kernel[grid](
        x2, *weights, part, M, N, K, split_k, x2.stride(0), *weight_strides, part.stride(0), part.stride(1),
        **constexprs,
    )  # fmt: skip
    return part.sum(0).to(x.dtype).reshape(*x.shape[:-1], N)


def w4a16_gemm(x: torch.Tensor, weight: Int4Weight, *, split_k: int | None = None) -> torch.Tensor:
    """Tiled W4A16 matmul for many tokens (prefill): ``x [..., K] @ dequant(weight)ᵀ -> [..., N]``.

    The tutorial's matmul in grouped tile order, each weight tile dequantized in registers between its
    load and ``tl.dot``; ``split_k`` as in :func:`w4a16_gemv`. float32 inputs multiply in full precision
    (no TF32); float16/bfloat16 on the tensor cores with float32 accumulation.
    """
    _check_split_k(split_k)
    x2 = _check_int4(x, weight)
    k = _kernels()
    M, K = x2.shape
    N = weight.out_features
    if split_k is None:
        split_k = choose_split_k(-(-M // 64) * -(-N // 128), K, x.device, block_k=64)
    part = torch.empty((split_k, M, N), dtype=torch.float32, device=x.device)
    if k.INTERPRET and x2.dtype == torch.bfloat16:
        # the interpreter's tl.dot reads bfloat16 tiles wrongly (NumPy has no bfloat16): on CPU, multiply the
        # bfloat16 inputs exactly in float32 instead (the compiled kernel uses bfloat16 tensor cores)
        x2 = x2.float()

    def grid(meta):
        return (triton_cdiv(M, meta["BLOCK_M"]) * triton_cdiv(N, meta["BLOCK_N"]), split_k)

    k.w4a16_gemm_kernel[grid](
        x2, weight.packed, weight.scale, weight.zero, part,
        M, N, K, split_k,
        x2.stride(0), x2.stride(1), weight.packed.stride(0), weight.scale.stride(0), weight.zero.stride(0),
        part.stride(0), part.stride(1),
        GROUP_SIZE=weight.group_size, IEEE=x2.dtype == torch.float32,
    )  # fmt: skip
    return part.sum(0).to(x.dtype).reshape(*x.shape[:-1], N)


def w4a16_linear(x: torch.Tensor, weight: Int4Weight, *, split_k: int | None = None) -> torch.Tensor:
    """``x @ dequant(weight)ᵀ``: the GEMV for up to :data:`GEMV_MAX_ROWS` tokens, the GEMM beyond."""
    rows = x.numel() // max(x.shape[-1], 1) if isinstance(x, torch.Tensor) and x.dim() else 0
    fn = w4a16_gemv if rows <= GEMV_MAX_ROWS else w4a16_gemm
    return fn(x, weight, split_k=split_k)


def _check_nf4(packed: torch.Tensor, absmax: torch.Tensor, n: int, blocksize: int) -> None:
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise TypeError("packed must be the uint8 NF4 codes (bitsandbytes.functional.quantize_4bit's first output)")
    if packed.numel() != (n + 1) // 2:
        raise ValueError(f"{n} NF4 codes take {(n + 1) // 2} bytes, packed holds {packed.numel()}")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize must be a positive int (bitsandbytes uses 64), got {blocksize!r}")
    if absmax.numel() != -(-n // blocksize):
        need = -(-n // blocksize)
        raise ValueError(f"{n} elements in blocks of {blocksize} need {need} absmax, got {absmax.numel()}")


def _nf4_table(device: torch.device) -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def nf4_dequantize(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, ...],
    *,
    blocksize: int = 64,
    dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """Dequantize bitsandbytes NF4 (``quantize_4bit(..., quant_type="nf4")``) to ``dtype`` of ``shape``.

    Args:
        packed: uint8, ``ceil(n / 2)`` bytes in any shape; element ``2j`` in the high nibble of byte ``j``.
        absmax: float32 ``[ceil(n / blocksize)]``, one per block (``quant_state.absmax``).
        shape: the tensor's shape (``quant_state.shape``).
        blocksize: elements per absmax (``quant_state.blocksize``).
        dtype: result dtype.
    """
    n = int(torch.Size(shape).numel())
    _check_nf4(packed, absmax, n, blocksize)
    k = _kernels()
    _check_device(packed, absmax)
    out = torch.empty(n, dtype=dtype, device=packed.device)
    block = 256 if k.INTERPRET else 1024
    k.nf4_dequantize_kernel[(triton_cdiv(n, block),)](
        packed.reshape(-1).contiguous(), absmax.reshape(-1).float().contiguous(), _nf4_table(packed.device), out, n,
        BLOCKSIZE=blocksize, BLOCK=block,
    )  # fmt: skip
    return out.reshape(shape)


def nf4_gemv(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, int],
    *,
    blocksize: int = 64,
    split_k: int | None = None,
) -> torch.Tensor:
    """Fused NF4 dequantize-and-multiply: ``x [..., K] @ Wᵀ`` with ``W [N, K]`` stored as bitsandbytes NF4.

    Result dtype ``x.dtype``, float32 accumulation; ``split_k`` as in :func:`w4a16_gemv`.
    """
    _check_split_k(split_k)
    if len(shape) != 2:
        raise ValueError(f"shape must be the weight's (N, K), got {shape}")
    N, K = (int(s) for s in shape)
    _check_nf4(packed, absmax, N * K, blocksize)
    check_activation(x, K)
    _check_half_or_float(x)
    k = _kernels()
    _check_device(x, packed, absmax)
    weights = (packed.reshape(-1).contiguous(), absmax.reshape(-1).float().contiguous(), _nf4_table(x.device))
    return _gemv(k.nf4_gemv_kernel, x, x.reshape(-1, K).contiguous(), N, weights, (), split_k, BLOCKSIZE=blocksize)


def w8a8_matmul(
    qx: torch.Tensor, sx: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor, *, out_dtype: torch.dtype = torch.float16
) -> torch.Tensor:
    """int8 GEMM with both scales in the epilogue: ``(qx @ qwᵀ) * sx * swᵀ``.

    Args:
        qx: int8 ``[M, K]`` per-token codes (:func:`quantize_per_token_int8`).
        sx: float32 ``[M, 1]`` (or ``[M]``) token scales.
        qw: int8 ``[N, K]`` per-channel weight codes (:func:`layout.per_channel_int8`).
        sw: float32 ``[N, 1]`` (or ``[N]``) channel scales.
        out_dtype: float16, bfloat16 or float32.

    Returns:
        ``out_dtype`` ``[M, N]``; the int32 accumulation is exact (``K < 2**31 / 127**2``).
    """
    for name, t in (("qx", qx), ("qw", qw)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int8 or t.dim() != 2:
            raise TypeError(f"{name} must be a 2-D int8 tensor of codes, got {getattr(t, 'dtype', type(t).__name__)}")
    M, K = qx.shape
    N = qw.shape[0]
    if qw.shape[1] != K:
        raise ValueError(f"qx has K={K} columns but qw has {qw.shape[1]}: qw must be [N, K] (out, in)")
    if sx.numel() != M or sw.numel() != N:
        raise ValueError(
            f"sx needs {M} scales (one per token) and sw {N} (one per channel); got {sx.numel()}, {sw.numel()}"
        )
    if out_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
    k = _kernels()
    _check_device(qx, qw, sx, sw)
    y = torch.empty((M, N), dtype=out_dtype, device=qx.device)

    def grid(meta):
        return (triton_cdiv(M, meta["BLOCK_M"]) * triton_cdiv(N, meta["BLOCK_N"]),)

    k.w8a8_gemm_kernel[grid](
        qx, qw, sx.reshape(-1).float().contiguous(), sw.reshape(-1).float().contiguous(), y,
        M, N, K, qx.stride(0), qx.stride(1), qw.stride(0), qw.stride(1), y.stride(0),
    )  # fmt: skip
    return y


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
