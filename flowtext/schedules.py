"""Noise schedules: the Gaussian path ``z_t = alpha(t) x + sigma(t) eps`` of every token.

Conventions (theory §1): ``t = 0`` is clean (``alpha = 1, sigma = 0``), ``t = 1`` is noise
(``sigma = 1``; ``alpha(1) = 0`` except for the VP schedule, whose ``alpha(1)`` is small but
positive). The log-SNR ``lambda(t) = log(alpha^2 / sigma^2)`` decreases strictly from ``+inf``.
All methods are elementwise on tensors of any shape (in practice per-token times ``[B, L]``).

Example:
    >>> import torch
    >>> from flowtext import schedules
    >>> s = schedules.get("cosine")
    >>> t = torch.tensor([0.0, 0.5, 1.0])
    >>> s.alpha(t) ** 2 + s.sigma(t) ** 2
    tensor([1., 1., 1.])
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from flowtext._registry import Registry
from flowtext.errors import ConfigError

__all__ = [
    "Cosine",
    "Linear",
    "NoiseSchedule",
    "Shifted",
    "VP",
    "get",
    "names",
    "register",
]


class NoiseSchedule(ABC):
    """Base class: ``alpha``, ``sigma``, their derivatives, the log-SNR and its inverse.

    Subclasses implement :meth:`alpha`, :meth:`sigma`, :meth:`d_alpha`, :meth:`d_sigma`,
    :meth:`log_snr`, :meth:`d_log_snr` and :meth:`t_from_log_snr`. ``log_snr_exponents`` gives
    the strength of the log-singularities of ``lambda`` at the ends: ``lambda(t) ~ -p0 log t``
    as ``t -> 0`` and ``lambda(t) ~ p1 log(1 - t)`` as ``t -> 1`` (``p1 = 0`` when ``lambda(1)``
    is finite). :class:`Shifted` uses them for the exact one-sided limits of its time warp.
    """

    name: ClassVar[str]
    log_snr_exponents: ClassVar[tuple[float, float]] = (2.0, 2.0)

    @abstractmethod
    def alpha(self, t: Tensor) -> Tensor:
        """Signal coefficient ``alpha(t)``, same shape as ``t``."""

    @abstractmethod
    def sigma(self, t: Tensor) -> Tensor:
        """Noise coefficient ``sigma(t)``, same shape as ``t``."""

    @abstractmethod
    def d_alpha(self, t: Tensor) -> Tensor:
        """Time derivative ``alpha'(t)``, same shape as ``t``."""

    @abstractmethod
    def d_sigma(self, t: Tensor) -> Tensor:
        """Time derivative ``sigma'(t)`` (may be ``+inf`` at ``t = 0``), same shape as ``t``."""

    @abstractmethod
    def log_snr(self, t: Tensor) -> Tensor:
        """Log signal-to-noise ratio ``lambda(t) = log(alpha^2 / sigma^2)``."""

    @abstractmethod
    def d_log_snr(self, t: Tensor) -> Tensor:
        """Time derivative ``lambda'(t) < 0`` (``-inf`` where ``lambda`` is singular)."""

    @abstractmethod
    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        """Inverse of :meth:`log_snr`: the time whose log-SNR is ``lam``."""

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio ``alpha^2 / sigma^2`` (``+inf`` at ``t = 0``)."""
        return torch.exp(self.log_snr(t))


registry: Registry[NoiseSchedule] = Registry("schedule")
register = registry.register
names = registry.names


def get(name: str, **kwargs: Any) -> NoiseSchedule:
    """Build a schedule by registry name.

    Args:
        name: One of :func:`names` (``"linear"``, ``"cosine"``, ``"vp"``, ``"shifted"``).
        **kwargs: Constructor arguments. For ``"shifted"``, ``base`` may itself be a name.

    Returns:
        The schedule instance.

    Raises:
        ConfigError: Unknown name (the message lists the valid ones) or bad arguments.
    """
    if name == "shifted" and isinstance(kwargs.get("base"), str):
        kwargs = {**kwargs, "base": get(kwargs["base"])}
    return registry.get(name, **kwargs)


def resolve(schedule: NoiseSchedule | str) -> NoiseSchedule:
    """Return ``schedule`` itself, or build it when given a registry name."""
    return get(schedule) if isinstance(schedule, str) else schedule


@register("linear")
@dataclass(frozen=True)
class Linear(NoiseSchedule):
    """Rectified flow: ``alpha = 1 - t``, ``sigma = t``; ``lambda = 2 log((1 - t) / t)``."""

    def alpha(self, t: Tensor) -> Tensor:  # noqa: D102
        return 1 - t

    def sigma(self, t: Tensor) -> Tensor:  # noqa: D102
        return t.clone()

    def d_alpha(self, t: Tensor) -> Tensor:  # noqa: D102
        return -torch.ones_like(t)

    def d_sigma(self, t: Tensor) -> Tensor:  # noqa: D102
        return torch.ones_like(t)

    def log_snr(self, t: Tensor) -> Tensor:  # noqa: D102
        return 2 * (torch.log1p(-t) - torch.log(t))

    def d_log_snr(self, t: Tensor) -> Tensor:  # noqa: D102
        return -2 / (t * (1 - t))

    def t_from_log_snr(self, lam: Tensor) -> Tensor:  # noqa: D102
        return torch.sigmoid(-lam / 2)


@register("cosine")
@dataclass(frozen=True)
class Cosine(NoiseSchedule):
    """Cosine path: ``alpha = cos(pi t / 2)``, ``sigma = sin(pi t / 2)`` (variance preserving)."""

    # alpha is written as sin(pi (1 - t) / 2) so that alpha(1) = 0 and alpha >= 0 exactly in
    # every floating dtype (cos(pi / 2) rounds to a tiny negative number in float32)
    def alpha(self, t: Tensor) -> Tensor:  # noqa: D102
        return torch.sin(0.5 * math.pi * (1 - t))

    def sigma(self, t: Tensor) -> Tensor:  # noqa: D102
        return torch.sin(0.5 * math.pi * t)

    def d_alpha(self, t: Tensor) -> Tensor:  # noqa: D102
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)

    def d_sigma(self, t: Tensor) -> Tensor:  # noqa: D102
        return 0.5 * math.pi * torch.sin(0.5 * math.pi * (1 - t))

    def log_snr(self, t: Tensor) -> Tensor:  # noqa: D102
        return 2 * (torch.log(self.alpha(t)) - torch.log(self.sigma(t)))

    def d_log_snr(self, t: Tensor) -> Tensor:  # noqa: D102
        return -2 * math.pi / torch.sin(math.pi * t)

    def t_from_log_snr(self, lam: Tensor) -> Tensor:  # noqa: D102
        return (2 / math.pi) * torch.atan(torch.exp(-lam / 2))


@register("vp")
@dataclass(frozen=True)
class VP(NoiseSchedule):
    """Continuous variance-preserving path with linear ``beta(t) = b0 + (b1 - b0) t``.

    ``alpha(t) = exp(-B(t) / 2)`` with ``B(t) = b0 t + (b1 - b0) t^2 / 2`` and
    ``sigma = sqrt(1 - alpha^2)``. ``alpha(1) > 0``: pure noise is an approximation and the
    ELBO's prior term counts.

    Args:
        beta_min: ``b0 > 0``.
        beta_max: ``b1 >= b0``.
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    log_snr_exponents: ClassVar[tuple[float, float]] = (1.0, 0.0)

    def __post_init__(self) -> None:
        if not (self.beta_min > 0 and self.beta_max >= self.beta_min):
            raise ConfigError(
                f"vp schedule needs 0 < beta_min <= beta_max; got {self.beta_min}, {self.beta_max}"
            )

    def _big_b(self, t: Tensor) -> Tensor:
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t

    def _beta(self, t: Tensor) -> Tensor:
        return self.beta_min + (self.beta_max - self.beta_min) * t

    def alpha(self, t: Tensor) -> Tensor:  # noqa: D102
        return torch.exp(-0.5 * self._big_b(t))

    def sigma(self, t: Tensor) -> Tensor:  # noqa: D102
        return torch.sqrt(-torch.expm1(-self._big_b(t)))

    def d_alpha(self, t: Tensor) -> Tensor:  # noqa: D102
        return -0.5 * self._beta(t) * self.alpha(t)

    def d_sigma(self, t: Tensor) -> Tensor:  # noqa: D102
        return 0.5 * self._beta(t) * self.alpha(t) ** 2 / self.sigma(t)

    def log_snr(self, t: Tensor) -> Tensor:  # noqa: D102
        return -torch.log(torch.expm1(self._big_b(t)))

    def d_log_snr(self, t: Tensor) -> Tensor:  # noqa: D102
        return -self._beta(t) / (-torch.expm1(-self._big_b(t)))

    def t_from_log_snr(self, lam: Tensor) -> Tensor:  # noqa: D102
        big_b = torch.nn.functional.softplus(-lam)  # log(1 + e^{-lam})
        delta = self.beta_max - self.beta_min
        if delta == 0:
            return big_b / self.beta_min
        return (torch.sqrt(self.beta_min**2 + 2 * delta * big_b) - self.beta_min) / delta


