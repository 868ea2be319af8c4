"""The roofline model of a matrix multiplication: bytes moved, flops done, and the time each costs.

Chapter 12 (Triton kernels) teaches it. A layer ``y = x Wᵀ`` with ``x [M, K]`` and ``W [N, K]``
does ``2·M·N·K`` flops and must move, at the very least, its weight (``N·K`` weights at
``bits_per_weight`` bits, from :func:`quantcourse.memory.bits_per_weight`), its input and its output
once. A device with peak compute ``F`` (flop/s) and bandwidth ``B`` (bytes/s) needs at least::

    t >= max(flops / F, bytes / B)

The ratio ``flops / bytes`` is the *arithmetic intensity*. Below the device's ridge point ``F / B``
the layer is memory-bound (decoding at batch 1: intensity ≈ 2 flops per weight byte read for fp16,
≈ 8 for int4) and the only way to go faster is to read fewer bytes; above it, it is compute-bound
(prefill of long prompts). This is chapter 1's :func:`quantcourse.memory.decode_tokens_per_second_bound`
at the scale of one layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..memory import bits_per_weight, model_bytes

__all__ = ["Device", "DEVICES", "GemmCost", "gemm_cost", "attainable_flops"]


@dataclass(frozen=True)
class Device:
    """Peak figures of a device: ``bandwidth`` in bytes/s, ``fp16_flops`` and ``int8_ops`` per second (dense)."""

    name: str
    bandwidth: float
    fp16_flops: float
    int8_ops: float

    @property
    def ridge(self) -> float:
        """Arithmetic intensity (flops per byte) where the fp16 roofline turns from memory- to compute-bound."""
        return self.fp16_flops / self.bandwidth


# Vendors' datasheet peaks (dense tensor-core throughput, no sparsity): NVIDIA A100 SXM4 80GB datasheet
# (2.039 TB/s, 312 TFLOPS fp16, 624 TOPS int8); H100 SXM5 datasheet (3.35 TB/s, 989 TFLOPS fp16,
# 1979 TOPS int8); H200 SXM datasheet (4.8 TB/s, the H100's compute). Measured bandwidth is lower (a
# device-to-device copy does not reach the datasheet figure): the benchmark measures a copy and reports both.
DEVICES = {
    "A100-SXM4-80GB": Device("A100-SXM4-80GB", 2.039e12, 312e12, 624e12),
    "H100-SXM5": Device("H100-SXM5", 3.35e12, 989e12, 1979e12),
    "H200-SXM": Device("H200-SXM", 4.8e12, 989e12, 1979e12),
}


@dataclass(frozen=True)
class GemmCost:
    """Work and minimum traffic of one ``[M, K] x [K, N]`` product; see :func:`gemm_cost`."""

    M: int
    N: int
    K: int
    flops: float
    weight_bytes: float
    activation_bytes: float

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.activation_bytes

    @property
    def intensity(self) -> float:
        """Flops per byte moved."""
        return self.flops / self.bytes

    def min_time(self, device: Device, *, flops_per_s: float | None = None) -> float:
        """Seconds the roofline allows on ``device``: ``max(flops / peak, bytes / bandwidth)``."""
        peak = device.fp16_flops if flops_per_s is None else flops_per_s
        return max(self.flops / peak, self.bytes / device.bandwidth)

    def memory_bound_on(self, device: Device) -> bool:
        return self.intensity < device.ridge


def gemm_cost(
    M: int,
    N: int,
    K: int,
    *,
    weight_bits: float = 16,
    group_size: int | None = None,
    scale_bits: int = 16,
    zero_point_bits: int = 0,
    activation_bytes: float = 2,
) -> GemmCost:
    """Flops and the bytes a layer ``x [M, K] @ W[N, K]ᵀ`` must move at least (each tensor once).

    Args:
        M, N, K: tokens, output features, input features.
        weight_bits: bits per weight code (16 for fp16, 8 for int8, 4 for int4).
        group_size, scale_bits, zero_point_bits: the per-group metadata, counted with
            :func:`quantcourse.memory.bits_per_weight` (``None``: per channel, metadata ignored).
        activation_bytes: bytes per element of ``x`` and ``y`` (2 for fp16).

    Returns:
        a :class:`GemmCost`; e.g. ``gemm_cost(1, 11008, 4096)`` reads 90.2 MB of fp16 weights for 90.2 MFLOP.
    """
    for name, v in (("M", M), ("N", N), ("K", K)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    bpw = bits_per_weight(weight_bits, group_size, scale_bits=scale_bits, zero_point_bits=zero_point_bits)
    return GemmCost(M, N, K, 2.0 * M * N * K, model_bytes(N * K, bpw), float(activation_bytes) * (M * K + M * N))


def attainable_flops(intensity: float, device: Device, *, peak: float | None = None) -> float:
    """The roofline: ``min(peak, intensity * bandwidth)`` flop/s at ``intensity`` flops per byte."""
    return min(device.fp16_flops if peak is None else peak, intensity * device.bandwidth)
