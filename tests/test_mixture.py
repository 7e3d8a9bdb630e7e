"""T10: the mixture reverse step (theory §4b) — its KL estimate, its limits, the sampler, and the
K-step bound of the exact unigram posterior (equal to the entropy for every K and policy)."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from flowtext import mixture, policies, schedules
from flowtext.errors import ConfigError, ShapeError, TimeRangeError
from flowtext.objectives import (
    discrete_elbo,
    gaussian_kl_weight,
    single_stream_loss,
    two_stream_loss,
)
from flowtext.solvers import posterior

F64 = torch.float64


def random_readout(seed, b=2, length=3, vocab=6, d=3, dtype=F64, scale=2.0):
    """Random logits ``[B, L, V]``, table ``[V, d]``, tokens ``[B, L]`` and ``xi [B, L, d]``."""
    g = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(b, length, vocab, generator=g, dtype=F64)
    table = torch.randn(vocab, d, generator=g, dtype=F64)
    tokens = torch.randint(0, vocab, (b, length), generator=g)
    xi = torch.randn(b, length, d, generator=g, dtype=F64)
    return logits.to(dtype), table.to(dtype), tokens, xi.to(dtype)


def neg_log_p(logits, tokens):
    return -torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]


# ------------------------------------------------------------------------ coefficients


@pytest.mark.parametrize("name", schedules.names())
@given(seed=st.integers(0, 10_000))
@settings(max_examples=10)
def test_posterior_coefficients_match_the_solvers_posterior(name, seed):
    sched = schedules.get(name)
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(3, 4, generator=g, dtype=F64) * 0.98 + 0.02
    s = t * torch.rand(3, 4, generator=g, dtype=F64)
    t[0, 0], s[0, 1], s[1, 0] = 1.0, 0.0, t[1, 0]  # noise end, commit, frozen
    z, x = (torch.randn(3, 4, 5, generator=g, dtype=F64) for _ in range(2))
    a, b, var = mixture.posterior_coefficients(t, s, sched)
    mean, std = posterior(z, x, t, s, sched)
    torch.testing.assert_close(a[..., None] * z + b[..., None] * x, mean, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(var.sqrt()[..., None], std, rtol=1e-9, atol=1e-10)
    delta = mixture.snr_gap(t, s, sched)
    inner = (s > 0) & (s < t)
    torch.testing.assert_close(delta[inner], (b**2 / var)[inner], rtol=1e-8, atol=0)
    torch.testing.assert_close(delta[inner], 2 * gaussian_kl_weight(t, s, sched)[inner])
    assert delta[0, 1] == math.inf and delta[1, 0] == 0


def test_bad_times_are_rejected():
    sched = schedules.get("cosine")
    with pytest.raises(TimeRangeError):
        mixture.snr_gap(torch.tensor([0.3]), torch.tensor([0.5]), sched)
    with pytest.raises(ShapeError):
        mixture.posterior_coefficients(torch.ones(2), torch.zeros(3), sched)
    logits, table, tokens, xi = random_readout(0)
    with pytest.raises(ShapeError):
        mixture.mixture_kl(logits, table[:-1], tokens, torch.ones(2, 3), xi)
    with pytest.raises(ShapeError):
        mixture.mixture_kl(logits, table, tokens, torch.ones(2, 3), xi[..., :-1])
    with pytest.raises(ConfigError):
        mixture.sample_tokens(logits, temperature=-1.0)


# ------------------------------------------------------------------------ the KL estimate


@given(
    seed=st.integers(0, 10_000),
    log_delta=st.floats(-8.0, 12.0),
    dtype=st.sampled_from([torch.float32, F64]),
)
@settings(max_examples=40)
def test_every_estimate_is_at_most_the_commit_cross_entropy(seed, log_delta, dtype):
    logits, table, tokens, xi = random_readout(seed, dtype=dtype, scale=4.0)
    delta = torch.full(tokens.shape, 10.0**log_delta, dtype=dtype)
    delta[0, 0], delta[-1, -1] = 0.0, math.inf
    kl = mixture.mixture_kl(logits, table, tokens, delta, xi)
    assert kl.dtype == dtype
    assert bool((kl <= neg_log_p(logits, tokens)).all())  # exactly, not up to rounding


@given(seed=st.integers(0, 10_000))
@settings(max_examples=20)
def test_a_step_to_zero_is_the_commit_cross_entropy_exactly(seed):
    logits, table, tokens, xi = random_readout(seed)
    inf = torch.full(tokens.shape, math.inf, dtype=F64)
    kl = mixture.mixture_kl(logits, table, tokens, inf, xi)
    assert torch.equal(kl, neg_log_p(logits, tokens))
    torch.testing.assert_close(
        kl, F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none")
    )
    assert torch.equal(kl, mixture.mixture_kl(logits, table, tokens, inf, 5 * xi))  # no xi
    # continuous in Delta: a huge finite gap is the same
    big = mixture.mixture_kl(logits, table, tokens, torch.full_like(inf, 1e8), xi)
    torch.testing.assert_close(big, kl, rtol=1e-6, atol=1e-8)
    # and the limit is differentiable without NaNs
    logits = logits.clone().requires_grad_(True)
    tab = table.clone().requires_grad_(True)
    mixture.mixture_kl(logits, tab, tokens, inf, xi).sum().backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(tab.grad).all()


def test_a_zero_gap_costs_nothing():
    logits, table, tokens, xi = random_readout(3)
    kl = mixture.mixture_kl(logits, table, tokens, torch.zeros(tokens.shape, dtype=F64), xi)
    torch.testing.assert_close(kl, torch.zeros_like(kl), rtol=0, atol=1e-14)


def gauss_hermite_2d(n=24):
    """Nodes ``[n^2, 2]`` and weights ``[n^2]`` of ``E_{xi ~ N(0, I_2)}``."""
    x, w = np.polynomial.hermite_e.hermegauss(n)
    w = w / w.sum()
    nodes = torch.tensor(np.stack(np.meshgrid(x, x, indexing="ij"), -1).reshape(-1, 2))
    return nodes, torch.tensor(np.outer(w, w).reshape(-1))


def expected_kl(logits, table, token, delta, nodes, weights):
    """``E_xi[mixture_kl]`` for one token by quadrature (``logits [V]``, ``table [V, 2]``)."""
    n = nodes.shape[0]
    kl = mixture.mixture_kl(
        logits.expand(1, n, -1),
        table,
        torch.full((1, n), token),
        torch.full((1, n), delta, dtype=F64),
        nodes[None],
    )
    return (kl[0] * weights).sum()


@given(seed=st.integers(0, 10_000))
@settings(max_examples=10)
def test_small_gaps_give_the_gaussian_mean_kl_to_first_order(seed):
    """``E[KL] = 1/2 Delta |e_x - e_hat|^2 + O(Delta^2)``: the ratio tends to 1 and the error
    shrinks four-fold when Delta halves."""
    logits, table, tokens, _ = random_readout(seed, b=1, length=1, vocab=5, d=2, scale=1.0)
    nodes, weights = gauss_hermite_2d()
    x = int(tokens[0, 0])
    e_hat = torch.softmax(logits[0, 0], -1) @ table
    sq = ((table[x] - e_hat) ** 2).sum()
    # the O(Delta^2) term is free of |e_x - e_hat|^2: small gaps are small relative to it
    deltas = [1e-2 * min(1.0, sq.item()) / 2**k for k in range(5)]
    errs, ratios = [], []
    for d in deltas:
        kl = expected_kl(logits[0, 0], table, x, d, nodes, weights)
        ratios.append((kl / (0.5 * d * sq)).item())
        errs.append(abs(kl - 0.5 * d * sq).item())
    assert abs(ratios[-1] - 1) < 0.05 and abs(ratios[-1] - 1) < abs(ratios[0] - 1) / 8
    orders = [math.log2(errs[i] / errs[i + 1]) for i in range(len(errs) - 1)]
    # second order asymptotically: the observed order tends to 2 (higher terms fade as Delta halves)
    assert all(1.6 < p < 2.5 for p in orders) and abs(orders[-1] - 2) < 0.15, orders


def dense_normal_1d(n=20_001, width=10.0):
    """Trapezoid nodes ``[n, 1]`` and weights ``[n]`` of ``E_{xi ~ N(0, 1)}`` on a fine grid (the
    integrands below are nearly piecewise linear for large gaps, where Gauss-Hermite is slow)."""
    x = torch.linspace(-width, width, n, dtype=F64)
    w = torch.exp(-0.5 * x**2)
    w[0], w[-1] = w[0] / 2, w[-1] / 2
    return x[:, None], w / w.sum()


def direct_kl(logits, table, token, t, s, sched, nodes, weights):
    """``KL(q(z_s | z_t, x) || sum_v p_v q(z_s | z_t, e_v))`` from the two densities, by
    quadrature over ``z_s ~ q(. | z_t, x)`` (``nodes`` of a standard normal in ``d``
    dimensions); independent of the estimator: means and std from the solvers' posterior."""
    vocab, d = table.shape
    tt = torch.full((1, vocab), t, dtype=F64)
    ss = torch.full((1, vocab), s, dtype=F64)
    z_t = sched.alpha(tt[0, 0]) * table[token] + sched.sigma(tt[0, 0]) * 0.4 * torch.ones(d)
    means, std = posterior(z_t.expand(1, vocab, d), table[None], tt, ss, sched)
    means, std = means[0], std[0, 0, 0]
    z = means[token] + std * nodes  # [n, d]
    comp = torch.distributions.Normal(means[None], std).log_prob(z[:, None]).sum(-1)  # [n, V]
    log_mix = torch.logsumexp(torch.log_softmax(logits, -1) + comp, -1)
    return ((comp[:, token] - log_mix) * weights).sum()


