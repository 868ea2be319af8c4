"""Shared set-up of the kernel tests: which device the kernels run on in this process.

With a CUDA GPU (and ``TRITON_INTERPRET`` unset) the kernels are compiled and the tests use CUDA tensors;
otherwise they run through Triton's interpreter on CPU tensors. Shapes stay small so that the
interpreter (a Python loop over programs) finishes each test in about a second.
"""

import os

import pytest
import torch

pytest.importorskip("triton")

COMPILED = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
DEVICE = torch.device("cuda" if COMPILED else "cpu")
# the interpreter emulates float16 and bfloat16 too (NumPy float32 underneath), so every dtype runs on CPU
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU with compiled Triton kernels (TRITON_INTERPRET unset)")
    for item in items:
        if "gpu" in item.keywords and not COMPILED:
            item.add_marker(skip)


@pytest.fixture
def device():
    return DEVICE