@register("shifted")
@dataclass(frozen=True)
class Shifted(NoiseSchedule):
    """Log-SNR shift of a base schedule: ``lambda(t) = lambda_base(t) - shift``.

    Realised as a time warp ``alpha(t) = alpha_base(w(t))``, ``sigma(t) = sigma_base(w(t))``
    with ``w(t) = base.t_from_log_snr(lambda_base(t) - shift)``, so the base family is kept
    (a shifted linear schedule is still a straight path). ``shift > 0`` lowers the SNR at every
    time and spends more of ``[0, 1]`` at high noise; ``w' = lambda_base'(t) / lambda_base'(w)``,
    with its exact one-sided limits at the endpoints.

    Args:
        base: The schedule to shift (an instance; :func:`get` also accepts a name).
        shift: Log-SNR offset; any real number.
    """

    base: NoiseSchedule = field(default_factory=Linear)
    shift: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.base, NoiseSchedule):
            raise ConfigError(f"shifted needs a NoiseSchedule base, got {self.base!r}")
        if not math.isfinite(self.shift):
            raise ConfigError(f"shift must be finite, got {self.shift}")

    @property
    def log_snr_exponents(self) -> tuple[float, float]:  # type: ignore[override]
        """Same singularity strengths as the base schedule."""
        return self.base.log_snr_exponents

    def warp(self, t: Tensor) -> Tensor:
        """The base-schedule time ``w(t)`` with the same log-SNR as ``t`` here."""
        return self.base.t_from_log_snr(self.base.log_snr(t) - self.shift)

    def d_warp(self, t: Tensor) -> Tensor:
        """Derivative ``w'(t)``, finite everywhere on ``[0, 1]``."""
        w = self.warp(t)
        ratio = self.base.d_log_snr(t) / self.base.d_log_snr(w)
        p0, p1 = self.base.log_snr_exponents
        ratio = torch.where(t == 0, torch.full_like(t, math.exp(self.shift / p0)), ratio)
        if p1 > 0:
            ratio = torch.where(t == 1, torch.full_like(t, math.exp(-self.shift / p1)), ratio)
        return ratio

    def alpha(self, t: Tensor) -> Tensor:  # noqa: D102
        return self.base.alpha(self.warp(t))

    def sigma(self, t: Tensor) -> Tensor:  # noqa: D102
        return self.base.sigma(self.warp(t))

    def d_alpha(self, t: Tensor) -> Tensor:  # noqa: D102
        return self.base.d_alpha(self.warp(t)) * self.d_warp(t)

    def d_sigma(self, t: Tensor) -> Tensor:  # noqa: D102
        return self.base.d_sigma(self.warp(t)) * self.d_warp(t)

    def log_snr(self, t: Tensor) -> Tensor:  # noqa: D102
        return self.base.log_snr(t) - self.shift

    def d_log_snr(self, t: Tensor) -> Tensor:  # noqa: D102
        return self.base.d_log_snr(t)

    def t_from_log_snr(self, lam: Tensor) -> Tensor:  # noqa: D102
        return self.base.t_from_log_snr(lam + self.shift)