def one_token_kl(logits, table, token, delta, xi):
    """``mixture_kl`` of one token for a batch of draws ``xi [n, d]``, ``[n]``."""
    n = xi.shape[0]
    return mixture.mixture_kl(
        logits.expand(1, n, -1),
        table,
        torch.full((1, n), token),
        torch.full((1, n), delta, dtype=F64),
        xi[None],
    )[0]


def mc_setup(seed, t, frac):
    sched = schedules.get("cosine")
    logits, table, tokens, _ = random_readout(seed, b=1, length=1, vocab=5, d=1, scale=1.5)
    logits, x, s = logits[0, 0], int(tokens[0, 0]), t * frac
    delta = mixture.snr_gap(torch.tensor(t, dtype=F64), torch.tensor(s, dtype=F64), sched).item()
    nodes, weights = dense_normal_1d()
    ref = direct_kl(logits, table, x, t, s, sched, nodes, weights)
    return logits, table, x, delta, ref, nodes, weights


@given(seed=st.integers(0, 10_000), t=st.floats(0.3, 0.95), frac=st.floats(0.2, 0.9))
@settings(max_examples=10)
def test_monte_carlo_mean_matches_numerical_integration(seed, t, frac):
    """In d = 1: the estimator integrated over ``xi`` equals the KL of the two densities, and the
    average of many one-draw estimates agrees with it within Monte Carlo error."""
    logits, table, x, delta, ref, nodes, weights = mc_setup(seed, t, frac)
    on_nodes = one_token_kl(logits, table, x, delta, nodes)
    quad = (on_nodes * weights).sum()
    torch.testing.assert_close(quad, ref, rtol=1e-7, atol=1e-10)
    # the estimator's exact standard deviation, by the same quadrature: its law can have a rare
    # heavy tail (values near -50 where xi pushes z_s between tokens) that 20 000 draws may miss,
    # so their sample std can be 50x too small
    sd = ((on_nodes - quad) ** 2 * weights).sum().sqrt()
    n = 20_000
    xi = torch.randn(n, 1, generator=torch.Generator().manual_seed(seed), dtype=F64)
    draws = one_token_kl(logits, table, x, delta, xi)
    # Monte Carlo error, plus the reference quadrature's own (relative ~1e-6) error: some cases
    # have an almost deterministic estimator, whose standard error is below the quadrature's
    assert abs(draws.mean() - ref) < 5 * sd / math.sqrt(n) + 1e-5 * abs(ref) + 1e-9


