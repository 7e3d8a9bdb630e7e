"""Solvers for the shared flow: pure steps ``(field, z, t_now, t_next) -> z_next``.

:func:`integrate` runs one along a per-token time grid.

Every token has its own step ``h_i = t_next_i - t_now_i`` (``<= 0``); a token with ``h_i = 0`` is
frozen exactly. Within one global step all times move linearly in the global clock, so a
Runge–Kutta method applied per token with its own ``h_i`` is that method applied to
``dz/ds = u(z, t(s)) t'(s)``: its order carries over to piecewise-linear policies whose kinks lie
on the grid.

* ``euler``, ``midpoint``, ``heun``, ``rk4``: explicit Runge–Kutta tableaux with an ``order``.
* ``ancestral``: samples the Gaussian posterior ``q(z_{t'} | z_t, x = x_hat)``, the generative
  step whose ELBO is the one of theory §4.
* ``ancestral-mixture``: draws a token ``v ~ p(. | z_t)`` per moving token, then samples
  ``q(z_{t'} | z_t, e_v)`` (theory §4b, :func:`flowtext.mixture.mixture_step`); reaching
  ``t' = 0`` commits ``v``. It needs a categorical field (logits and embedding table).
* ``torchdiffeq``: hands the whole grid to :func:`torchdiffeq.odeint` (any of its methods,
  adaptive ``dopri5`` included) when all tokens share one clock.

A step may be handed two things besides the field:

* ``noise``: a :class:`NoiseSource` (normal and categorical draws at given tokens), so a caller
  decides how randomness is drawn (the decoder draws per row, so a row's sample does not depend
  on the rest of the batch); :class:`GeneratorNoise` wraps one ``torch.Generator``;
* ``start``: the field's :class:`~flowtext.flow.Prediction` at ``(z, t_now)`` when the caller
  already has it (the decoder evaluates it to commit tokens), so the step does not evaluate it
  again. A prediction of a categorical field carries the logits and the embedding table, so a
  step may draw tokens (the ancestral-mixture sampler of theory §4b), not only read ``x0_hat``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

from flowtext import schedules as _schedules
from flowtext._registry import Registry
from flowtext.errors import ConfigError, ShapeError
from flowtext.flow import Denoiser, Field, FlowResult, Prediction, check_grid, velocity
from flowtext.mixture import mixture_step
from flowtext.schedules import NoiseSchedule

__all__ = [
    "Ancestral",
    "AncestralMixture",
    "Euler",
    "GeneratorNoise",
    "Heun",
    "Midpoint",
    "NoiseSource",
    "RK4",
    "RungeKutta",
    "Solver",
    "TorchDiffEq",
    "get",
    "integrate",
    "names",
    "posterior",
    "register",
]


class NoiseSource(Protocol):
    """Where a stochastic step gets its randomness from.

    Both methods draw only what ``where`` selects; entries elsewhere may hold anything (the step
    ignores them), so a source may draw per token, per row or for the whole tensor at once.
    """

    def normal(self, like: Tensor, where: Tensor) -> Tensor:
        """Standard normal noise shaped like ``like [B, L, d]`` at the tokens ``where [B, L]``."""
        ...

    def categorical(self, probs: Tensor, where: Tensor) -> Tensor:
        """Ids ``[B, L]`` drawn from ``probs [B, L, V]`` at the tokens ``where [B, L]``."""
        ...


@dataclass(frozen=True)
class GeneratorNoise:
    """A :class:`NoiseSource` drawing whole tensors from one generator (``None``: the global one).

    Args:
        generator: A ``torch.Generator`` or ``None``.
    """

    generator: torch.Generator | None = None

    def normal(self, like: Tensor, where: Tensor) -> Tensor:  # noqa: D102
        g = self.generator
        return torch.randn(like.shape, generator=g, dtype=like.dtype, device=like.device)

    def categorical(self, probs: Tensor, where: Tensor) -> Tensor:  # noqa: D102
        flat = probs.reshape(-1, probs.shape[-1])
        ids = torch.multinomial(flat, 1, generator=self.generator)
        return ids.reshape(probs.shape[:-1])


def _freeze(z: Tensor, z_new: Tensor, h: Tensor) -> Tensor:
    return torch.where((h == 0)[..., None], z, z_new)


class Solver(ABC):
    """Base class: one abstract :meth:`step`; :meth:`integrate` loops it over a grid.

    Attributes:
        order: Convergence order of a deterministic solver, ``None`` for stochastic ones.
        stochastic: Whether :meth:`step` draws from its noise source.
        per_token: Whether :meth:`step` takes any per-token times (the decoder needs this);
            ``False`` for solvers that need all tokens on one clock.
        categorical: Whether :meth:`step` needs a categorical field (a
            :class:`~flowtext.flow.Prediction` with logits and table), not only ``x0_hat``.
    """

    name: ClassVar[str]
    order: ClassVar[int | None] = None
    stochastic: ClassVar[bool] = False
    per_token: ClassVar[bool] = True
    categorical: ClassVar[bool] = False

    @abstractmethod
    def step(
        self,
        field: Field,
        z: Tensor,
        t_now: Tensor,
        t_next: Tensor,
        *,
        noise: NoiseSource | None = None,
        start: Prediction | None = None,
    ) -> Tensor:
        """Advance ``z`` from ``t_now`` to ``t_next``.

        Args:
            field: The shared field (denoiser + schedule).
            z: State ``[B, L, d]`` at ``t_now``.
            t_now: Per-token times ``[B, L]``.
            t_next: Per-token times ``[B, L]``, ``<= t_now``.
            noise: Randomness of stochastic solvers (default: the global generator).
            start: ``field.predict(z, t_now)`` when the caller already has it.

        Returns:
            State ``[B, L, d]`` at ``t_next``.
        """

    def integrate(
        self,
        field: Field,
        z: Tensor,
        times: Tensor,
        *,
        return_trajectory: bool = False,
        noise: NoiseSource | None = None,
    ) -> FlowResult:
        """Apply :meth:`step` along a validated grid ``times [K + 1, B, L]``.

        Args:
            field: The shared field.
            z: Initial state ``[B, L, d]``.
            times: Grid ``[K + 1, B, L]``.
            return_trajectory: Keep every state.
            noise: Randomness of stochastic solvers.

        Returns:
            A :class:`~flowtext.flow.FlowResult`.
        """
        states = [z]
        for k in range(times.shape[0] - 1):
            z = self.step(field, z, times[k], times[k + 1], noise=noise)
            if return_trajectory:
                states.append(z)
        traj = torch.stack(states) if return_trajectory else None
        return FlowResult(z=z, times=times, trajectory=traj)


registry: Registry[Solver] = Registry("solver")
register = registry.register
names = registry.names


def get(name: str, **kwargs: Any) -> Solver:
    """Build a solver by registry name.

    Raises:
        ConfigError: Unknown name (the message lists the valid ones) or bad arguments.
    """
    return registry.get(name, **kwargs)


def resolve(solver: Solver | str) -> Solver:
    """Return ``solver`` itself, or build it when given a registry name."""
    if isinstance(solver, str):
        return get(solver)
    if not isinstance(solver, Solver):
        raise ConfigError(f"expected a Solver or one of {names()}, got {solver!r}")
    return solver


class RungeKutta(Solver):
    """Explicit Runge–Kutta method given by its Butcher tableau ``(a, b, c)``."""

    a: ClassVar[tuple[tuple[float, ...], ...]]
    b: ClassVar[tuple[float, ...]]
    c: ClassVar[tuple[float, ...]]

    def step(self, field, z, t_now, t_next, *, noise=None, start=None):  # noqa: D102
        h = t_next - t_now
        hz = h[..., None]
        ks: list[Tensor] = []
        for a_row, c_j in zip(self.a, self.c, strict=True):
            z_j = z
            for a_jl, k_l in zip(a_row, ks, strict=False):
                if a_jl:
                    z_j = z_j + (a_jl * hz) * k_l
            t_j = t_now + c_j * h
            if not ks and start is not None:  # explicit tableaux: the first stage is (z, t_now)
                ks.append(velocity(z_j, start.x0_hat, t_j, field.schedule))
            else:
                ks.append(field.velocity(z_j, t_j))
        z_new = z
        for b_j, k_j in zip(self.b, ks, strict=True):
            if b_j:
                z_new = z_new + (b_j * hz) * k_j
        return _freeze(z, z_new, h)


@register("euler")
@dataclass(frozen=True)
class Euler(RungeKutta):
    """Forward Euler, order 1."""

    order: ClassVar[int] = 1
    a: ClassVar = ((),)
    b: ClassVar = (1.0,)
    c: ClassVar = (0.0,)


@register("midpoint")
@dataclass(frozen=True)
class Midpoint(RungeKutta):
    """Explicit midpoint rule, order 2 (same as torchdiffeq's ``midpoint``)."""

    order: ClassVar[int] = 2
    a: ClassVar = ((), (0.5,))
    b: ClassVar = (0.0, 1.0)
    c: ClassVar = (0.0, 0.5)


@register("heun")
@dataclass(frozen=True)
class Heun(RungeKutta):
    """Heun's method (explicit trapezoid), order 2."""

    order: ClassVar[int] = 2
    a: ClassVar = ((), (1.0,))
    b: ClassVar = (0.5, 0.5)
    c: ClassVar = (0.0, 1.0)


@register("rk4")
@dataclass(frozen=True)
class RK4(RungeKutta):
    """The classical fourth-order Runge–Kutta method (torchdiffeq's ``rk4`` is the 3/8 rule)."""

    order: ClassVar[int] = 4
    a: ClassVar = ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0))
    b: ClassVar = (1 / 6, 1 / 3, 1 / 3, 1 / 6)
    c: ClassVar = (0.0, 0.5, 0.5, 1.0)


