"""Helpers shared by the flow tests (the exact pushforward lives in flowtext.demo)."""

import torch

from flowtext.demo import pushforward
from flowtext.toy import GaussianToy


def make_toy(length=4, dim=2, seed=0):
    return GaussianToy.random(length, dim, generator=torch.Generator().manual_seed(seed))


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
