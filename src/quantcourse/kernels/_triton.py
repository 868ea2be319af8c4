"""The Triton kernels themselves (imported on first use by :mod:`quantcourse.kernels`).

Every kernel runs compiled on a CUDA GPU, or through Triton's interpreter on CPU when
``TRITON_INTERPRET=1`` was set before this module was imported (the interpreter executes each
program with NumPy: right numbers, meaningless speed).

Common pattern: a *program* (one instance of the kernel, ``tl.program_id``) owns one tile of the
output; it loads blocks of its inputs with masked loads (``mask=offs < size`` makes the last,
partial block safe), accumulates in float32 (int32 for int8) and stores its tile once.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _configs(gpu: list[dict], interpreter: dict) -> list[triton.Config]:
    """Autotune configurations: the GPU list, or one small tile under the interpreter.

    The interpreter runs each program in Python, so small tiles keep tests fast, and a single config
    means the autotuner never benchmarks (a benchmark there would only time NumPy).
    """
    if INTERPRET:
        return [triton.Config(interpreter, num_warps=1, num_stages=1)]
    return [
        triton.Config(
            {k: v for k, v in c.items() if k not in ("num_warps", "num_stages")},
            num_warps=c["num_warps"],
            num_stages=c["num_stages"],
        )
        for c in gpu
    ]


@triton.jit
def _round_half_even(v):
    """Round float32 ``v`` to the nearest integer, ties to even (torch.round): exact for ``|v| < 2**23``.

    ``floor(v + 0.5)`` would be wrong twice: it rounds ties up, and ``v + 0.5`` itself can round
    (0.49999997 + 0.5 == 1.0 in float32). ``v - floor(v)`` is exact.
    """
    r = tl.floor(v)
    f = v - r
    r_is_odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where((f > 0.5) | ((f == 0.5) & r_is_odd), r + 1.0, r)


@triton.jit
def _div_rn(a, b):
    """Correctly rounded float32 division, as torch's ``a / b`` (``/`` in Triton may be approximate on GPU)."""
    return tl.math.div_rn(a, b)


@triton.jit
def _k_slice(pid_k, K, SPLIT_K, BLOCK_K: tl.constexpr):
    """Start and length of K-slice ``pid_k`` of ``SPLIT_K``: a whole number of BLOCK_K blocks each."""
    length = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    return pid_k * length, length


# --------------------------------------------------------------------------------------------------
# Per-token absmax int8 quantization of activations x [M, K]: one program per token (row).
# --------------------------------------------------------------------------------------------------
@triton.jit
def per_token_int8_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, EPS: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_K)
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    # pass 1: the row's absmax, BLOCK_K elements at a time
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(_div_rn(tl.max(amax, axis=0), 127.0), EPS)
    tl.store(s_ptr + row, scale)
    # pass 2: codes = clamp(round(x / scale), -127, 127)
    q_row = q_ptr + row.to(tl.int64) * stride_qm
    for k0 in range(0, K, BLOCK_K):
        mask = k0 + offs < K
        x = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
        q = _round_half_even(_div_rn(x, scale))
        q = tl.minimum(tl.maximum(q, -127.0), 127.0)
        tl.store(q_row + k0 + offs, q.to(tl.int8), mask=mask)