def posterior(z_t: Tensor, x: Tensor, t: Tensor, s: Tensor, schedule) -> tuple[Tensor, Tensor]:
    """Mean and std of ``q(z_s | z_t, x)`` for ``s <= t`` (per token).

    With ``a = alpha_t / alpha_s`` and ``v = sigma_t^2 - a^2 sigma_s^2``, the posterior has mean
    ``(a sigma_s^2 z_t + alpha_s v x) / sigma_t^2`` and variance ``v sigma_s^2 / sigma_t^2``.
    Tokens with ``s == t`` keep ``z_t`` with zero variance.

    Args:
        z_t: ``[B, L, d]``.
        x: Clean embeddings (or their prediction) ``[B, L, d]``.
        t: Current times ``[B, L]``.
        s: Target times ``[B, L]``, ``s <= t``.
        schedule: The noise schedule.

    Returns:
        ``(mean [B, L, d], std [B, L, 1])``.
    """
    a_t, s_t = schedule.alpha(t), schedule.sigma(t)
    a_s, s_s = schedule.alpha(s), schedule.sigma(s)
    moving = s < t
    ratio = torch.where(moving, a_t / torch.where(a_s > 0, a_s, 1.0), 1.0)
    var_ts = (s_t**2 - ratio**2 * s_s**2).clamp_min(0.0)
    st2 = torch.where(moving, s_t**2, 1.0)
    w_z = (ratio * s_s**2 / st2)[..., None]
    w_x = (a_s * var_ts / st2)[..., None]
    mean = torch.where(moving[..., None], w_z * z_t + w_x * x, z_t)
    std = torch.where(moving, torch.sqrt(var_ts * s_s**2 / st2), 0.0)[..., None]
    return mean, std


