"""Progression-time policies: how the per-token times ``t_i`` move over a global clock ``s``.

A policy is a curve ``s -> t(s) in [0, 1]^L`` with ``t(0) = 1``, ``t(1) = 0`` and every ``t_i``
non-increasing (theory §3). A *static* policy is a fixed curve, used through a discretization
``policy.grid(length, steps)`` of shape ``[steps + 1, length]`` taken at ``s_k = k / steps``.

* ``synchronous``: ``t_i(s) = 1 - s`` (pure diffusion / flow matching).
* ``block(size)``: blocks of ``size`` tokens in order, synchronous inside the active block.
* ``autoregressive``: ``block(1)``; one token at a time, left to right (pure AR).
* ``diagonal(width)``: a linear ramp of ``width`` (fraction of the sequence) sweeping left to
  right; tends to ``autoregressive`` as ``width -> 0`` and to ``synchronous`` as it grows.

The adaptive (Evo) policy moves times from the model's confidence and lives in the decoder.

Example:
    >>> from flowtext import policies
    >>> policies.get("block", size=2).grid(length=4, steps=4)
    tensor([[1., 1., 1., 1.],
            [0.5000, 0.5000, 1.0000, 1.0000],
            [0., 0., 1., 1.],
            [0.0000, 0.0000, 0.5000, 0.5000],
            [0., 0., 0., 0.]])
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from flowtext._registry import Registry
from flowtext.errors import ConfigError

__all__ = [
    "Autoregressive",
    "Block",
    "Diagonal",
    "ProgressionPolicy",
    "StaticPolicy",
    "Synchronous",
    "get",
    "names",
    "register",
]


class ProgressionPolicy(ABC):  # noqa: B024 (a marker base shared by static and adaptive policies)
    """Base class of every progression-time policy. ``static`` tells the two kinds apart."""

    name: ClassVar[str]
    static: ClassVar[bool] = False


class StaticPolicy(ProgressionPolicy):
    """A fixed curve ``t(s)``; subclasses implement :meth:`curve` and may restrict ``steps``."""

    static: ClassVar[bool] = True

    @abstractmethod
    def curve(self, s: Tensor, length: int) -> Tensor:
        """Times at global clock values ``s``.

        Args:
            s: Clock values ``[N]`` in ``[0, 1]``.
            length: Sequence length ``L``.

        Returns:
            Times ``[N, L]``.
        """

    def check_steps(self, length: int, steps: int) -> None:
        """Raise :class:`ConfigError` when ``steps`` cannot discretize this policy exactly."""

    def grid(
        self,
        length: int,
        steps: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """The discretized curve at ``s_k = k / steps``.

        Args:
            length: Sequence length ``L >= 1``.
            steps: Number of global steps ``K >= 1``.
            dtype: Floating dtype of the result.
            device: Device of the result.

        Returns:
            Times ``[K + 1, L]``: row 0 all ones, row ``K`` all zeros, columns non-increasing.

        Raises:
            ConfigError: ``length < 1``, ``steps < 1`` or a step count this policy cannot use.
        """
        if not isinstance(length, int) or length < 1:
            raise ConfigError(f"length must be a positive int, got {length!r}")
        if not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"steps must be a positive int, got {steps!r}")
        self.check_steps(length, steps)
        s = torch.arange(steps + 1, dtype=torch.float64) / steps
        times = self.curve(s, length).clamp(0.0, 1.0)
        times[0] = 1.0
        times[-1] = 0.0
        return times.to(dtype=dtype, device=device)


registry: Registry[ProgressionPolicy] = Registry("policy")
register = registry.register
names = registry.names


def get(name: str, **kwargs: Any) -> ProgressionPolicy:
    """Build a policy by registry name.

    Args:
        name: One of :func:`names`.
        **kwargs: Constructor arguments (``size`` for ``block``, ``width`` for ``diagonal``).

    Raises:
        ConfigError: Unknown name (the message lists the valid ones) or bad arguments.
    """
    return registry.get(name, **kwargs)


def resolve(policy: ProgressionPolicy | str) -> ProgressionPolicy:
    """Return ``policy`` itself, or build it when given a registry name."""
    return get(policy) if isinstance(policy, str) else policy


@register("synchronous")
@dataclass(frozen=True)
class Synchronous(StaticPolicy):
    """All tokens share one clock: ``t_i(s) = 1 - s``."""

    def curve(self, s: Tensor, length: int) -> Tensor:  # noqa: D102
        return (1 - s)[:, None].expand(-1, length).clone()


@register("block")
@dataclass(frozen=True)
class Block(StaticPolicy):
    """Blocks of ``size`` tokens, one after another, synchronous inside the active block.

    With ``n = ceil(L / size)`` blocks, token ``i`` in block ``j = i // size`` follows
    ``t_i(s) = clip(j + 1 - n s, 0, 1)``. ``steps`` must be a multiple of ``n`` so that every
    block boundary lies on the grid. ``block(1)`` is ``autoregressive``, ``block(L)`` is
    ``synchronous``.

    Args:
        size: Tokens per block, ``>= 1`` (a size above ``L`` acts as ``L``).
    """

    size: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 1:
            raise ConfigError(f"block size must be a positive int, got {self.size!r}")

    def n_blocks(self, length: int) -> int:
        """Number of blocks ``ceil(length / size)``."""
        return -(-length // self.size)

    def block_ids(self, length: int, device: torch.device | str | None = None) -> Tensor:
        """Block index of each position, ``[L]`` long."""
        return torch.arange(length, device=device) // self.size

    def check_steps(self, length: int, steps: int) -> None:  # noqa: D102
        n = self.n_blocks(length)
        if steps % n:
            raise ConfigError(
                f"{self.name} policy with {n} blocks (length {length}, block size "
                f"{min(self.size, length)}) needs steps to be a multiple of {n}; got {steps}. "
                f"Use steps={n * max(1, round(steps / n))}."
            )

    def curve(self, s: Tensor, length: int) -> Tensor:  # noqa: D102
        j = self.block_ids(length).to(s.dtype)
        return (j[None, :] + 1 - self.n_blocks(length) * s[:, None]).clamp(0.0, 1.0)


@register("autoregressive")
@dataclass(frozen=True)
class Autoregressive(Block):
    """Pure AR: ``block(size=1)``. ``steps`` must be a multiple of the length.

    With ``steps == L`` token ``k`` jumps from 1 to 0 at step ``k``; with ``m L`` steps it moves
    linearly over ``m`` steps while every other token is frozen.
    """

    size: int = 1

    def __post_init__(self) -> None:
        if self.size != 1:
            raise ConfigError("autoregressive has block size 1; use the 'block' policy instead")


@register("diagonal")
@dataclass(frozen=True)
class Diagonal(StaticPolicy):
    """A linear ramp of ``width`` (fraction of the sequence) sweeping left to right.

    Token ``i`` at relative position ``p_i = (i + 1/2) / L`` follows
    ``t_i(s) = clip((p_i - a(s)) / width, 0, 1)`` with front ``a(s) = s (1 + width) - width``:
    tokens left of the front are committed, tokens more than ``width`` right of it are noise.
    With ``steps = L`` and ``width < 1 / (2 L)`` the grid is exactly ``autoregressive``'s.

    Args:
        width: Ramp width, ``> 0``.
    """

    width: float = 0.25

    def __post_init__(self) -> None:
        if not (
            isinstance(self.width, (int, float)) and math.isfinite(self.width) and self.width > 0
        ):
            raise ConfigError(f"diagonal width must be a finite number > 0, got {self.width!r}")

    def curve(self, s: Tensor, length: int) -> Tensor:  # noqa: D102
        p = (torch.arange(length, dtype=s.dtype) + 0.5) / length
        front = s * (1 + self.width) - self.width
        return ((p[None, :] - front[:, None]) / self.width).clamp(0.0, 1.0)


# the adaptive (Evo) policy lives with the decoder; importing it registers "adaptive"
import flowtext.decoding.adaptive  # noqa: E402, F401