def test_dropping_the_xi_term_or_the_half_is_detected():
    """The statement above fails for the estimator without ``sqrt(Delta) xi.(e_v - e_x)``
    (``xi = 0``) and for a doubled quadratic term (the ``1/2`` dropped: ``Delta -> 2 Delta``
    there and ``sqrt(2 Delta) xi`` rescaled back)."""
    logits, table, x, delta, ref, nodes, weights = mc_setup(3, 0.6, 0.5)
    no_xi = (one_token_kl(logits, table, x, delta, 0 * nodes) * weights).sum()
    no_half = (one_token_kl(logits, table, x, 2 * delta, nodes / math.sqrt(2)) * weights).sum()
    assert abs(no_xi - ref) > 0.01 and abs(no_half - ref) > 0.01, (ref, no_xi, no_half)


# ------------------------------------------------------------------------ the sampler


def test_mixture_step_commits_to_drawn_tokens_at_zero():
    sched = schedules.get("cosine")
    logits, table, _, _ = random_readout(4, b=4000, length=1, vocab=4, d=3, scale=1.0)
    logits = logits[:1].expand(4000, -1, -1)
    t = torch.full((4000, 1), 0.6, dtype=F64)
    z = torch.randn(4000, 1, 3, dtype=F64)
    g = torch.Generator().manual_seed(0)
    z0, ids = mixture.mixture_step(z, logits, table, t, torch.zeros_like(t), sched, generator=g)
    assert torch.equal(z0, table[ids])
    freq = torch.bincount(ids.flatten(), minlength=4).double() / 4000
    p = torch.softmax(logits[0, 0], -1)
    assert bool(((freq - p).abs() < 5 * (p * (1 - p) / 4000).sqrt() + 1e-3).all())
    greedy, ids0 = mixture.mixture_step(
        z, logits, table, t, torch.zeros_like(t), sched, temperature=0.0
    )
    assert bool((ids0 == logits.argmax(-1)).all()) and torch.equal(greedy, table[ids0])


