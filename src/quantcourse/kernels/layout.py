"""The tensors the kernels read, built from the library's records, and the eager references they must equal.

Chapter 12 (Triton kernels) teaches these layouts. Nothing here needs Triton.

**Int4 with groups (W4A16).** :class:`Int4Weight` holds a weight ``W [N, K]`` (``N`` outputs, ``K`` inputs)
quantized to 4-bit codes with one scale and one zero point per group of ``group_size`` consecutive inputs:
``W[n, k] ≈ scale[n, g] * (code[n, k] - zero[n, g])`` with ``g = k // group_size``. The codes are packed
with :func:`quantcourse.packing.pack_codes`: two per byte along ``K``, **code ``k`` of a row in the low nibble
of byte ``k // 2`` when ``k`` is even, in the high nibble when it is odd**; an odd ``K`` leaves the last high
nibble 0. It is built from the weight-only record every method returns, :class:`quantcourse.weights.QuantizedWeight`
(``weights.rtn_quantize``, ``gptq.gptq_quantize``, ...), whose ``dequantize`` is the reference.

**NF4 (bitsandbytes).** A tensor flattened row-major, quantized in blocks of ``blocksize`` elements with one
float32 absmax per block; element ``i`` is ``NF4[code_i] * absmax[i // blocksize]``, and the codes are packed
two per byte with **element ``2j`` in the high nibble of byte ``j``** (the opposite of ``pack_codes``).

**Int8 per token x per channel (W8A8).** Activations ``x [M, K]`` get one absmax scale per token (row) and
weights ``W [N, K]`` one per output channel, both from :func:`quantcourse.primitives.choose_qparams`; the
product is ``(q_x @ q_wᵀ)[m, n] * s_x[m] * s_w[n]``, with the integer product exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..granularity import PerChannel, PerToken
from ..packing import pack_codes, unpack_codes
from ..primitives import check_float_tensor, choose_qparams, quantize
from ..weights import QuantizedWeight, consecutive_g_idx, dequantize_codes

__all__ = [
    "Int4Weight",
    "NF4_CODE",
    "per_token_int8_reference",
    "per_channel_int8",
    "w4a16_reference",
    "w8a8_reference",
    "nf4_dequantize_reference",
]

# The 16 NF4 levels (QLoRA, Dettmers et al. 2023, appendix E; bitsandbytes ``get_4bit_type("nf4")``):
# quantiles of N(0, 1) normalised to [-1, 1], with an exact 0. Code 7 is 0.0, code 15 is 1.0.
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982251167297,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


@dataclass(frozen=True)
class Int4Weight:
    """A ``[N, K]`` weight as 4-bit group-wise codes, in the layout the W4A16 kernels read.

    Attributes:
        packed: uint8 ``[N, ceil(K / 2)]``, :func:`quantcourse.packing.pack_codes` of the codes (low nibble first).
        scale: float32 ``[N, n_groups]``.
        zero: uint8 ``[N, n_groups]``, zero points in ``[0, 15]``.
        group_size: inputs per group (``K`` when the record was per channel).
        in_features: ``K``.
    """

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    group_size: int
    in_features: int

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def nbytes(self) -> int:
        """Bytes a kernel reads: codes, scales and zero points."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.zero))

    @classmethod
    def from_record(cls, record: QuantizedWeight) -> Int4Weight:
        """Pack a 4-bit :class:`quantcourse.weights.QuantizedWeight` (from ``rtn_quantize``, ``gptq_quantize``, ...).

        The groups must be consecutive (``g_idx == arange(K) // group_size``): GPTQ with act-order and dynamic
        groups scatters them, and the kernels would need ``g_idx`` per column; quantize with
        ``static_groups=True`` (or without act-order) instead. Codebook formats (NF4) have their own kernels.
        """
        if not isinstance(record, QuantizedWeight):
            raise TypeError(
                f"expected a weight-only record (quantcourse.weights.QuantizedWeight), got {type(record).__name__}"
            )
        if record.n_bits != 4:
            raise ValueError(f"the W4A16 kernels read 4-bit codes; this record has n_bits={record.n_bits}")
        if record.codebook is not None:
            raise ValueError(
                "this record has a codebook (NF4/FP4): the W4A16 kernels read an integer grid; use nf4_dequantize "
                "or nf4_gemv for NF4"
            )
        if not record.has_consecutive_groups:
            raise ValueError(
                "the record's groups are not consecutive (act-order with dynamic groups): the kernels read "
                "group k // group_size; quantize with static_groups=True or act_order=False"
            )
        codes, zero = record.codes, record.zero_point
        if zero.numel() and (int(zero.min()) < 0 or int(zero.max()) > 15):
            raise ValueError("zero points must lie in [0, 15] for 4-bit codes")
        return cls(
            pack_codes(codes, 4).contiguous(),
            record.scale.to(torch.float32).contiguous(),
            zero.to(torch.uint8).contiguous(),
            int(record.group_size or codes.shape[1]),
            int(codes.shape[1]),
        )

    def codes(self) -> torch.Tensor:
        """uint8 codes ``[N, K]`` (:func:`quantcourse.packing.unpack_codes`)."""
        return unpack_codes(self.packed, 4, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The reference weight ``[N, K]``: :func:`quantcourse.weights.dequantize_codes` of the unpacked codes."""
        g_idx = consecutive_g_idx(self.in_features, self.group_size, self.packed.device)
        return dequantize_codes(self.codes(), self.scale, self.zero.to(torch.int32), g_idx, dtype)

    def to(self, device) -> Int4Weight:
        return Int4Weight(
            self.packed.to(device), self.scale.to(device), self.zero.to(device), self.group_size, self.in_features
        )


def per_token_int8_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax int8 of ``x [..., K]`` by the library: int8 codes ``[..., K]``, float32 scales ``[..., 1]``."""
    qp = choose_qparams(x, 8, symmetric=True, granularity=PerToken())
    return quantize(x, qp), qp.scale


def per_channel_int8(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel absmax int8 of a weight ``W [N, K]``: codes int8 ``[N, K]``, scales float32 ``[N, 1]``."""
    qp = choose_qparams(W, 8, symmetric=True, granularity=PerChannel(0))
    return quantize(W, qp), qp.scale


def w4a16_reference(x: torch.Tensor, weight: Int4Weight) -> torch.Tensor:
    """``x [..., K] @ dequantize(weight)ᵀ`` in float32, returned as ``x.dtype`` ``[..., N]``."""
    return (x.float() @ weight.dequantize(torch.float32).T).to(x.dtype)


def w8a8_reference(
    qx: torch.Tensor, sx: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor, out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``(qx @ qwᵀ) * sx * swᵀ``: int8 ``qx [M, K]``, ``qw [N, K]``; float32 ``sx [M, 1]``, ``sw [N, 1]``.

    The integer product is exact (float64 holds it), converted to float32 and scaled as the kernel's epilogue does.
    """
    acc = (qx.double() @ qw.double().T).float()
    return (acc * sx.reshape(-1, 1).float() * sw.reshape(1, -1).float()).to(out_dtype)


def nf4_dequantize_reference(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, ...],
    blocksize: int = 64,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dequantize bitsandbytes NF4: ``packed`` uint8 (``ceil(n / 2)`` bytes), ``absmax`` float32 ``[n_blocks]``.

    Returns ``NF4_CODE[code_i] * absmax[i // blocksize]`` as ``dtype``, reshaped to ``shape``.
    """
    n = 1
    for s in shape:
        n *= int(s)
    flat = packed.reshape(-1)
    if flat.dtype != torch.uint8 or flat.numel() != (n + 1) // 2:
        raise ValueError(f"{n} NF4 codes take {(n + 1) // 2} uint8 bytes, got {flat.numel()} of {flat.dtype}")
    codes = torch.stack((flat >> 4, flat & 0xF), dim=-1).reshape(-1)[:n].long()  # element 2j: high nibble
    table = torch.tensor(NF4_CODE, dtype=torch.float32, device=packed.device)
    scale = absmax.float().reshape(-1).repeat_interleave(blocksize)[:n]
    return (table[codes] * scale).to(dtype).reshape(shape)


def check_activation(x: torch.Tensor, in_features: int, name: str = "x") -> None:
    """Raise a clear error unless ``x`` is a float tensor ``[..., in_features]``."""
    check_float_tensor(x, name)
    if x.shape[-1] != in_features:
        raise ValueError(f"{name} has {x.shape[-1]} features in its last dimension, the weight expects {in_features}")