# GEMV tiles: a decode GEMV reads each weight byte once, so the tile shape only decides how many programs
# there are and how long each streams along K (long, coalesced rows of bytes); the autotuner picks per shape.
GEMV_CONFIGS = _configs(
    gpu=[
        {"BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 4, "num_stages": 3},
        {"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3},
        {"BLOCK_N": 16, "BLOCK_K": 512, "num_warps": 4, "num_stages": 2},
        {"BLOCK_N": 64, "BLOCK_K": 256, "num_warps": 8, "num_stages": 3},
        {"BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 8, "num_stages": 2},
    ],
    interpreter={"BLOCK_N": 32, "BLOCK_K": 64},
)


# --------------------------------------------------------------------------------------------------
# W4A16 GEMV (decode): y[m, :] = x[m, :] @ dequant(W)ᵀ. Grid (cdiv(N, BLOCK_N), M, SPLIT_K).
# Each program owns BLOCK_N outputs of one row m and one K-slice; it writes float32 partial sums
# part[pid_k, m, n], which the caller adds up (split-K: more programs when N alone gives too few).
# --------------------------------------------------------------------------------------------------
@triton.autotune(
    configs=GEMV_CONFIGS,
    key=["N", "K", "SPLIT_K", "GROUP_SIZE"],
)
@triton.jit
def w4a16_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, part_ptr,
    M, N, K, SPLIT_K,
    stride_xm, stride_qn, stride_sn, stride_zn, stride_ps, stride_pm,
    GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # this program's outputs...
    m = tl.program_id(1)  # ...of token m...
    k_begin, k_len = _k_slice(tl.program_id(2), K, SPLIT_K, BLOCK_K)  # ...over one slice of K
    n_mask = offs_n < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(k_begin, k_begin + k_len, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_ptr + m * stride_xm + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        mask = n_mask[:, None] & k_mask[None, :]
        # two codes per byte along K: code k is in byte k // 2, low nibble when k is even
        byte = tl.load(qw_ptr + offs_n[:, None] * stride_qn + (offs_k[None, :] >> 1), mask=mask, other=0)
        code = (byte.to(tl.int32) >> ((offs_k[None, :] & 1) * 4)) & 0xF
        # dequantize in registers: the float weight never exists in memory
        group = offs_k[None, :] // GROUP_SIZE
        scale = tl.load(s_ptr + offs_n[:, None] * stride_sn + group, mask=mask, other=0.0)
        zero = tl.load(z_ptr + offs_n[:, None] * stride_zn + group, mask=mask, other=0)
        w = (code.to(tl.float32) - zero.to(tl.float32)) * scale
        acc += tl.sum(w * x[None, :], axis=1)
    tl.store(part_ptr + tl.program_id(2) * stride_ps + m * stride_pm + offs_n, acc, mask=n_mask)


@triton.jit
def _grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Map a 1-D program id to an output tile (pid_m, pid_n) in the Triton tutorial's grouped order.

    Programs run in id order; row-major order would walk a whole row of tiles (re-reading all of the
    weight) before reusing an input block. Grouping GROUP_M tile-rows and walking down them column by
    column keeps GROUP_M input blocks and a few weight blocks hot in L2.
    """
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


# --------------------------------------------------------------------------------------------------
# W4A16 GEMM (prefill): Y [M, N] = X [M, K] @ dequant(W)ᵀ, the tutorial's matmul with the weight
# tile dequantized between its load and tl.dot. Grid (tiles, SPLIT_K); float32 partials per K-slice.
# --------------------------------------------------------------------------------------------------
@triton.autotune(
    configs=_configs(
        gpu=[
            {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
            {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
            {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
            {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
            {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
        ],
        interpreter={"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2},
    ),
    key=["M", "N", "K", "SPLIT_K", "GROUP_SIZE"],
)
@triton.jit
def w4a16_gemm_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, part_ptr,
    M, N, K, SPLIT_K,
    stride_xm, stride_xk, stride_qn, stride_sn, stride_zn, stride_ps, stride_pm,
    GROUP_SIZE: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    k_begin, k_len = _k_slice(pid_k, K, SPLIT_K, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_begin, k_begin + k_len, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        # the weight tile as [BLOCK_K, BLOCK_N] (Wᵀ), read from the packed [N, K/2] bytes
        mask = k_mask[:, None] & n_mask[None, :]
        byte = tl.load(qw_ptr + offs_n[None, :] * stride_qn + (offs_k[:, None] >> 1), mask=mask, other=0)
        code = (byte.to(tl.int32) >> ((offs_k[:, None] & 1) * 4)) & 0xF
        group = offs_k[:, None] // GROUP_SIZE
        scale = tl.load(s_ptr + offs_n[None, :] * stride_sn + group, mask=mask, other=0.0)
        zero = tl.load(z_ptr + offs_n[None, :] * stride_zn + group, mask=mask, other=0)
        w = ((code.to(tl.float32) - zero.to(tl.float32)) * scale).to(a.dtype)
        if IEEE:  # float32 inputs: full-precision products, not TF32
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
    out = part_ptr + pid_k * stride_ps + offs_m[:, None] * stride_pm + offs_n[None, :]
    tl.store(out, acc, mask=m_mask[:, None] & n_mask[None, :])


# --------------------------------------------------------------------------------------------------
# W8A8: Y = (Qx [M, K] @ Qwᵀ) * sx[m] * sw[n]; int8 x int8 -> int32 on the tensor cores, scales in
# the epilogue (one multiply per output element, after the K loop).
# --------------------------------------------------------------------------------------------------
@triton.autotune(
    configs=_configs(
        gpu=[
            {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
            {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
            {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
            {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
        ],
        interpreter={"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2},
    ),
    key=["M", "N", "K"],
)
@triton.jit
def w8a8_gemm_kernel(
    qx_ptr, qw_ptr, sx_ptr, sw_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a = tl.load(
            qx_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=m_mask[:, None] & k_mask[None, :],
            other=0,
        )
        b = tl.load(
            qw_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
            mask=k_mask[:, None] & n_mask[None, :],
            other=0,
        )
        acc = tl.dot(a, b, acc)
    sx = tl.load(sx_ptr + offs_m, mask=m_mask, other=0.0)
    sw = tl.load(sw_ptr + offs_n, mask=n_mask, other=0.0)
    y = acc.to(tl.float32) * sx[:, None] * sw[None, :]
    out = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(out, y.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# --------------------------------------------------------------------------------------------------
# NF4 (bitsandbytes layout): element i = NF4[code_i] * absmax[i // BLOCKSIZE]; byte j holds element
# 2j in its HIGH nibble. One program per BLOCK elements of the flattened tensor.
# --------------------------------------------------------------------------------------------------
@triton.jit
def nf4_dequantize_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, n, BLOCKSIZE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    byte = tl.load(packed_ptr + (offs >> 1), mask=mask, other=0).to(tl.int32)
    code = (byte >> ((1 - (offs & 1)) * 4).to(tl.int32)) & 0xF
    level = tl.load(code_ptr + code, mask=mask, other=0.0)  # a 16-entry table, cached after the first load
    absmax = tl.load(absmax_ptr + offs // BLOCKSIZE, mask=mask, other=0.0)
    tl.store(out_ptr + offs, (level * absmax).to(out_ptr.dtype.element_ty), mask=mask)


@triton.autotune(
    configs=GEMV_CONFIGS,
    key=["N", "K", "SPLIT_K", "BLOCKSIZE"],
)
@triton.jit
def nf4_gemv_kernel(
    x_ptr, packed_ptr, absmax_ptr, code_ptr, part_ptr,
    M, N, K, SPLIT_K,
    stride_xm, stride_ps, stride_pm,
    BLOCKSIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """y[m, :] = x[m, :] @ W[N, K]ᵀ with W stored as bitsandbytes NF4 (flattened row-major)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.program_id(1)
    k_begin, k_len = _k_slice(tl.program_id(2), K, SPLIT_K, BLOCK_K)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(k_begin, k_begin + k_len, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m * stride_xm + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        idx = offs_n[:, None].to(tl.int64) * K + offs_k[None, :]  # flat index into the row-major weight
        byte = tl.load(packed_ptr + (idx >> 1), mask=mask, other=0).to(tl.int32)
        code = (byte >> ((1 - (idx & 1)) * 4).to(tl.int32)) & 0xF
        level = tl.load(code_ptr + code, mask=mask, other=0.0)
        absmax = tl.load(absmax_ptr + idx // BLOCKSIZE, mask=mask, other=0.0)
        acc += tl.sum(level * absmax * x[None, :], axis=1)
    tl.store(part_ptr + tl.program_id(2) * stride_ps + m * stride_pm + offs_n, acc, mask=offs_n < N)
