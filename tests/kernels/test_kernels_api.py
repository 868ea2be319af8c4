"""available(), the lazy import, the split-K heuristic and the roofline model."""

import subprocess
import sys

import pytest
import torch
from conftest import COMPILED

from quantcourse import kernels
from quantcourse.kernels import roofline


def test_available_says_what_runs_where():
    info = kernels.available()
    assert set(info) == {"triton", "cuda", "interpreter", "kernels", "note"}
    assert set(info["kernels"]) == set(kernels.KERNELS)
    expected = ["cuda"] if COMPILED else ["interpreter"]
    assert all(backends == expected for backends in info["kernels"].values())
    assert info["note"]


def test_quantcourse_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import quantcourse, quantcourse.kernels as k\n"
        "info = k.available(); assert info['triton'] is None and info['kernels']['w4a16_gemv'] == [], info\n"
        "try:\n    k.w4a16_gemv(None, None)\nexcept (RuntimeError, TypeError) as e:\n    print(type(e).__name__, e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "Triton" in out or "Int4Weight" in out


@pytest.mark.gpu
def test_compiled_on_cuda():
    info = kernels.available()
    assert info["cuda"] and info["kernels"]["w4a16_gemv"] == ["cuda"]
    assert kernels.choose_split_k(1, 4096, torch.device("cuda")) > 1, "a 1-tile GEMV needs split-K on a GPU"


def test_split_k_heuristic_is_off_on_cpu_and_bounded():
    assert kernels.choose_split_k(1, 4096, torch.device("cpu")) == 1


def test_roofline_of_a_llama_7b_mlp_layer():
    fp16 = roofline.gemm_cost(1, 11008, 4096)
    assert fp16.weight_bytes == 11008 * 4096 * 2
    int4 = roofline.gemm_cost(1, 11008, 4096, weight_bits=4, group_size=128, scale_bits=16)
    assert int4.weight_bytes == pytest.approx(11008 * 4096 * 4.125 / 8)
    h100 = roofline.DEVICES["H100-SXM5"]
    assert fp16.memory_bound_on(h100) and int4.memory_bound_on(h100)
    assert not roofline.gemm_cost(4096, 11008, 4096).memory_bound_on(h100)
    assert fp16.min_time(h100) == pytest.approx(fp16.bytes / h100.bandwidth)
    assert roofline.attainable_flops(1e6, h100) == h100.fp16_flops
    with pytest.raises(ValueError, match="positive int"):
        roofline.gemm_cost(0, 1, 1)
