"""The shared probability flow: the field a solver integrates (velocity from a clean prediction).

For ``t_i > 0`` the shared field of theory §1 is
``u_i(z, t) = alpha'(t_i) x_hat_i + sigma'(t_i) eps_hat_i`` with
``eps_hat_i = (z_i - alpha(t_i) x_hat_i) / sigma(t_i)``.

At ``sigma(t_i) = 0`` (``t_i = 0``) the noise estimate is taken as its limit for data with a
density, ``eps_hat = 0``, so the field is ``alpha'(0) x_hat``: finite, and exact for the Gaussian
toy. Moving along any monotone time grid integrates ``dz_i/ds = u_i(z, t(s)) dt_i/ds``; a token
whose time does not move is frozen exactly. The solvers and :func:`~flowtext.solvers.integrate`,
which runs one along a grid, live in :mod:`flowtext.solvers`; this module holds what they share.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from flowtext.errors import ShapeError, TimeRangeError
from flowtext.schedules import NoiseSchedule
from flowtext.visibility import check_times

__all__ = [
    "Denoiser",
    "Field",
    "FlowResult",
    "Prediction",
    "Predictor",
    "check_grid",
    "conditional_path",
    "conditional_velocity",
    "velocity",
]

Denoiser = Callable[[Tensor, Tensor], Tensor]
"""``denoiser(z [B, L, d], t [B, L]) -> x0_hat [B, L, d]``: the clean-embedding prediction."""


@dataclass(frozen=True)
class Prediction:
    """What the denoiser says about the clean tokens at one state ``(z, t)``.

    A continuous denoiser (the Gaussian toy) gives only ``x0_hat``; a categorical one (the
    network) also gives the distribution ``p_theta(v | z, t)`` it is the mean of, which samplers
    that draw tokens need (the ancestral-mixture step of theory §4b).

    Attributes:
        x0_hat: Clean-embedding prediction ``[B, L, d]``.
        logits: Logits of ``p_theta(v | z, t)``, ``[B, L, V]``, or ``None``.
        table: Embedding table ``e(v)``, ``[V, d]`` (``x0_hat = softmax(logits) @ table``), or
            ``None``.
    """

    x0_hat: Tensor
    logits: Tensor | None = None
    table: Tensor | None = None


Predictor = Callable[[Tensor, Tensor], Prediction]
"""``predictor(z [B, L, d], t [B, L]) -> Prediction``: a denoiser with its categorical readout."""


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
    """Sample ``z_t = alpha(t) x + sigma(t) eps`` of the Gaussian path.

    ``x`` (clean embeddings) and ``eps`` (standard normal noise) are ``[B, L, d]``; the times
    ``t [B, L]`` are per token, under ``schedule``.

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
        predictor: Optional ``(z, t) -> Prediction`` with logits and embedding table; when
            given it is what :meth:`predict` (and so every solver) evaluates. Build such a field
            with :meth:`categorical`.
    """

    denoiser: Denoiser
    schedule: NoiseSchedule
    predictor: Predictor | None = None

    @classmethod
    def categorical(cls, predictor: Predictor, schedule: NoiseSchedule) -> Field:
        """The field of a denoiser that reads out a distribution over tokens.

        Args:
            predictor: ``(z [B, L, d], t [B, L]) -> Prediction`` (logits and table included).
            schedule: The noise schedule.
        """
        return cls(lambda z, t: predictor(z, t).x0_hat, schedule, predictor)

    def predict(self, z: Tensor, t: Tensor) -> Prediction:
        """The denoiser's :class:`Prediction` at ``(z, t)`` (``x0_hat`` shape checked)."""
        if self.predictor is None:
            pred = Prediction(self.denoiser(z, t))
        else:
            pred = self.predictor(z, t)
        if pred.x0_hat.shape != z.shape:
            raise ShapeError(
                f"denoiser returned shape {tuple(pred.x0_hat.shape)}, expected {tuple(z.shape)}"
            )
        return pred

    def x0_hat(self, z: Tensor, t: Tensor) -> Tensor:
        """Clean-embedding prediction ``[B, L, d]`` (shape checked)."""
        return self.predict(z, t).x0_hat

    def velocity(self, z: Tensor, t: Tensor) -> Tensor:
        """Shared-field velocity ``dz/dt`` at ``(z, t)``, ``[B, L, d]``."""
        return velocity(z, self.x0_hat(z, t), t, self.schedule)

    __call__ = velocity


@dataclass(frozen=True)
class FlowResult:
    """Result of :func:`~flowtext.solvers.integrate`.

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
