"""T7: with the exact Gaussian denoiser every policy carries N(0, I) to the data law."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flowtext import policies
from flowtext.solvers import integrate

from ._toyutil import make_toy, random_monotone_grid, transport_error

POLICIES = {
    "synchronous": policies.get("synchronous"),
    "block-2": policies.get("block", size=2),
    "block-3": policies.get("block", size=3),
    "autoregressive": policies.get("autoregressive"),
    "diagonal-0.2": policies.get("diagonal", width=0.2),
    "diagonal-1": policies.get("diagonal", width=1.0),
}
L = 6


def steps_for(policy, mult):
    return policy.n_blocks(L) * mult if isinstance(policy, policies.Block) else L * mult


@pytest.mark.parametrize("schedule", ["linear", "cosine", "vp"])
@pytest.mark.parametrize("key", list(POLICIES))
def test_t7_transport_error_vanishes_as_steps_grow(key, schedule):
    toy = make_toy(L, 2, 5)
    pol = POLICIES[key]
    errs = [
        transport_error(
            toy, pol.grid(L, steps_for(pol, m), dtype=torch.float64), schedule, "midpoint"
        )
        for m in (2, 4, 8, 16)
    ]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 0.05 * errs[0] and errs[-1] < 5e-3, errs


@given(seed=st.integers(0, 10_000))
def test_t7_random_monotone_curves(seed):
    toy = make_toy(4, 2, seed % 5)
    errs = [
        transport_error(
            toy, random_monotone_grid(4, 5, r, torch.Generator().manual_seed(seed)), "linear", "rk4"
        )
        for r in (2, 4, 8)
    ]
    assert errs[2] < errs[0] and errs[2] < 1e-3, errs


@pytest.mark.parametrize("key", ["synchronous", "block-2", "diagonal-0.2"])
def test_t7_monte_carlo_samples_match_data_law(key):
    toy = make_toy(L, 2, 5)
    n = 4000
    pol = POLICIES[key]
    grid = pol.grid(L, steps_for(pol, 8), dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(n, L, 2, generator=g, dtype=torch.float64)
    x = integrate(toy.denoiser("linear"), z1, grid, "linear", "rk4").z.reshape(n, -1)
    mean, cov = x.mean(0), torch.cov(x.T)
    var = torch.diagonal(toy.cov)
    se_mean = (var / n).sqrt()
    se_cov = ((var[:, None] * var[None, :] + toy.cov**2) / n).sqrt()
    assert bool(((mean - toy.mean.reshape(-1)).abs() <= 5 * se_mean + 1e-3).all())
    assert bool(((cov - toy.cov).abs() <= 5 * se_cov + 1e-3).all())


def test_metric_detects_a_wrong_transport():
    """Sanity check of the check: a mismatched schedule carries the toy to the wrong law."""
    toy = make_toy(L, 2, 5)
    grid = POLICIES["synchronous"].grid(L, 32, dtype=torch.float64)
    wrong_denoiser = toy.denoiser("cosine")
    from flowtext.toy import GaussianToy

    class Wrong(GaussianToy):
        def denoiser(self, schedule):
            return wrong_denoiser

    bad = Wrong(toy.mean, toy.cov)
    assert transport_error(toy, grid, "linear", "rk4") < 1e-4
    assert transport_error(bad, grid, "linear", "rk4") > 0.05


@pytest.mark.parametrize("key", ["synchronous", "block-2"])
def test_t7_ancestral_sampler_converges(key):
    toy = make_toy(4, 2, 1)
    n = 3000
    pol = POLICIES[key]
    errs = []
    for total in (4, 256):
        steps = total
        g = torch.Generator().manual_seed(0)
        z1 = torch.randn(n, 4, 2, generator=g, dtype=torch.float64)
        x = integrate(
            toy.denoiser("linear"),
            z1,
            pol.grid(4, steps, dtype=torch.float64),
            "linear",
            "ancestral",
            generator=g,
        ).z.reshape(n, -1)
        errs.append((torch.cov(x.T) - toy.cov).abs().max().item())
    assert errs[1] < 0.1 * errs[0] and errs[1] < 0.25, errs