def test_mixture_step_samples_the_mixture_and_freezes_still_tokens():
    """Mean ``A z + B e_hat`` (the Gaussian-mean step's mean) and covariance
    ``var I + B^2 Cov_p(e_v)``; tokens with ``s = t`` keep ``z_t``."""
    sched = schedules.get("linear")
    n, vocab, d = 40_000, 3, 2
    logits, table, _, _ = random_readout(7, b=1, length=1, vocab=vocab, d=d, scale=1.0)
    logits = logits.expand(n, 2, -1).contiguous()
    t = torch.tensor([[0.7, 0.4]], dtype=F64).expand(n, -1)
    s = torch.tensor([[0.3, 0.4]], dtype=F64).expand(n, -1)
    z = torch.tensor([[0.5, -1.0]], dtype=F64).expand(n, 2, d)
    g = torch.Generator().manual_seed(1)
    z_s, _ = mixture.mixture_step(z, logits, table, t, s, sched, generator=g)
    assert torch.equal(z_s[:, 1], z[:, 1])
    a, b, var = (c[0, 0].item() for c in mixture.posterior_coefficients(t[:1], s[:1], sched))
    p = torch.softmax(logits[0, 0], -1)
    e_hat = p @ table
    cov = (
        var * torch.eye(d, dtype=F64)
        + b**2 * (table.T * p) @ table
        - b**2 * torch.outer(e_hat, e_hat)
    )
    emp = z_s[:, 0]
    torch.testing.assert_close(emp.mean(0), a * z[0, 0] + b * e_hat, rtol=0, atol=0.02)
    torch.testing.assert_close(torch.cov(emp.T), cov, rtol=0, atol=0.03)


# ------------------------------------------------------------------------ the K-step bound


class UnigramOracle:
    """The exact per-token posterior of i.i.d. tokens with law ``pi`` under the path of
    ``schedule``: ``logits_v = log pi_v - |z - alpha e_v|^2 / (2 sigma^2)``. Implements the
    network interface of :mod:`flowtext.objectives` (context is ignored, as it carries nothing).
    """

    def __init__(self, log_pi, table, schedule):
        self.log_pi, self.table, self.schedule = log_pi, table, schedule

    def embedding_table(self):
        return self.table

    def embed(self, tokens):
        return self.table[tokens]

    def x0_hat(self, logits):
        return torch.softmax(logits, -1) @ self.table

    def __call__(self, z, t, o, positions):
        a = self.schedule.alpha(t)[..., None, None]
        s2 = self.schedule.sigma(t).pow(2).clamp_min(1e-12)[..., None]  # t = 0: finite logits
        logits = self.log_pi - ((z[..., None, :] - a * self.table) ** 2).sum(-1) / (2 * s2)
        # a committed token's readout is the next token's law (theory §3d): pi, as tokens are iid
        logits = torch.where((t == 0)[..., None], self.log_pi, logits)
        return SimpleNamespace(logits=logits, difficulty=torch.zeros_like(t))


def unigram_setup(seed=0, vocab=8, d=4, rows=1024, length=8, schedule="cosine"):
    g = torch.Generator().manual_seed(seed)
    log_pi = torch.log_softmax(1.5 * torch.randn(vocab, generator=g, dtype=F64), 0)
    table = torch.randn(vocab, d, generator=g, dtype=F64)
    table = math.sqrt(d) * table / table.norm(dim=-1, keepdim=True)
    net = UnigramOracle(log_pi, table, schedules.get(schedule))
    tokens = torch.multinomial(log_pi.exp(), rows * length, True, generator=g).view(rows, length)
    return net, tokens, -log_pi[tokens], g


def excess(bound, info):
    """Mean excess of a per-token bound over ``-log pi(x)`` and its standard error."""
    diff = (bound - info).flatten()
    return diff.mean().item(), (diff.std() / math.sqrt(diff.numel())).item()


