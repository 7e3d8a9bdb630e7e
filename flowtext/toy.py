"""The exact Gaussian toy: analytic ground truth for the shared flow.

Data ``x ~ N(m, C)`` over ``[L, d]`` with a full covariance ``C`` across all ``L d`` coordinates
(tokens are correlated). With per-token times, ``z = A x + S eps`` where ``A`` and ``S`` are
diagonal (``alpha(t_i)``, ``sigma(t_i)`` repeated over each token's ``d`` coordinates), so

``E[x | z] = m + C A (A C A + S^2)^{-1} (z - A m)``, which is the exact denoiser for
*any* per-token time vector. ``A C A + S^2`` is positive definite whenever ``C`` is,
because ``alpha = 1`` wherever ``sigma = 0``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flowtext import schedules as _schedules
from flowtext.errors import ShapeError
from flowtext.schedules import NoiseSchedule

__all__ = ["GaussianToy"]


@dataclass(frozen=True)
class GaussianToy:
    """Gaussian data over ``[L, d]`` with an exact denoiser.

    Args:
        mean: ``[L, d]``.
        cov: ``[L * d, L * d]``, symmetric positive definite (row-major flattening of ``[L, d]``).
    """

    mean: Tensor
    cov: Tensor

    def __post_init__(self) -> None:
        if self.mean.ndim != 2:
            raise ShapeError(f"mean must be [L, d], got {tuple(self.mean.shape)}")
        n = self.mean.numel()
        if self.cov.shape != (n, n):
            raise ShapeError(f"cov must be [{n}, {n}] for mean {tuple(self.mean.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        """``(L, d)``: tokens and per-token dimension of a sample."""
        return self.mean.shape[0], self.mean.shape[1]

    @classmethod
    def random(
        cls,
        length: int,
        dim: int,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float64,
        scale: float = 1.0,
    ) -> GaussianToy:
        """A random toy with correlated tokens and a well-conditioned covariance.

        Args:
            length: ``L``.
            dim: ``d``.
            generator: Random generator for reproducibility.
            dtype: Floating dtype.
            scale: Overall scale of the covariance.

        Returns:
            The toy.
        """
        n = length * dim
        g = torch.randn(n, n, generator=generator, dtype=dtype) / n**0.5
        cov = scale * (g @ g.T + 0.25 * torch.eye(n, dtype=dtype))
        mean = torch.randn(length, dim, generator=generator, dtype=dtype)
        return cls(mean=mean, cov=cov)

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` data samples ``[n, L, d]``."""
        chol = torch.linalg.cholesky(self.cov)
        e = torch.randn(n, self.mean.numel(), generator=generator, dtype=self.mean.dtype)
        return (self.mean.reshape(-1) + e @ chol.T).reshape(n, *self.shape)

    def _diag(self, t: Tensor, schedule: NoiseSchedule) -> tuple[Tensor, Tensor]:
        a = schedule.alpha(t).repeat_interleave(self.shape[1], dim=-1)
        s = schedule.sigma(t).repeat_interleave(self.shape[1], dim=-1)
        return a, s

    def marginal(self, t: Tensor, schedule: NoiseSchedule | str) -> tuple[Tensor, Tensor]:
        """Mean ``[L, d]`` and covariance ``[L d, L d]`` of ``z_t`` at per-token times ``t [L]``."""
        a, s = self._diag(t, _schedules.resolve(schedule))
        mean = (a * self.mean.reshape(-1)).reshape(self.shape)
        return mean, a[:, None] * self.cov * a[None, :] + torch.diag(s**2)

    def sample_marginal(
        self,
        n: int,
        t: Tensor,
        schedule: NoiseSchedule | str,
        *,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Draw ``n`` samples of ``z_t`` at per-token times ``t [L]``: ``[n, L, d]``.

        At ``t = 1`` with ``alpha(1) = 0`` this is ``N(0, I)``.
        """
        mean, cov = self.marginal(t, schedule)
        chol = torch.linalg.cholesky(cov)
        e = torch.randn(n, mean.numel(), generator=generator, dtype=mean.dtype)
        return (mean.reshape(-1) + e @ chol.T).reshape(n, *self.shape)

    def x0_hat(self, z: Tensor, t: Tensor, schedule: NoiseSchedule | str) -> Tensor:
        """Exact posterior mean ``E[x | z_t = z]``.

        Args:
            z: ``[B, L, d]``.
            t: Per-token times ``[B, L]``.
            schedule: The noise schedule.

        Returns:
            ``[B, L, d]``.
        """
        if z.shape[1:] != self.mean.shape or t.shape != z.shape[:2]:
            n, d = self.shape
            raise ShapeError(
                f"expected z [B, {n}, {d}] and t [B, {n}]; "
                f"got {tuple(z.shape)} and {tuple(t.shape)}"
            )
        b = z.shape[0]
        a, s = self._diag(t.to(self.cov.dtype), _schedules.resolve(schedule))  # [B, n]
        m = self.mean.reshape(-1)
        resid = z.reshape(b, -1).to(self.cov.dtype) - a * m
        if bool((t == t[:1]).all()):  # one shared time vector: one factorization
            mat = a[0, :, None] * self.cov * a[0, None, :] + torch.diag(s[0] ** 2)
            sol = torch.linalg.solve(mat, resid.T).T
        else:
            mat = a[:, :, None] * self.cov * a[:, None, :] + torch.diag_embed(s**2)
            sol = torch.linalg.solve(mat, resid[..., None])[..., 0]
        x = m + (a * sol) @ self.cov.T
        return x.reshape(z.shape).to(z.dtype)

    def denoiser(self, schedule: NoiseSchedule | str):
        """The exact denoiser as a callable ``(z [B, L, d], t [B, L]) -> x0_hat [B, L, d]``."""
        sched = _schedules.resolve(schedule)
        return lambda z, t: self.x0_hat(z, t, sched)
