"""T1 (agreement with torchdiffeq), T6 (solver orders) and the integrate API."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torchdiffeq import odeint

from flowtext import policies, schedules, solvers
from flowtext.errors import ConfigError, ShapeError, TimeRangeError
from flowtext.flow import Field, Prediction
from flowtext.solvers import integrate

from ._toyutil import make_toy, random_monotone_grid, transport_error

ODE_SOLVERS = [n for n in solvers.names() if solvers.get(n).order is not None]
SMOOTH = ["linear", "cosine"]  # finite sigma'(0): the field is smooth up to t = 0


def test_registry():
    assert {"euler", "midpoint", "heun", "rk4", "ancestral", "torchdiffeq"} <= set(solvers.names())
    assert {solvers.get(n).order for n in ["euler", "midpoint", "heun", "rk4"]} == {1, 2, 4}
    with pytest.raises(ValueError, match="valid names"):
        solvers.get("rk5")
    with pytest.raises(ConfigError, match="torchdiffeq method"):
        solvers.get("torchdiffeq", method="nope")


@pytest.mark.parametrize("schedule", SMOOTH + ["vp"])
@pytest.mark.parametrize("method", ["euler", "midpoint"])
@given(seed=st.integers(0, 10_000), steps=st.integers(1, 12))
def test_t1_synchronous_equals_torchdiffeq_on_same_grid(schedule, method, seed, steps):
    toy = make_toy(3, 2, seed)
    sched = schedules.get(schedule)
    t_end = 0.0 if schedule != "vp" else 1e-3
    grid = policies.get("synchronous").grid(3, steps, dtype=torch.float64) * (1 - t_end) + t_end
    z = torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ours = integrate(toy.denoiser(sched), z, grid, sched, method, return_trajectory=True)
    field = Field(toy.denoiser(sched), sched)
    ref = odeint(lambda t, y: field.velocity(y, t.expand(4, 3)), z, grid[:, 0], method=method)
    torch.testing.assert_close(ours.trajectory, ref, rtol=1e-10, atol=1e-10)
    adapter = integrate(
        toy.denoiser(sched), z, grid, sched, solvers.get("torchdiffeq", method=method)
    )
    torch.testing.assert_close(adapter.z, ours.z, rtol=1e-10, atol=1e-10)


@given(seed=st.integers(0, 10_000), steps=st.integers(2, 10))
def test_t1_rk4_agrees_with_torchdiffeq_rk4_within_method_error(seed, steps):
    toy = make_toy(3, 2, seed)
    sched = schedules.get("linear")
    grid = policies.get("synchronous").grid(3, steps, dtype=torch.float64)
    z = torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ours = integrate(toy.denoiser(sched), z, grid, sched, "rk4").z
    td = integrate(toy.denoiser(sched), z, grid, sched, solvers.get("torchdiffeq", method="rk4")).z
    fine = policies.get("synchronous").grid(3, 400, dtype=torch.float64)
    exact = integrate(toy.denoiser(sched), z, fine, sched, "rk4").z
    err = (ours - exact).abs().max() + (td - exact).abs().max()
    assert (ours - td).abs().max() <= 2 * err + 1e-12


def test_dopri5_adapter_matches_fine_rk4():
    toy = make_toy(4, 2, 3)
    sched = schedules.get("cosine")
    z = torch.randn(5, 4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = policies.get("synchronous").grid(4, 4, dtype=torch.float64)
    res = integrate(
        toy.denoiser(sched), z, grid, sched, solvers.get("torchdiffeq"), return_trajectory=True
    )
    fine = integrate(
        toy.denoiser(sched),
        z,
        policies.get("synchronous").grid(4, 256, dtype=torch.float64),
        sched,
        "rk4",
    )
    assert res.trajectory.shape == (5, 5, 4, 2)
    torch.testing.assert_close(res.z, fine.z, rtol=1e-4, atol=2e-5)


def test_torchdiffeq_rejects_per_token_grids():
    toy = make_toy(4, 2, 0)
    grid = policies.get("autoregressive").grid(4, 4, dtype=torch.float64)
    with pytest.raises(ConfigError, match="share one clock"):
        integrate(
            toy.denoiser("linear"),
            torch.zeros(1, 4, 2, dtype=torch.float64),
            grid,
            "linear",
            "torchdiffeq",
        )


def observed_order(errors):
    return [math.log2(a / b) for a, b in zip(errors, errors[1:])]


# step counts in the asymptotic range of each order, for L = 4
STEPS = {1: (64, 128, 256), 2: (16, 32, 64), 4: (8, 16, 32)}


@pytest.mark.parametrize("schedule", SMOOTH)
@pytest.mark.parametrize("solver", ODE_SOLVERS)
@pytest.mark.parametrize("policy", ["synchronous", "block-2", "autoregressive"])
def test_t6_solver_order_on_policies(schedule, solver, policy):
    p = solvers.get(solver).order
    toy = make_toy(4, 2, 1)
    pol = policies.get("block", size=2) if policy == "block-2" else policies.get(policy)
    errs = [
        transport_error(toy, pol.grid(4, k, dtype=torch.float64), schedule, solver)
        for k in STEPS[p]
    ]
    orders = observed_order(errs)
    assert orders[-1] >= p - 0.3, (errs, orders)
    assert orders[-1] <= p + 1.5, (errs, orders)  # not a lucky cancellation


@pytest.mark.parametrize("solver", ODE_SOLVERS)
@given(seed=st.integers(0, 10_000))
def test_t6_order_on_random_piecewise_linear_curves(solver, seed):
    p = solvers.get(solver).order
    toy = make_toy(3, 2, seed % 7)
    gen = lambda: torch.Generator().manual_seed(seed)  # noqa: E731
    base = {1: 24, 2: 6, 4: 3}[p]
    errs = [
        transport_error(toy, random_monotone_grid(3, 4, base * r, gen()), "linear", solver)
        for r in (2, 4, 8, 16)
    ]
    # big jumps of the coarse curve make the first refinements pre-asymptotic
    orders = observed_order(errs)
    # (the observed order zigzags around p on such grids: judge its mean over three halvings)
    assert sum(orders) / len(orders) >= p - 0.5 and min(orders) >= 0.6 * p, (errs, orders)


def test_frozen_tokens_are_exactly_unchanged():
    toy = make_toy(4, 2, 0)
    z = torch.randn(3, 4, 2, dtype=torch.float64)
    t_now = torch.tensor([[0.0, 0.5, 1.0, 0.3]] * 3, dtype=torch.float64)
    t_next = torch.tensor([[0.0, 0.25, 1.0, 0.3]] * 3, dtype=torch.float64)
    field = Field(toy.denoiser("linear"), schedules.get("linear"))
    for name in solvers.names():
        if name == "torchdiffeq" or solvers.get(name).categorical:
            continue
        noise = solvers.GeneratorNoise(torch.Generator().manual_seed(0))
        out = solvers.get(name).step(field, z, t_now, t_next, noise=noise)
        frozen = (t_now == t_next)[..., None].expand_as(z)
        assert torch.equal(out[frozen], z[frozen]), name
        assert not torch.equal(out[:, 1], z[:, 1]), name


def test_partial_grids_compose():
    toy = make_toy(4, 2, 2)
    z = torch.randn(2, 4, 2, dtype=torch.float64)
    full = policies.get("block", size=2).grid(4, 8, dtype=torch.float64)
    whole = integrate(toy.denoiser("cosine"), z, full, "cosine", "heun").z
    half = integrate(toy.denoiser("cosine"), z, full[:5], "cosine", "heun").z
    rest = integrate(toy.denoiser("cosine"), half, full[4:], "cosine", "heun").z
    torch.testing.assert_close(rest, whole, rtol=0, atol=0)


def test_ancestral_reaches_data_and_is_seeded():
    toy = make_toy(3, 2, 0)
    z = torch.randn(2, 3, 2, dtype=torch.float64)
    grid = policies.get("synchronous").grid(3, 5, dtype=torch.float64)

    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        return integrate(toy.denoiser("linear"), z, grid, "linear", "ancestral", generator=gen).z

    torch.testing.assert_close(run(1), run(1), rtol=0, atol=0)
    assert not torch.equal(run(1), run(2))


def test_integrate_bad_input():
    toy = make_toy(3, 2, 0)
    den = toy.denoiser("linear")
    z = torch.zeros(2, 3, 2, dtype=torch.float64)
    good = policies.get("synchronous").grid(3, 4, dtype=torch.float64)
    with pytest.raises(ShapeError, match="z must be"):
        integrate(den, z[0], good, "linear")
    with pytest.raises(ShapeError, match="times must be"):
        integrate(den, z, good[:, :2], "linear")
    with pytest.raises(TimeRangeError, match=r"\[0, 1\]"):
        integrate(den, z, good * 2, "linear")
    with pytest.raises(TimeRangeError, match="non-increasing"):
        integrate(den, z, good.flip(0), "linear")
    with pytest.raises(ShapeError, match="denoiser returned"):
        integrate(lambda z, t: z[..., :1], z, good, "linear")
    with pytest.raises(ValueError, match="valid names"):
        integrate(den, z, good, "linear", "rk45")


# ------------------------------------------------------------- noise sources and start predictions
STEP_SOLVERS = [
    n for n in solvers.names() if solvers.get(n).per_token and not solvers.get(n).categorical
]


@pytest.mark.parametrize("name", STEP_SOLVERS)
def test_a_given_start_prediction_is_the_first_evaluation(name):
    """step(..., start=field.predict(z, t_now)) equals step(...), with one evaluation fewer."""
    toy = make_toy(4, 2, 3)
    calls = []

    def den(z, t):
        calls.append(1)
        return toy.x0_hat(z, t, "cosine")

    field = Field(den, schedules.get("cosine"))
    z = torch.randn(2, 4, 2, dtype=torch.float64)
    t_now = torch.tensor([[1.0, 0.6, 0.3, 0.0]] * 2, dtype=torch.float64)
    t_next = torch.tensor([[0.8, 0.6, 0.1, 0.0]] * 2, dtype=torch.float64)

    def run(start):
        noise = solvers.GeneratorNoise(torch.Generator().manual_seed(4))
        calls.clear()
        out = solvers.get(name).step(field, z, t_now, t_next, noise=noise, start=start)
        return out, len(calls)

    plain, n_plain = run(None)
    given, n_given = run(field.predict(z, t_now))
    assert torch.equal(plain, given)
    assert n_given == n_plain - 1


def test_categorical_fields_carry_logits_and_table():
    table = torch.randn(5, 3, dtype=torch.float64)

    def predictor(z, t):
        logits = z @ table.T
        return Prediction(torch.softmax(logits, -1) @ table, logits, table)

    field = Field.categorical(predictor, schedules.get("cosine"))
    z = torch.randn(2, 4, 3, dtype=torch.float64)
    t = torch.full((2, 4), 0.5, dtype=torch.float64)
    pred = field.predict(z, t)
    assert pred.logits.shape == (2, 4, 5) and pred.table is table
    torch.testing.assert_close(field.x0_hat(z, t), pred.x0_hat, rtol=0, atol=0)
    bad = Field.categorical(lambda z, t: Prediction(z[..., :1]), schedules.get("cosine"))
    with pytest.raises(ShapeError, match="denoiser returned"):
        bad.velocity(z, t)


def test_generator_noise_is_seeded_and_respects_the_support():
    probs = torch.tensor([[[0.0, 0.5, 0.5], [1.0, 0.0, 0.0]]]).expand(200, 2, 3)
    where = torch.ones(200, 2, dtype=torch.bool)

    def draw(seed):
        return solvers.GeneratorNoise(torch.Generator().manual_seed(seed)).categorical(probs, where)

    ids = draw(0)
    assert ids.shape == (200, 2) and torch.equal(ids, draw(0))
    assert bool((ids[:, 0] > 0).all()) and bool((ids[:, 1] == 0).all())
    assert 50 < int((ids[:, 0] == 1).sum()) < 150
    like = torch.zeros(3, 2, 4)
    eps = solvers.GeneratorNoise(torch.Generator().manual_seed(1)).normal(like, where[:3])
    assert eps.shape == like.shape and eps.dtype == like.dtype and float(eps.std()) > 0.5


def test_decoding_refuses_one_clock_solvers_only():
    assert not solvers.get("torchdiffeq").per_token
    assert all(solvers.get(n).per_token for n in ["euler", "midpoint", "heun", "rk4", "ancestral"])


# ------------------------------------------------------------------------ the ancestral-mixture step
def _categorical_field(calls=None):
    table = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def predictor(z, t):
        if calls is not None:
            calls.append(1)
        logits = z @ table.T + t[..., None]
        return Prediction(torch.softmax(logits, -1) @ table, logits, table)

    return Field.categorical(predictor, schedules.get("cosine")), table


def test_ancestral_mixture_freezes_commits_and_reuses_the_start():
    calls = []
    field, table = _categorical_field(calls)
    z = torch.randn(2, 4, 3, dtype=torch.float64)
    t_now = torch.tensor([[1.0, 0.6, 0.3, 0.5]] * 2, dtype=torch.float64)
    t_next = torch.tensor([[0.8, 0.6, 0.0, 0.2]] * 2, dtype=torch.float64)
    mix = solvers.get("ancestral-mixture")

    def run(start, seed=4):
        calls.clear()
        noise = solvers.GeneratorNoise(torch.Generator().manual_seed(seed))
        return mix.step(field, z, t_now, t_next, noise=noise, start=start), len(calls)

    (plain, n_plain), (given, n_given) = run(None), run(field.predict(z, t_now))
    assert torch.equal(plain, given) and n_given == n_plain - 1
    assert torch.equal(plain[:, 1], z[:, 1])  # frozen token
    dist = torch.cdist(plain[:, 2], table[None].expand(2, -1, -1))
    assert bool((dist.amin(-1) == 0).all())  # reaching 0 commits to an embedding exactly
    assert not torch.equal(run(None, seed=5)[0], plain)
    with pytest.raises(ConfigError, match="categorical field"):
        toy = make_toy(4, 3, 0)
        mix.step(Field(toy.denoiser("cosine"), schedules.get("cosine")), z, t_now, t_next)
    with pytest.raises(ConfigError, match="temperature"):
        solvers.get("ancestral-mixture", temperature=-1.0)


def test_ancestral_mixture_one_jump_draws_the_readout_law():
    """A 1 -> 0 jump of one token lands on e_v with v ~ softmax(logits) (chi-square check)."""
    field, table = _categorical_field()
    n = 4000
    z = torch.randn(1, 1, 3, dtype=torch.float64).expand(n, 1, 3)
    one, zero = torch.ones(n, 1, dtype=torch.float64), torch.zeros(n, 1, dtype=torch.float64)
    noise = solvers.GeneratorNoise(torch.Generator().manual_seed(1))
    out = solvers.get("ancestral-mixture").step(field, z, one, zero, noise=noise)
    ids = torch.cdist(out[:, 0], table).argmin(-1)
    counts = torch.bincount(ids, minlength=5).double()
    p = torch.softmax(field.predict(z[:1], one[:1]).logits[0, 0], -1)
    chi2 = float(((counts - n * p) ** 2 / (n * p)).sum())
    assert chi2 < 20.5  # 4 degrees of freedom: p < 0.0005 of failing by chance
