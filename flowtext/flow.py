"""The shared probability flow: velocity from a clean prediction, and integration over a grid.

For ``t_i > 0`` the shared field of theory §1 is
``u_i(z, t) = alpha'(t_i) x_hat_i + sigma'(t_i) eps_hat_i`` with
``eps_hat_i = (z_i - alpha(t_i) x_hat_i) / sigma(t_i)``.

At ``sigma(t_i) = 0`` (``t_i = 0``) the noise estimate is taken as its limit for data with a
density, ``eps_hat = 0``, so the field is ``alpha'(0) x_hat``: finite, and exact for the Gaussian
toy. Moving along any monotone time grid integrates ``dz_i/ds = u_i(z, t(s)) dt_i/ds``; a token
whose time does not move is frozen exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from flowtext import schedules as _schedules
from flowtext.visibility import check_times
from flowtext.errors import ShapeError, TimeRangeError
from flowtext.schedules import NoiseSchedule

__all__ = [
    "Denoiser",
    "Field",
    "FlowResult",
    "check_grid",
    "conditional_path",
    "conditional_velocity",
    "integrate",
    "velocity",
]

Denoiser = Callable[[Tensor, Tensor], Tensor]
"""``denoiser(z [B, L, d], t [B, L]) -> x0_hat [B, L, d]``: the clean-embedding prediction."""


def _per_token(c: Tensor, like: Tensor) -> Tensor:
    return c[..., None] if c.ndim == like.ndim - 1 else c


def velocity(z: Tensor, x0_hat: Tensor, t: Tensor, schedule: NoiseSchedule) -> Tensor:
    """Velocity ``dz/dt`` of the shared field from a clean-embedding prediction.

    Args:
        z: Current state ``[B, L, d]``.
        x0_hat: Predicted clean embeddings ``[B, L, d]``.
        t: Per-token times ``[B, L]``.
        schedule: The noise schedule.

    Returns:
        ``[B, L, d]``; tokens at ``sigma = 0`` use ``eps_hat = 0``.
    """
    a, s = _per_token(schedule.alpha(t), z), _per_token(schedule.sigma(t), z)
    da, ds = _per_token(schedule.d_alpha(t), z), _per_token(schedule.d_sigma(t), z)
    live = s > 0
    eps_hat = torch.where(live, (z - a * x0_hat) / torch.where(live, s, 1.0), 0.0)
    noise_term = torch.where(live, torch.where(live, ds, 0.0) * eps_hat, 0.0)
    return da * x0_hat + noise_term


def conditional_path(x: Tensor, eps: Tensor, t: Tensor, schedule: NoiseSchedule) -> Tensor:
    """Sample of the Gaussian path ``z_t = alpha(t) x + sigma(t) eps``.

    Args:
        x: Clean embeddings ``[B, L, d]``.
        eps: Standard normal noise ``[B, L, d]``.
        t: Per-token times ``[B, L]``.
        schedule: The noise schedule.

    Returns:
        ``z_t`` of shape ``[B, L, d]``.
    """
    return _per_token(schedule.alpha(t), x) * x + _per_token(schedule.sigma(t), x) * eps


def conditional_velocity(x: Tensor, eps: Tensor, t: Tensor, schedule: NoiseSchedule) -> Tensor:
    """Time derivative of :func:`conditional_path`: ``alpha'(t) x + sigma'(t) eps``.

    Returns:
        ``[B, L, d]``.
    """
    return _per_token(schedule.d_alpha(t), x) * x + _per_token(schedule.d_sigma(t), x) * eps


@dataclass(frozen=True)
class Field:
    """A denoiser and a schedule seen as the shared vector field.

    Args:
        denoiser: ``(z [B, L, d], t [B, L]) -> x0_hat [B, L, d]``.
        schedule: The noise schedule.
    """

    denoiser: Denoiser
    schedule: NoiseSchedule

    def x0_hat(self, z: Tensor, t: Tensor) -> Tensor:
        """Clean-embedding prediction ``[B, L, d]`` (shape checked)."""
        out = self.denoiser(z, t)
        if out.shape != z.shape:
            raise ShapeError(
                f"denoiser returned shape {tuple(out.shape)}, expected {tuple(z.shape)}"
            )
        return out

    def velocity(self, z: Tensor, t: Tensor) -> Tensor:
        """Shared-field velocity ``dz/dt`` at ``(z, t)``, ``[B, L, d]``."""
        return velocity(z, self.x0_hat(z, t), t, self.schedule)

    __call__ = velocity


@dataclass(frozen=True)
class FlowResult:
    """Result of :func:`integrate`.

    Attributes:
        z: Final state ``[B, L, d]``.
        times: The grid used, ``[K + 1, B, L]``.
        trajectory: States at every grid row ``[K + 1, B, L, d]``, or ``None`` unless asked.
    """

    z: Tensor
    times: Tensor
    trajectory: Tensor | None = None


def check_grid(times: Tensor, batch: int, length: int) -> Tensor:
    """Validate a time grid and broadcast it to ``[K + 1, B, L]``.

    Args:
        times: ``[K + 1, L]`` or ``[K + 1, B, L]``, values in ``[0, 1]``, non-increasing
            along the first axis.
        batch: Batch size ``B``.
        length: Sequence length ``L``.

    Returns:
        The grid as ``[K + 1, B, L]``.

    Raises:
        ShapeError: Wrong rank or shape.
        TimeRangeError: Values outside ``[0, 1]`` or a time that increases.
    """
    if times.ndim == 2 and times.shape[1] == length:
        times = times[:, None, :].expand(-1, batch, -1)
    if times.ndim != 3 or times.shape[1:] != (batch, length) or times.shape[0] < 1:
        raise ShapeError(
            f"times must be [K+1, L] or [K+1, B, L] with B={batch}, L={length}; "
            f"got {tuple(times.shape)}"
        )
    check_times(times, "times")
    if times.shape[0] > 1 and bool((times[1:] > times[:-1]).any()):
        raise TimeRangeError("times must be non-increasing along the step axis (t moves 1 -> 0)")
    return times


def integrate(
    denoiser: Denoiser,
    z: Tensor,
    times: Tensor,
    schedule: NoiseSchedule | str,
    solver: object | str = "euler",
    *,
    return_trajectory: bool = False,
    generator: torch.Generator | None = None,
) -> FlowResult:
    """Integrate the shared flow along a per-token time grid.

    Args:
        denoiser: ``(z [B, L, d], t [B, L]) -> x0_hat [B, L, d]``.
        z: Initial state ``[B, L, d]`` at times ``times[0]``.
        times: Grid ``[K + 1, L]`` or ``[K + 1, B, L]``, non-increasing; it need not start at 1
            or end at 0.
        schedule: A :class:`~flowtext.schedules.NoiseSchedule` or its registry name.
        solver: A :class:`~flowtext.solvers.Solver` or its registry name.
        return_trajectory: Also return the state at every grid row.
        generator: Random generator for stochastic solvers (``ancestral``).

    Returns:
        A :class:`FlowResult`.
    """
    from flowtext import solvers as _solvers

    if z.ndim != 3:
        raise ShapeError(f"z must be [B, L, d], got shape {tuple(z.shape)}")
    grid = check_grid(times.to(z.dtype), z.shape[0], z.shape[1])
    field = Field(denoiser, _schedules.resolve(schedule))
    return _solvers.resolve(solver).integrate(
        field, z, grid, return_trajectory=return_trajectory, generator=generator
    )