@register("ancestral")
@dataclass(frozen=True)
class Ancestral(Solver):
    """Stochastic step: sample ``q(z_{t'} | z_t, x = x_hat(z_t, t))`` (DDPM-style).

    Args:
        eta: Scale of the injected noise; ``1`` is the ancestral sampler of the ELBO, ``0`` the
            deterministic posterior-mean (DDIM-like) variant.
    """

    eta: float = 1.0
    stochastic: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not 0 <= self.eta:
            raise ConfigError(f"ancestral eta must be >= 0, got {self.eta}")

    def step(self, field, z, t_now, t_next, *, noise=None, start=None):  # noqa: D102
        x_hat = (start if start is not None else field.predict(z, t_now)).x0_hat
        mean, std = posterior(z, x_hat, t_now, t_next, field.schedule)
        noise = GeneratorNoise() if noise is None else noise
        eps = noise.normal(z, t_next < t_now)
        return _freeze(z, mean + self.eta * std * eps, t_next - t_now)


@register("ancestral-mixture")
@dataclass(frozen=True)
class AncestralMixture(Solver):
    """The mixture reverse step as a sampler: ``v ~ p(. | z_t)``, then ``z_s ~ q(z_s | z_t, e_v)``.

    Tokens and normal noise are drawn from the step's :class:`NoiseSource` at the moving tokens
    only; a token stepping to ``s = 0`` becomes ``e_v`` exactly (it commits to ``v``). In the
    decoder, tokens that commit are drawn by the decoder itself from the same readout, so under
    ``autoregressive`` (every token jumps from 1 to 0) decoding is plain AR sampling.

    Args:
        temperature: Of the token draw (``0``: argmax, then a Gaussian posterior step).

    Raises:
        ConfigError: A negative temperature, or (from :meth:`step`) a field without logits.
    """

    temperature: float = 1.0
    stochastic: ClassVar[bool] = True
    categorical: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not (0 <= self.temperature < float("inf")):
            raise ConfigError(f"temperature must be a finite number >= 0, got {self.temperature}")

    def step(self, field, z, t_now, t_next, *, noise=None, start=None):  # noqa: D102
        pred = start if start is not None else field.predict(z, t_now)
        if pred.logits is None or pred.table is None:
            raise ConfigError(
                "the ancestral-mixture solver draws tokens: it needs a categorical field "
                "(Field.categorical, a predictor returning logits and the embedding table)"
            )
        noise = GeneratorNoise() if noise is None else noise
        moving = t_next < t_now
        logits = pred.logits.to(torch.float64)
        if self.temperature == 0:
            v = logits.argmax(-1)
        else:
            v = noise.categorical(torch.softmax(logits / self.temperature, -1), moving)
        xi = noise.normal(z, moving)
        z_new, _ = mixture_step(
            z, pred.logits, pred.table, t_now, t_next, field.schedule, tokens=v, xi=xi
        )
        return _freeze(z, z_new, t_next - t_now)


ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
MAX_ADAPTIVE_STEPS = 1000
"""Default ``max_num_steps`` of torchdiffeq's adaptive methods (override through ``options``)."""


