import os

import pytest
import torch

# Triton kernels run through the interpreter unless a CUDA GPU can run them compiled.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def course_model():
    """The course model and tokenizer (a fresh copy per test that asks for it via ``load_model``)."""
    from quantcourse.models import load_model

    return load_model()