POLICY_GRIDS = [("synchronous", {}, k) for k in (1, 2, 4, 8, 16, 32, 64)]
POLICY_GRIDS += [("block", {"size": 4}, k) for k in (2, 4, 8, 16, 32, 64)]
POLICY_GRIDS += [("diagonal", {"width": 0.5}, k) for k in (1, 2, 4, 8, 16, 32, 64)]


@pytest.mark.parametrize(
    ("policy", "kwargs", "steps"), POLICY_GRIDS, ids=[f"{p}-K{k}" for p, _, k in POLICY_GRIDS]
)
def test_t10_exact_unigram_posterior_bound_equals_the_entropy(policy, kwargs, steps):
    net, tokens, info, g = unigram_setup(seed=steps)
    grid = policies.get(policy, **kwargs).grid(tokens.shape[1], steps, dtype=F64)
    with torch.no_grad():
        mix = discrete_elbo(net, tokens, grid, net.schedule, generator=g, reverse="mixture")
        gauss = discrete_elbo(net, tokens, grid, net.schedule, generator=g)
    m, se = excess(mix, info)
    assert abs(m) < 4.5 * se + 1e-9, (m, se)
    m_gauss, se_gauss = excess(gauss, info)
    if steps <= 4 and bool(((grid > 0) & (grid < 1)).any()):  # not only commit jumps
        assert m_gauss > 0.1 and m_gauss > 10 * se_gauss, (m_gauss, se_gauss)


@pytest.mark.parametrize("schedule", ["linear", "vp"])
def test_t10_holds_for_other_schedules_and_a_grid_reaching_zero_from_tiny_times(schedule):
    """No t_min needed: a last positive time of 1e-30 (an SNR that overflows float32) still
    gives a finite bound equal to the entropy (VP: plus its prior term, which is exact too)."""
    net, tokens, info, g = unigram_setup(seed=1, schedule=schedule)
    grid = policies.get("synchronous").grid(tokens.shape[1], 8, dtype=F64)
    grid[-2] = 1e-30
    with torch.no_grad():
        mix = discrete_elbo(net, tokens, grid, net.schedule, generator=g, reverse="mixture")
        f32 = discrete_elbo(
            net_f32(net), tokens, grid.float(), net.schedule, generator=g, reverse="mixture"
        )
    assert torch.isfinite(mix).all() and torch.isfinite(f32).all()
    if schedule != "vp":  # alpha(1) > 0: the prior N(0, I) is not the exact marginal at t = 1
        m, se = excess(mix, info)
        assert abs(m) < 4.5 * se, (m, se)


def net_f32(net):
    return UnigramOracle(net.log_pi.float(), net.table.float(), net.schedule)


def test_t10_one_pass_estimators_are_unbiased_with_the_mixture_step():
    net, tokens, info, g = unigram_setup(seed=5, rows=4096)
    grid = policies.get("block", size=4).grid(tokens.shape[1], 8, dtype=F64)
    with torch.no_grad():
        single = single_stream_loss(net, tokens, grid, net.schedule, generator=g, reverse="mixture")
        two = two_stream_loss(
            net,
            tokens,
            net.schedule,
            block_size=4,
            steps_per_block=4,
            generator=g,
            reverse="mixture",
        )
    for terms in (single, two):
        m, se = excess(terms.nats, info)
        assert abs(m) < 4.5 * se, (m, se)


def test_t10_autoregressive_mixture_bound_is_the_teacher_forced_cross_entropy():
    from tests.test_objectives import teacher_forced_ce, tiny_net

    net = tiny_net(2)
    tokens = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(0))
    grid = policies.get("autoregressive").grid(6, 6, dtype=F64)
    with torch.no_grad():
        mix = discrete_elbo(net, tokens, grid, schedules.get("cosine"), reverse="mixture")
        vec = two_stream_loss(net, tokens, schedules.get("cosine"), block_size=1, reverse="mixture")
    torch.testing.assert_close(mix, teacher_forced_ce(net, tokens), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(vec.nats, mix, rtol=1e-10, atol=1e-10)


def test_mixture_bound_of_a_network_is_finite_without_t_min():
    """On the transformer, a grid without t_min (every mixture term is at most the commit
    cross-entropy of its state); unknown reverse names are refused."""
    from tests.test_objectives import tiny_net

    net = tiny_net(1).float()
    tokens = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(2))
    grid = policies.get("synchronous").grid(5, 6)
    with torch.no_grad():
        mix = discrete_elbo(net, tokens, grid, schedules.get("linear"), reverse="mixture")
    assert torch.isfinite(mix).all() and bool((mix > 0).all())
    with pytest.raises(ConfigError, match="reverse"):
        discrete_elbo(net, tokens, grid, schedules.get("linear"), reverse="mean")
