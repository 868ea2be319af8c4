"""How many elements share one scale: per tensor, per channel, per token, per group.

Chapter 3 (Granularity) teaches these. Each granularity is a frozen dataclass that knows
two things: how to reduce a tensor to the statistics one set of quantization parameters is
computed from (``reduce``), and how to stretch those parameters back over the tensor
(``expand``).

Parameter shapes, for ``x`` of shape ``[out, in]``:

==================  ==========================
``PerTensor()``     ``[]``
``PerChannel(0)``   ``[out, 1]``
``PerChannel(1)``   ``[1, in]``
``PerToken()``      ``[out, 1]`` (``[..., 1]`` in general)
``PerGroup(g)``     ``[out, in // g]``
==================  ==========================
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["Granularity", "PerTensor", "PerChannel", "PerToken", "PerGroup"]

Reduction = Callable[..., torch.Tensor]  # torch.amin / torch.amax / a custom one taking dim, keepdim


class Granularity(ABC):
    """Base class of the four granularities."""

    def check(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` when this granularity cannot apply to ``x``."""

    @abstractmethod
    def reduce(self, x: torch.Tensor, fn: Reduction) -> torch.Tensor:
        """Apply ``fn(x, dim=..., keepdim=...)`` so that one value remains per parameter."""

    def expand(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Return ``p`` (parameter-shaped) broadcastable against ``x``."""
        return p


@dataclass(frozen=True)
class PerTensor(Granularity):
    """One scale (and zero point) for the whole tensor."""

    def reduce(self, x: torch.Tensor, fn: Reduction) -> torch.Tensor:
        return fn(x, dim=tuple(range(x.dim())), keepdim=False)


@dataclass(frozen=True)
class PerChannel(Granularity):
    """One scale per index along ``axis``; axis 0 = the output channels of a ``[out, in]`` weight."""

    axis: int = 0

    def check(self, x: torch.Tensor) -> None:
        if x.dim() == 0 or not -x.dim() <= self.axis < x.dim():
            raise ValueError(
                f"PerChannel(axis={self.axis}) needs a tensor with that axis, got shape {tuple(x.shape)}; "
                "use PerChannel(0) for the output channels of a [out, in] weight"
            )

    def reduce(self, x: torch.Tensor, fn: Reduction) -> torch.Tensor:
        axis = self.axis % x.dim()
        return fn(x, dim=tuple(d for d in range(x.dim()) if d != axis), keepdim=True)


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

    def expand(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return p.repeat_interleave(self.group_size, dim=-1)
