"""Memory arithmetic: how many bytes a model, its quantization metadata and its KV cache take,
and how fast decoding can possibly be.

Chapter 1 (Memory arithmetic) teaches these. Sizes are in bytes; the tables use decimal
gigabytes (1 GB = 10^9 bytes), as model cards and the usual back-of-the-envelope tables do::

    7B parameters x 4 bytes (fp32)  = 28 GB      x 1 byte (int8)    = 7 GB
    7B parameters x 2 bytes (fp16)  = 14 GB      x 0.5 byte (int4)  = 3.5 GB

A quantized format also stores a scale (and maybe a zero point) per group of ``group_size``
weights, so its *effective* bits per weight is ``n_bits + (scale_bits + zero_point_bits) /
group_size``: int4 with an fp16 scale per 64 weights costs 4.25 bits, not 4.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .formats import FORMATS, get_format

__all__ = [
    "FORMAT_BITS",
    "GB",
    "bits_per_weight",
    "model_bytes",
    "memory_table",
    "kv_cache_bytes",
    "kv_cache_bytes_for",
    "decode_tokens_per_second_bound",
    "count_parameters",
    "model_size_report",
]

GB = 1e9  # decimal gigabyte, as in "a 7B model in fp16 is 14 GB"
# The formats of the usual memory table (chapter 1), with their bits from the format registry.
FORMAT_BITS = {name: get_format(name).bits for name in ("fp32", "fp16", "bf16", "int8", "int4")}


def _check_positive(name: str, value: Any, *, integer: bool = False, allow_zero: bool = False) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or value < 0 or (value == 0 and not allow_zero):
        what = "a positive int" if integer else "a positive number"
        raise ValueError(f"{name} must be {what}, got {value!r}")


def bits_per_weight(
    n_bits: int, group_size: int | None = None, *, scale_bits: int = 16, zero_point_bits: int = 0
) -> float:
    """Effective storage bits per weight, counting one scale (and zero point) per group.

    Args:
        n_bits: bits of each code (e.g. 4).
        group_size: weights sharing one scale; ``None`` when the overhead is negligible
            (per-tensor or per-channel on a wide matrix), which returns ``n_bits``.
        scale_bits: bits of each scale (16 for an fp16 scale).
        zero_point_bits: bits of each zero point (0 for symmetric schemes).

    Returns:
        ``n_bits + (scale_bits + zero_point_bits) / group_size``; e.g. ``bits_per_weight(4, 64) = 4.25``.
    """
    _check_positive("n_bits", n_bits)
    if group_size is None:
        return float(n_bits)
    _check_positive("group_size", group_size, integer=True)
    _check_positive("scale_bits", scale_bits, allow_zero=True)
    _check_positive("zero_point_bits", zero_point_bits, allow_zero=True)
    return n_bits + (scale_bits + zero_point_bits) / group_size


def model_bytes(n_params: int, bits_per_weight: float) -> float:
    """Bytes taken by ``n_params`` weights stored at ``bits_per_weight`` bits each."""
    _check_positive("n_params", n_params, allow_zero=True)
    _check_positive("bits_per_weight", bits_per_weight)
    return n_params * bits_per_weight / 8


def _format_bits(fmt: str | float) -> float:
    if isinstance(fmt, (int, float)) and not isinstance(fmt, bool):
        return float(fmt)
    try:
        return get_format(fmt).bits
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"unknown format {fmt!r}: use a name from quantcourse.formats.FORMATS ({', '.join(FORMATS)}), "
            "or a number of bits"
        ) from e


def memory_table(
    models: Mapping[str, int | float], formats: Sequence[str | float] = ("fp32", "fp16", "int8", "int4")
) -> list[dict]:
    """Weight memory of each model in each format, in decimal GB.

    Args:
        models: name -> parameter count, e.g. ``{"7B": 7e9, "13B": 13e9, "70B": 70e9}``.
        formats: keys of :data:`FORMAT_BITS`, other format names (``"int3"``, ``"fp8_e4m3"``) or
            numbers of bits per weight (e.g. ``4.25``).

    Returns:
        one dict per model: ``{"model": name, "<format>": GB, ...}``; for 7B: fp32 28, fp16 14,
        int8 7, int4 3.5.
    """
    bits = {f: _format_bits(f) for f in formats}
    return [{"model": name, **{str(f): model_bytes(n, b) / GB for f, b in bits.items()}} for name, n in models.items()]


def kv_cache_bytes(
    *, n_layers: int, n_kv_heads: int, head_dim: int, seq_len: int, batch_size: int = 1, bytes_per_element: float = 2
) -> int:
    """Bytes of the key/value cache: ``2 (K and V) x layers x kv_heads x head_dim x seq_len x batch x bytes``.

    With grouped-query attention ``n_kv_heads`` is smaller than the number of query heads, and the
    cache shrinks by the same factor.
    """
    for name, value in (
        ("n_layers", n_layers),
        ("n_kv_heads", n_kv_heads),
        ("head_dim", head_dim),
        ("seq_len", seq_len),
        ("batch_size", batch_size),
    ):
        _check_positive(name, value, integer=True)
    _check_positive("bytes_per_element", bytes_per_element)
    return int(2 * n_layers * n_kv_heads * head_dim * seq_len * batch_size * bytes_per_element)


def kv_cache_bytes_for(config: Any, *, seq_len: int, batch_size: int = 1, bytes_per_element: float = 2) -> int:
    """:func:`kv_cache_bytes` for a transformers config (``model.config``).

    Reads ``num_hidden_layers``, ``num_key_value_heads`` (falling back to ``num_attention_heads``
    when the model has no grouped-query attention) and ``head_dim`` (falling back to
    ``hidden_size // num_attention_heads``).
    """
    try:
        n_layers = config.num_hidden_layers
        n_heads = config.num_attention_heads
        n_kv_heads = getattr(config, "num_key_value_heads", None) or n_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    except AttributeError as e:
        raise ValueError(
            f"config {type(config).__name__} lacks a field kv_cache_bytes_for needs ({e}); "
            "call kv_cache_bytes(...) with the numbers instead"
        ) from e
    return kv_cache_bytes(
        n_layers=n_layers,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        seq_len=seq_len,
        batch_size=batch_size,
        bytes_per_element=bytes_per_element,
    )


def decode_tokens_per_second_bound(*, bandwidth_bytes_per_s: float, bytes_per_token: float) -> float:
    """Upper bound on decoding speed when memory bandwidth is the bottleneck.

    Generating one token reads every weight (and the KV cache) once, so
    ``tokens/s <= bandwidth / bytes read per token``: a 14 GB fp16 7B model on a 1 TB/s GPU
    cannot exceed ~71 tokens/s at batch size 1, and int4 raises the ceiling 4x.
    """
    _check_positive("bandwidth_bytes_per_s", bandwidth_bytes_per_s)
    _check_positive("bytes_per_token", bytes_per_token)
    return bandwidth_bytes_per_s / bytes_per_token


def _unique_parameters(model: torch.nn.Module, skip: set[int]) -> list[torch.nn.Parameter]:
    # model.parameters() yields a tied (shared) Parameter once
    return [p for p in model.parameters() if id(p) not in skip]


def count_parameters(model: torch.nn.Module, *, include_embeddings: bool = True) -> int:
    """Number of parameters, counting shared (tied) tensors once.

    Args:
        model: any ``nn.Module``.
        include_embeddings: if False, leave out every ``nn.Embedding`` weight (token and position
            embeddings), and with it an output head tied to the token embedding. An untied output
            head is a linear layer and still counts.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    skip: set[int] = set()
    if not include_embeddings:
        for m in model.modules():
            if isinstance(m, torch.nn.Embedding):
                skip.add(id(m.weight))
    return sum(p.numel() for p in _unique_parameters(model, skip))


def model_size_report(model: torch.nn.Module, bits_per_weight: float) -> dict:
    """How big ``model`` is now and would be with every parameter at ``bits_per_weight``.

    Returns:
        ``{"n_params", "n_params_non_embedding", "bits_per_weight", "bytes", "megabytes",
        "fp32_bytes", "fp16_bytes", "compression_vs_fp32", "compression_vs_fp16",
        "current_bytes"}``; ``current_bytes`` counts the parameters in their present dtypes.
    """
    _check_positive("bits_per_weight", bits_per_weight)
    n = count_parameters(model)
    size = model_bytes(n, bits_per_weight)
    current = sum(p.numel() * p.element_size() for p in _unique_parameters(model, set()))
    return {
        "n_params": n,
        "n_params_non_embedding": count_parameters(model, include_embeddings=False),
        "bits_per_weight": float(bits_per_weight),
        "bytes": size,
        "megabytes": size / 1e6,
        "fp32_bytes": model_bytes(n, 32),
        "fp16_bytes": model_bytes(n, 16),
        "compression_vs_fp32": 32 / bits_per_weight,
        "compression_vs_fp16": 16 / bits_per_weight,
        "current_bytes": current,
    }
