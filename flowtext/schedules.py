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

import numpy as np
import torch
from torch import Tensor

from flowtext._registry import Registry
from flowtext.errors import CheckpointError, ConfigError, ShapeError

__all__ = [
    "Cosine",
    "InfoUniform",
    "Linear",
    "NoiseSchedule",
    "Shifted",
    "VP",
    "WarpedSchedule",
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
        name: One of :func:`names` (``"linear"``, ``"cosine"``, ``"vp"``, ``"shifted"``,
            ``"info-uniform"``).
        **kwargs: Constructor arguments. For ``"shifted"`` and ``"info-uniform"``, ``base`` may
            itself be a name.

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


class WarpedSchedule(NoiseSchedule):
    """A base schedule on a warped clock: ``alpha_base(w(t))`` and ``sigma_base(w(t))``.

    Subclasses give the warp ``w`` (:meth:`warp`: increasing, ``w(0) = 0``, ``w(1) = 1``), its
    derivative (:meth:`d_warp`, finite and positive on ``[0, 1]``) and :meth:`t_from_log_snr`.
    The coefficients, their derivatives (chain rule) and the log-SNR ``lambda_base(w(t))``
    follow, and ``lambda`` keeps the base's end singularities (``log_snr_exponents``).

    Attributes:
        base: The schedule whose clock is warped.
    """

    base: NoiseSchedule

    @abstractmethod
    def warp(self, t: Tensor) -> Tensor:
        """The base-schedule time ``w(t)`` with the same log-SNR as ``t`` here."""

    @abstractmethod
    def d_warp(self, t: Tensor) -> Tensor:
        """Derivative ``w'(t)``, finite and positive on ``[0, 1]``."""

    # a property (the base schedule's exponents) where NoiseSchedule declares a ClassVar
    @property
    def log_snr_exponents(self) -> tuple[float, float]:  # type: ignore[override]
        """Same singularity strengths as the base (``w'`` is finite and positive at the ends)."""
        return self.base.log_snr_exponents

    def alpha(self, t: Tensor) -> Tensor:  # noqa: D102
        return self.base.alpha(self.warp(t))

    def sigma(self, t: Tensor) -> Tensor:  # noqa: D102
        return self.base.sigma(self.warp(t))

    def d_alpha(self, t: Tensor) -> Tensor:  # noqa: D102
        return self.base.d_alpha(self.warp(t)) * self.d_warp(t)

    def d_sigma(self, t: Tensor) -> Tensor:  # noqa: D102
        return self.base.d_sigma(self.warp(t)) * self.d_warp(t)

    def log_snr(self, t: Tensor) -> Tensor:  # noqa: D102
        return self.base.log_snr(self.warp(t))

    def d_log_snr(self, t: Tensor) -> Tensor:  # noqa: D102
        return self.base.d_log_snr(self.warp(t)) * self.d_warp(t)


@register("shifted")
@dataclass(frozen=True)
class Shifted(WarpedSchedule):
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

    def log_snr(self, t: Tensor) -> Tensor:  # noqa: D102
        return self.base.log_snr(t) - self.shift

    def d_log_snr(self, t: Tensor) -> Tensor:  # noqa: D102
        return self.base.d_log_snr(t)

    def t_from_log_snr(self, lam: Tensor) -> Tensor:  # noqa: D102
        return self.base.t_from_log_snr(lam + self.shift)


@register("info-uniform")
class InfoUniform(WarpedSchedule):
    """Information-uniform schedule (theory §4c): a fitted time warp of a base schedule.

    ``alpha(t) = alpha_b(w(t))``, ``sigma(t) = sigma_b(w(t))``, ``lambda(t) = lambda_b(w(t))``,
    where ``w = F^{-1}`` and ``F`` maps base time ``u`` to the fraction of the expected commit
    cross-entropy ``c`` already present at ``u``: ``F(u) = (c(u) - c(0)) / (c(1) - c(0))``.
    Then ``c(lambda(t))`` falls linearly in ``t``: ``t`` is the fraction of a token's
    information still missing. ``F`` is the integral of a positive, continuous, piecewise-linear
    density over knots ``0 < u_1 < ... < 1``, so ``F`` is C^1, strictly increasing and piecewise
    quadratic: ``w`` is exact in closed form, ``w' = 1 / F'(w)``, and every property of the base
    schedule (endpoints, monotone log-SNR, its end singularities) carries over. The inner knots
    are the base times of ``n_bins + 1`` equally spaced log-SNRs spanning ``log_snr_range``.

    Fitting: a trainer feeds per-token pairs ``(lambda, ce)`` (the log-SNR of each scored token's
    state and its commit cross-entropy, e.g. ``schedule.log_snr(t)`` and ``LossTerms.ce``) to
    :meth:`update`, which keeps an exponential moving average of the cross-entropy per log-SNR
    bin (the intervals between knots); :meth:`fit` turns the averages into the warp (monotone by
    isotonic regression, pinned to 0 at ``u = 0``, warped only where a rise is significant,
    mixed with the identity by ``floor``). Before any fit the warp is the
    identity. :meth:`freeze` for evaluation (updates and fits then raise), and
    :meth:`state_dict` / :meth:`load_state_dict` (plain tensors, ints and bools) for checkpoints.
    Given its state the schedule is deterministic.

    Args:
        base: The schedule to warp (an instance or a registry name); default ``"cosine"``.
        n_bins: Number of equal log-SNR intervals inside ``log_snr_range``, ``>= 2`` (two more
            bins hold the log-SNRs beyond it).
        log_snr_range: ``(low, high)``, the log-SNRs resolved by the bins.
        decay: EMA decay per :meth:`update`, in ``[0, 1)``.
        floor: Weight of the identity in the fitted density, in ``(0, 1]``; bounds ``w'`` by
            ``1 / floor``.
        frozen: Start frozen.
    """

    NOISE_Z: float = 4.0
    """A rise of fewer standard errors is noise to :meth:`fit`; of twice as many, fully real."""

    def __init__(
        self,
        base: NoiseSchedule | str = "cosine",
        n_bins: int = 128,
        log_snr_range: tuple[float, float] = (-15.0, 15.0),
        decay: float = 0.99,
        floor: float = 0.01,
        frozen: bool = False,
    ) -> None:
        self.base = resolve(base)
        if not isinstance(self.base, NoiseSchedule):
            raise ConfigError(f"info-uniform needs a NoiseSchedule base, got {base!r}")
        if not isinstance(n_bins, int) or n_bins < 2:
            raise ConfigError(f"info-uniform n_bins must be an int >= 2, got {n_bins!r}")
        if not 0 <= decay < 1 or not 0 < floor <= 1:
            raise ConfigError(f"need 0 <= decay < 1 and 0 < floor <= 1; got {decay}, {floor}")
        lo, hi = (float(v) for v in log_snr_range)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ConfigError(f"log_snr_range must be finite (low, high), got {log_snr_range}")
        self.decay, self.floor, self.frozen = float(decay), float(floor), frozen
        lam = torch.linspace(hi, lo, n_bins + 1, dtype=torch.float64)
        inner = self.base.t_from_log_snr(lam)
        inner = inner[(inner > 0) & (inner < 1)].unique()  # sorted; VP drops lambda < lambda(1)
        self._knots = torch.cat([inner.new_zeros(1), inner, inner.new_ones(1)])
        self.n_bins, self.log_snr_range = n_bins, (lo, hi)
        self._n_seg = self._knots.numel() - 1  # bins, the two beyond the range included
        self._ema_sum = torch.zeros(self._n_seg, dtype=torch.float64)
        self._ema_sq = torch.zeros(self._n_seg, dtype=torch.float64)
        self._ema_weight = torch.zeros(self._n_seg, dtype=torch.float64)
        self._ema_tokens = torch.zeros(self._n_seg, dtype=torch.float64)
        self._set_density(torch.ones(self._n_seg + 1, dtype=torch.float64))

    def __repr__(self) -> str:
        return f"InfoUniform(base={self.base!r}, n_bins={self.n_bins}, frozen={self.frozen})"

    @property
    def knots(self) -> Tensor:
        """Base times of the density's knots, ``0 = u_0 < ... < u_m = 1`` (float64)."""
        return self._knots.clone()

    # ------------------------------------------------------------------ the warp

    def _set_density(self, dens: Tensor) -> None:
        h = torch.diff(self._knots)
        cum = torch.cat([dens.new_zeros(1), torch.cumsum(0.5 * h * (dens[:-1] + dens[1:]), 0)])
        self._raw, self._dens, self._cdf = dens, dens / cum[-1], cum / cum[-1]

    def _tables(self, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        knots, cdf, dens = (
            v.to(like.dtype).to(like.device) for v in (self._knots, self._cdf, self._dens)
        )
        return knots, cdf, dens

    def _segment(self, sorted_: Tensor, v: Tensor) -> Tensor:
        j = torch.searchsorted(sorted_, v.detach().contiguous(), right=True) - 1
        return j.clamp(0, self._n_seg - 1)

    def cdf(self, u: Tensor) -> Tensor:
        """``F(u)``: the time of this schedule at base time ``u`` (the inverse of :meth:`warp`)."""
        knots, cdf, f = self._tables(u)
        j = self._segment(knots, u)
        h = knots[j + 1] - knots[j]
        x = (u - knots[j]) / h
        fj, fk = f[j], f[j + 1]
        val = cdf[j] + h * (fj * x + 0.5 * (fk - fj) * x * x)
        return torch.where(u <= 0, 0.0, torch.where(u >= 1, 1.0, val))

    def warp(self, t: Tensor) -> Tensor:
        """``w(t) = F^{-1}(t)``: the base time with this schedule's log-SNR at ``t``."""
        knots, cdf, f = self._tables(t)
        j = self._segment(cdf, t)
        h = knots[j + 1] - knots[j]
        rho = (t - cdf[j]) / h  # solve f_j x + (f_k - f_j) x^2 / 2 = rho for x in [0, 1]
        fj, fk = f[j], f[j + 1]
        root = torch.sqrt((fj * fj + 2 * (fk - fj) * rho).clamp_min(0.0))
        x = (2 * rho / (fj + root)).clamp(0.0, 1.0)
        u = knots[j] + h * x
        return torch.where(t <= 0, 0.0, torch.where(t >= 1, 1.0, u))

    def d_warp(self, t: Tensor) -> Tensor:
        """``w'(t) = 1 / F'(w(t))``, finite and positive on ``[0, 1]``."""
        knots, _, f = self._tables(t)
        u = self.warp(t)
        j = self._segment(knots, u)
        x = (u - knots[j]) / (knots[j + 1] - knots[j])
        return 1 / (f[j] + (f[j + 1] - f[j]) * x)

    def t_from_log_snr(self, lam: Tensor) -> Tensor:  # noqa: D102
        return self.cdf(self.base.t_from_log_snr(lam))

    # ------------------------------------------------------------------ fitting

    def _check_not_frozen(self, what: str) -> None:
        if self.frozen:
            raise ConfigError(f"info-uniform schedule is frozen: cannot {what}; call unfreeze()")

    def freeze(self) -> None:
        """Fix the schedule (evaluation): :meth:`update` and :meth:`fit` then raise."""
        self.frozen = True

    def unfreeze(self) -> None:
        """Allow :meth:`update` and :meth:`fit` again (training)."""
        self.frozen = False

    def bin_of(self, log_snr: Tensor) -> Tensor:
        """Bin index (long, same shape) of each log-SNR, in ``0 .. len(knots) - 2``."""
        u = self.base.t_from_log_snr(log_snr.detach().to(torch.float64).cpu())
        return self._segment(self._knots, u)

    def update(self, log_snr: Tensor, ce: Tensor) -> None:
        """Fold per-token ``(lambda, cross-entropy)`` pairs into the per-bin moving averages.

        Each bin that receives tokens moves its average towards their mean cross-entropy by
        ``1 - decay`` (bias-corrected, so the first update sets it), and so does the average of
        the squared cross-entropy (the bins' noise, for :meth:`fit`'s significance scan); other
        bins keep theirs. A decayed token count per bin weighs the bins in :meth:`fit`.

        Args:
            log_snr: Log-SNR of each token's state, any shape (``+-inf`` allowed).
            ce: Commit cross-entropy of each token at that state, same shape, finite.

        Raises:
            ConfigError: The schedule is frozen.
            ShapeError: Shapes differ, or a NaN log-SNR or non-finite cross-entropy.
        """
        self._check_not_frozen("update")
        if log_snr.shape != ce.shape:
            raise ShapeError(f"log_snr {tuple(log_snr.shape)} and ce {tuple(ce.shape)} differ")
        ce = ce.detach().to(torch.float64).cpu().reshape(-1)
        if bool(torch.isnan(log_snr).any()) or not bool(torch.isfinite(ce).all()):
            raise ShapeError("info-uniform update needs non-NaN log-SNRs and finite ce")
        b = self.bin_of(log_snr).reshape(-1)
        count = torch.bincount(b, minlength=self._n_seg).to(torch.float64)
        mean = torch.bincount(b, weights=ce, minlength=self._n_seg) / count.clamp_min(1)
        sq = torch.bincount(b, weights=ce * ce, minlength=self._n_seg) / count.clamp_min(1)
        seen, k = count > 0, self.decay
        self._ema_sum = torch.where(seen, k * self._ema_sum + (1 - k) * mean, self._ema_sum)
        self._ema_sq = torch.where(seen, k * self._ema_sq + (1 - k) * sq, self._ema_sq)
        self._ema_weight = torch.where(seen, k * self._ema_weight + (1 - k), self._ema_weight)
        self._ema_tokens = k * self._ema_tokens + count  # effective sample size per bin

    def estimates(self) -> tuple[Tensor, Tensor]:
        """The moving averages: ``(centers, ce)``, both ``[len(knots) - 1]``.

        ``centers`` are the bins' base-time centers; ``ce`` is ``nan`` where no token fell yet.
        """
        centers = 0.5 * (self._knots[1:] + self._knots[:-1])
        w = self._ema_weight
        return centers, torch.where(w > 0, self._ema_sum / w.clamp_min(1e-300), torch.nan)

    def fit(self) -> None:
        """Refit the warp so that the averaged cross-entropy becomes linear in ``t``.

        Unseen bins are interpolated, the curve is made non-decreasing in base time (isotonic
        regression weighted by the bins' token counts) and read at the bin edges (flat beyond
        the outer estimates). Only what the estimates locate is warped: the cross-entropy is
        pinned to 0 at ``u = 0`` (a clean token's commit cross-entropy), and the part of the
        curve that no estimate places — the level below the lowest-noise estimate, and the share
        of the observed rise within its noise (:meth:`_significance`) — is spread evenly over
        base time (the identity). The resulting density is mixed with the identity by ``floor``.
        A flat curve, noisy or not, gives (nearly) the identity.

        Raises:
            ConfigError: The schedule is frozen, or fewer than two bins have data.
        """
        from scipy.optimize import isotonic_regression  # heavy import, needed only here

        self._check_not_frozen("fit")
        centers, est = self.estimates()
        seen = ~torch.isnan(est)
        if int(seen.sum()) < 2:
            raise ConfigError("info-uniform fit needs data in at least two bins; call update()")
        c = np.interp(centers.numpy(), centers[seen].numpy(), est[seen].numpy())
        weights = self._ema_tokens.clamp_min(1e-9).numpy()  # sparse bins count little
        c = isotonic_regression(c, weights=weights, increasing=True).x
        edges = self._knots.numpy()
        g = np.interp(edges, centers.numpy(), c)  # flat beyond the outer centers
        rise = g - g[0]
        located = self._significance() * float(rise[-1])
        top = max(float(g[0]), 0.0) + float(rise[-1])  # c(1) - c(0), with c(0) pinned to 0
        if not (top > 1e-12 * max(1.0, abs(float(g[-1]))) and located > 0):
            self._set_density(torch.ones(self._n_seg + 1, dtype=torch.float64))
            return
        slopes = (located / rise[-1]) * np.diff(rise) / np.diff(edges) + (top - located)
        slopes = slopes / top  # dF/du on each bin: located rise + the rest spread evenly
        dens = np.concatenate([slopes[:1], 0.5 * (slopes[:-1] + slopes[1:]), slopes[-1:]])
        dens = (1 - self.floor) * dens + self.floor
        self._set_density(torch.from_numpy(dens).to(torch.float64))

    def _significance(self) -> float:
        """How much of the fitted rise to trust, in ``[0, 1]``, from a scan for any rise.

        For every split of the seen bins (in base time) the pooled mean cross-entropy after
        the split minus the one before, over its standard error (per-bin variances of the fed
        cross-entropies, at least their pooled value, over the decayed token counts, a
        conservative effective sample size for the moving averages); ``z`` is the largest of
        these statistics. A flat noisy curve gives
        ``z`` of a few units: ``0`` up to ``z = NOISE_Z``, rising linearly to ``1`` at
        ``2 * NOISE_Z`` (:attr:`NOISE_Z`).
        """
        seen = self._ema_weight > 0
        w, n = self._ema_weight[seen], self._ema_tokens[seen].clamp_min(1e-9)
        mean = self._ema_sum[seen] / w
        var = (self._ema_sq[seen] / w - mean * mean).clamp_min(0.0)
        var = var.clamp_min(float((n * var).sum() / n.sum()))  # a bin of one token has var 0
        sums = [torch.cumsum(v, 0) for v in (n, n * mean, n * var)]
        count, total, spread = (torch.stack([v[:-1], v[-1] - v[:-1]]) for v in sums)
        diff = total[1] / count[1] - total[0] / count[0]
        se = torch.sqrt(spread[0] / count[0] ** 2 + spread[1] / count[1] ** 2)
        z = torch.where(se > 0, diff / se.clamp_min(1e-300), torch.where(diff > 0, math.inf, 0.0))
        return float((z.max() / self.NOISE_Z - 1).clamp(0.0, 1.0))

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The fitted state: plain tensors, an int and a bool (``weights_only`` loadable)."""
        return {
            "knots": self._knots.clone(),
            "density": self._raw.clone(),
            "ema_sum": self._ema_sum.clone(),
            "ema_sq": self._ema_sq.clone(),
            "ema_weight": self._ema_weight.clone(),
            "ema_tokens": self._ema_tokens.clone(),
            "frozen": bool(self.frozen),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (made with the same base, bins and log-SNR range).

        Raises:
            CheckpointError: Missing keys, other knots, or a non-positive density.
        """
        keys = {"knots", "density", "ema_sum", "ema_weight", "ema_tokens", "frozen"}
        if not isinstance(state, dict) or not keys <= set(state):
            raise CheckpointError(f"info-uniform state needs keys {sorted(keys)}")
        knots = torch.as_tensor(state["knots"], dtype=torch.float64)
        if knots.shape != self._knots.shape or not torch.allclose(knots, self._knots):
            raise CheckpointError(
                "info-uniform state was made with other knots (base, n_bins or log_snr_range)"
            )
        dens = torch.as_tensor(state["density"], dtype=torch.float64)
        if dens.shape != knots.shape or not bool(torch.isfinite(dens).all() and (dens > 0).all()):
            raise CheckpointError("info-uniform state has a bad density (shape, sign or NaN)")
        self._ema_sum = torch.as_tensor(state["ema_sum"], dtype=torch.float64).clone()
        self._ema_weight = torch.as_tensor(state["ema_weight"], dtype=torch.float64).clone()
        # a state saved before squares were kept: its bins count as noiseless
        sq = state.get("ema_sq", self._ema_sum**2 / self._ema_weight.clamp_min(1e-300))
        self._ema_sq = torch.as_tensor(sq, dtype=torch.float64).clone()
        self._ema_tokens = torch.as_tensor(state["ema_tokens"], dtype=torch.float64).clone()
        self.frozen = bool(state["frozen"])
        self._set_density(dens.clone())