@register("torchdiffeq")
@dataclass(frozen=True)
class TorchDiffEq(Solver):
    """Adapter to :func:`torchdiffeq.odeint` for grids on which all tokens share one clock.

    The grid's rows must each hold a single time (as under ``synchronous``); repeated rows are
    collapsed. Fixed-grid methods step exactly on the grid; adaptive ones (``dopri5``) report
    the state at every grid time.

    Args:
        method: Any torchdiffeq method name (``"dopri5"``, ``"euler"``, ``"rk4"``, ...).
        rtol: Relative tolerance (adaptive methods).
        atol: Absolute tolerance (adaptive methods).
        options: Extra solver options passed through; adaptive methods get
            ``max_num_steps = MAX_ADAPTIVE_STEPS`` unless given.

    Raises:
        ConfigError: Unknown method, options that are not a dict, or (from :meth:`integrate`)
            an adaptive step size that collapsed or ran out of steps.
    """

    per_token: ClassVar[bool] = False
    method: str = "dopri5"
    rtol: float = 1e-7
    atol: float = 1e-9
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        from torchdiffeq._impl.odeint import SOLVERS  # torchdiffeq (+ scipy): seconds to import

        if not isinstance(self.method, str) or self.method not in SOLVERS:
            raise ConfigError(
                f"unknown torchdiffeq method {self.method!r}; valid: {', '.join(sorted(SOLVERS))}"
            )
        if not isinstance(self.options, dict):
            raise ConfigError(
                f"options must be a dict of torchdiffeq options, got {self.options!r}"
            )

    def _options(self) -> dict | None:
        options = dict(self.options)
        if self.method in ADAPTIVE_METHODS:  # a singular field must fail, not run for hours
            options.setdefault("max_num_steps", MAX_ADAPTIVE_STEPS)
        return options or None

    @staticmethod
    def _clock(times: Tensor) -> Tensor:
        clock = times.reshape(times.shape[0], -1)
        if not bool((clock == clock[:, :1]).all()):
            raise ConfigError(
                "the torchdiffeq solver needs all tokens to share one clock (e.g. the "
                "synchronous policy); use a fixed-grid solver (euler, midpoint, heun, rk4) "
                "for per-token grids"
            )
        return clock[:, 0]

    def _odeint(self, field: Field, z: Tensor, clock: Tensor) -> Tensor:
        from torchdiffeq import odeint  # only for this solver: a slow import

        keep = torch.ones_like(clock, dtype=torch.bool)
        keep[1:] = clock[1:] < clock[:-1]
        uniq = clock[keep]
        if uniq.numel() == 1:
            return z[None].expand(clock.shape[0], *z.shape)

        def f(t: Tensor, y: Tensor) -> Tensor:
            return field.velocity(y, t.expand(z.shape[:2]).to(y.dtype))

        try:
            sol = odeint(
                f,
                z,
                uniq,
                method=self.method,
                rtol=self.rtol,
                atol=self.atol,
                options=self._options(),
            )
        except AssertionError as err:  # torchdiffeq's "underflow in dt"
            raise ConfigError(
                f"torchdiffeq {self.method} failed ({err}): the adaptive step size collapsed, "
                "usually where the velocity is singular at t = 0 or t = 1; stop the grid short "
                "of the end point (t_min > 0), loosen rtol/atol, or use a fixed-grid method "
                "(method='rk4', or the euler/heun/rk4 solvers)"
            ) from err
        return sol[torch.cumsum(keep, 0) - 1]

    def step(self, field, z, t_now, t_next, *, noise=None, start=None):  # noqa: D102
        clock = self._clock(torch.stack([t_now, t_next]))
        return self._odeint(field, z, clock)[-1]

    def integrate(self, field, z, times, *, return_trajectory=False, noise=None):  # noqa: D102
        traj = self._odeint(field, z, self._clock(times))
        return FlowResult(z=traj[-1], times=times, trajectory=traj if return_trajectory else None)


def integrate(
    denoiser: Denoiser,
    z: Tensor,
    times: Tensor,
    schedule: NoiseSchedule | str,
    solver: Solver | str = "euler",
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
        solver: A :class:`Solver` or its registry name.
        return_trajectory: Also return the state at every grid row.
        generator: Random generator for stochastic solvers (``ancestral``).

    Returns:
        A :class:`~flowtext.flow.FlowResult`.

    Raises:
        ShapeError: ``z`` is not ``[B, L, d]`` or the grid does not fit it.
        TimeRangeError: A grid outside ``[0, 1]`` or with a time that increases.
        ConfigError: Unknown schedule or solver.
    """
    if z.ndim != 3:
        raise ShapeError(f"z must be [B, L, d], got shape {tuple(z.shape)}")
    grid = check_grid(times.to(z.dtype), z.shape[0], z.shape[1])
    field = Field(denoiser, _schedules.resolve(schedule))
    return resolve(solver).integrate(
        field, z, grid, return_trajectory=return_trajectory, noise=GeneratorNoise(generator)
    )
