"""How many elements share one scale: per tensor, per channel, per token, per group.

Chapter 3 (Granularity) teaches these. Each granularity is a frozen dataclass that knows
how to reduce a tensor to the statistics one set of quantization parameters is computed
from (``reduce``), what shape those parameters have (``param_shape``), and how to line a
tensor and its parameters up so that they broadcast (``broadcast``).

Parameter shapes, for ``x`` of shape ``[out, in]``:

==================  ==========================
``PerTensor()``     ``[]``
``PerChannel(0)``   ``[out, 1]``
``PerChannel(1)``   ``[1, in]``
``PerToken()``      ``[out, 1]`` (``[..., 1]`` in general)
``PerGroup(g)``     ``[out, in // g]``
==================  ==========================

Groups are ``g`` consecutive elements of the last dimension (for a weight ``[out, in]``: along
the input dimension, as GPTQ, AWQ and GGUF group). ``broadcast`` views ``x`` as
``[out, in // g, g]`` and the parameters as ``[out, in // g, 1]``: no copy of either, unlike
stretching the parameters to ``x``'s full shape.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["Granularity", "PerTensor", "PerChannel", "PerToken", "PerGroup"]

Reduction = Callable[..., torch.Tensor]  # torch.amin / torch.amax / a custom one taking dim, keepdim


class Granularity(ABC):
    """Base class of the four granularities."""

    def check(self, x: torch.Tensor) -> None:  # noqa: B027 - most granularities apply to any tensor
        """Raise ``ValueError`` when this granularity cannot apply to ``x``."""

    @abstractmethod
    def reduce(self, x: torch.Tensor, fn: Reduction) -> torch.Tensor:
        """Apply ``fn(x, dim=..., keepdim=...)`` so that one value remains per parameter.

        Returns a tensor of shape ``param_shape(x.shape)``.
        """

    @abstractmethod
    def param_shape(self, shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
        """The shape of the scale (and zero point) for a tensor of shape ``shape``."""

    def broadcast(self, x: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of ``x`` and of the parameter-shaped ``p`` that broadcast against each other.

        The result of an elementwise operation on them has ``x.numel()`` elements in ``x``'s
        order: ``.reshape(x.shape)`` restores ``x``'s shape.
        """
        return x, p

    def expand(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Return ``p`` (parameter-shaped) broadcastable against ``x`` itself (materialized for groups)."""
        return p


@dataclass(frozen=True)
class PerTensor(Granularity):
    """One scale (and zero point) for the whole tensor."""

    def reduce(self, x: torch.Tensor, fn: Reduction) -> torch.Tensor:
        return fn(x, dim=tuple(range(x.dim())), keepdim=False)

    def param_shape(self, shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
        return ()


@dataclass(frozen=True)
class PerChannel(Granularity):
    """One scale per index along ``axis``; axis 0 = the output channels of a ``[out, in]`` weight."""

    axis: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.axis, bool) or not isinstance(self.axis, int):
            raise TypeError(f"PerChannel(axis) needs an int axis, got {self.axis!r}")

    def check(self, x: torch.Tensor) -> None:
        if x.dim() == 0 or not -x.dim() <= self.axis < x.dim():
            raise ValueError(
                f"PerChannel(axis={self.axis}) needs a tensor with that axis, got shape {tuple(x.shape)}; "
                "use PerChannel(0) for the output channels of a [out, in] weight"
            )

    def reduce(self, x: torch.Tensor, fn: Reduction) -> torch.Tensor:
        axis = self.axis % x.dim()
        dims = tuple(d for d in range(x.dim()) if d != axis)
        if not dims:  # a 1-D tensor: every element is its own channel (torch reads dim=() as "all dims")
            return fn(x.unsqueeze(-1), dim=-1, keepdim=False)
        return fn(x, dim=dims, keepdim=True)

    def param_shape(self, shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
        axis = self.axis % len(shape)
        return tuple(n if d == axis else 1 for d, n in enumerate(shape))


@dataclass(frozen=True)
class PerToken(Granularity):
    """One scale per row: per token for activations ``[..., tokens, hidden]``.

    On a ``[out, in]`` weight this is the same as ``PerChannel(0)``.
    """

    def check(self, x: torch.Tensor) -> None:
        if x.dim() == 0:
            raise ValueError("PerToken() needs at least one dimension (the hidden size), got a scalar")

    def reduce(self, x: torch.Tensor, fn: Reduction) -> torch.Tensor:
        return fn(x, dim=-1, keepdim=True)

    def param_shape(self, shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
        return (*shape[:-1], 1)


@dataclass(frozen=True)
class PerGroup(Granularity):
    """One scale per ``group_size`` consecutive elements of the last dimension."""

    group_size: int

    def __post_init__(self) -> None:
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"PerGroup(group_size) needs a positive int, got {self.group_size!r}")

    def check(self, x: torch.Tensor) -> None:
        if x.dim() == 0:
            raise ValueError("PerGroup needs at least one dimension, got a scalar")
        n = x.shape[-1]
        if n % self.group_size:
            divisors = [g for g in (16, 32, 64, 128, 256) if n % g == 0]
            hint = f", e.g. one of {divisors}" if divisors else ""
            raise ValueError(
                f"group_size={self.group_size} does not divide the last dimension ({n}) of a tensor of "
                f"shape {tuple(x.shape)}: choose a group size that divides {n}{hint}"
            )

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(*x.shape[:-1], x.shape[-1] // self.group_size, self.group_size)

    def reduce(self, x: torch.Tensor, fn: Reduction) -> torch.Tensor:
        return fn(self._grouped(x), dim=-1, keepdim=False)  # [..., n_groups]

    def param_shape(self, shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
        return (*shape[:-1], shape[-1] // self.group_size)

    def broadcast(self, x: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._grouped(x), p.unsqueeze(-1)  # [..., n_groups, group_size] and [..., n_groups, 1]

    def expand(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return p.repeat_interleave(self.group_size, dim=-1)  # [..., in]
