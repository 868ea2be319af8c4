"""Helpers that hidden tests in ``solutions/`` call.

Hidden tests compare a student's function with the ``quantcourse`` reference on fresh seeded
inputs, on the GPU when there is one, and make sure the student did not simply call the library
function the exercise asks them to write.

Typical hidden test::

    from quantcourse.grading.hidden import DEVICE, forbid, random_inputs
    for seed in range(5):
        x = random_inputs((64, 128), seed=seed)          # on DEVICE
        expected = qc.fake_quantize(x, 4)                # reference first...
        with forbid("quantcourse.fake_quantize", "quantcourse.primitives.fake_quantize"):
            got = student_fake_quantize(x, 4)            # ...then the student's, with the shortcut blocked
        assert_close_to_reference(got, expected)
"""

from __future__ import annotations

import contextlib
import importlib
import types
from collections.abc import Iterator

import torch

__all__ = ["DEVICE", "ShortcutUsed", "forbid", "random_inputs", "assert_close_to_reference"]

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


class ShortcutUsed(AssertionError):
    """Raised when a submission calls the library function it was asked to implement."""


def _resolve(target: str) -> tuple[object, str]:
    module_name, _, attr = target.rpartition(".")
    if module_name.startswith("torch.ops."):  # a custom op (torch.ops.<namespace>.<op>): not a module
        owner = torch.ops
        for part in module_name.split(".")[2:]:
            owner = getattr(owner, part)
        return owner, attr
    return importlib.import_module(module_name), attr


def _message(target: str) -> str:
    return f"this exercise asks you to write it yourself: calling {target} does not count"


def _raising_code(message: str) -> types.CodeType:
    """A code object that raises ``AssertionError(message)``, to put inside a forbidden function.

    It names only builtins, so it runs in any module's globals.
    """

    def blocked(*args, **kwargs):
        raise AssertionError("__MESSAGE__")

    code = blocked.__code__
    return code.replace(co_consts=tuple(message if c == "__MESSAGE__" else c for c in code.co_consts))


@contextlib.contextmanager
def forbid(*targets: str) -> Iterator[None]:
    """Inside the block, calling any of ``targets`` (dotted paths) fails the test.

    A target is a module attribute (``"quantcourse.fake_quantize"``) or a registered custom op
    (``"torch.ops.bitsandbytes.int8_vectorwise_quant"``).

    The attribute is replaced (calls through ``quantcourse.X`` raise :class:`ShortcutUsed`) and, for
    plain Python functions, so is the function's own code, so that an alias bound earlier
    (``from quantcourse.memory import model_bytes as mb``) is caught too.
    """
    saved_attrs, saved_code = [], []
    try:
        for target in targets:
            owner, attr = _resolve(target)
            original = getattr(owner, attr)
            saved_attrs.append((owner, attr, original))
            if isinstance(original, types.FunctionType) and not original.__code__.co_freevars:
                saved_code.append((original, original.__code__))
                original.__code__ = _raising_code(_message(target))

            def blocked(*args, _name=target, **kwargs):
                raise ShortcutUsed(_message(_name))

            setattr(owner, attr, blocked)
        yield
    finally:
        for function, code in reversed(saved_code):
            function.__code__ = code
        for owner, attr, original in reversed(saved_attrs):
            setattr(owner, attr, original)


def random_inputs(
    shape: tuple[int, ...], *, seed: int, heavy_tail: bool = False, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Seeded random float inputs on :data:`DEVICE`; ``heavy_tail`` draws Student-t (ν=3) values."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    if heavy_tail:
        chi2 = torch.randn((3, *shape), generator=gen, dtype=torch.float64).pow(2).sum(0)
        x = x / (chi2 / 3).sqrt()
    return x.to(dtype=dtype, device=DEVICE)


def assert_close_to_reference(got, expected, *, rtol: float = 1e-5, atol: float = 1e-6, what: str = "result") -> None:
    """Assert ``got`` matches the reference, with a message a student can act on."""
    if not isinstance(got, torch.Tensor):
        raise AssertionError(f"your {what} should be a torch.Tensor, got {type(got).__name__}")
    expected = torch.as_tensor(expected)
    if got.shape != expected.shape:
        raise AssertionError(f"your {what} has shape {tuple(got.shape)}, expected {tuple(expected.shape)}")
    got_f, exp_f = got.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.allclose(got_f, exp_f, rtol=rtol, atol=atol):
        worst = (got_f - exp_f).abs().max().item()
        raise AssertionError(f"your {what} differs from the reference by up to {worst:.3g} on fresh random inputs")
