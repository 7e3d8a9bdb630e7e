"""Helpers shared by the flow tests: the exact pushforward of the (affine) discretized flow."""

import torch

from flowtext.flow import integrate
from flowtext.toy import GaussianToy


def make_toy(length=4, dim=2, seed=0):
    return GaussianToy.random(length, dim, generator=torch.Generator().manual_seed(seed))


def pushforward(toy, times, schedule, solver):
    """Mean and covariance of the discretized flow's output when the input is z ~ q(z | t=times[0]).

    With the exact Gaussian denoiser the field is affine in z, so every Runge-Kutta step is affine
    and the whole map is z -> J z + b: pushing 0 and the Cholesky columns through gives the
    output law exactly, with no Monte Carlo error.
    """
    n = toy.mean.numel()
    t0 = times[0] if times.ndim == 2 else times[0, 0]
    m1, c1 = toy.marginal(t0, schedule)
    chol = torch.linalg.cholesky(c1)
    basis = torch.cat([torch.zeros(1, n, dtype=c1.dtype), torch.eye(n, dtype=c1.dtype)])
    z = (m1.reshape(-1) + basis @ chol.T).reshape(n + 1, toy.length, toy.dim)
    if times.ndim == 3:
        times = times[:, :1].expand(-1, n + 1, -1)
    out = integrate(toy.denoiser(schedule), z, times, schedule, solver).z.reshape(n + 1, n)
    jac = (out[1:] - out[0]).T
    return out[0].reshape(toy.length, toy.dim), jac @ jac.T


def transport_error(toy, times, schedule, solver):
    mean, cov = pushforward(toy, times, schedule, solver)
    return max((mean - toy.mean).abs().max().item(), (cov - toy.cov).abs().max().item())


def random_monotone_grid(length, coarse_steps, refine, generator, dtype=torch.float64):
    """A random monotone per-token curve from 1 to 0, piecewise linear with kinks on the grid.

    Each column is a random non-increasing sequence on ``coarse_steps + 1`` knots; every coarse
    interval is split into ``refine`` equal sub-steps.
    """
    inc = torch.rand(coarse_steps, length, generator=generator, dtype=dtype)
    inc = inc * (torch.rand(coarse_steps, length, generator=generator, dtype=dtype) < 0.7)
    inc[:, inc.sum(0) == 0] = 1.0
    cum = torch.cumsum(inc, 0) / inc.sum(0)
    knots = torch.cat([torch.ones(1, length, dtype=dtype), 1 - cum], 0)
    knots[-1] = 0.0
    w = torch.arange(refine, dtype=dtype) / refine
    rows = [knots[k] + (knots[k + 1] - knots[k]) * w[:, None] for k in range(coarse_steps)]
    return torch.cat([*rows, knots[-1:]], 0).clamp(0, 1)
