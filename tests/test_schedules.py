"""T8: schedule boundary values, monotone log-SNR, derivatives, inverse, conditional velocity."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flowtext import schedules
from flowtext.errors import ConfigError
from flowtext.flow import conditional_path, conditional_velocity, velocity

F64 = torch.float64


def fitted_info_uniform(base="cosine", mid=-2.0, width=1.0, n_bins=32, seed=0):
    """An info-uniform schedule fitted to a logistic cross-entropy curve ``c(lambda)``."""
    s = schedules.get("info-uniform", base=base, n_bins=n_bins)
    g = torch.Generator().manual_seed(seed)
    for _ in range(20):
        t = torch.rand(2048, generator=g, dtype=torch.float64)
        lam = s.log_snr(t)
        s.update(lam, 3.0 * torch.sigmoid(-(lam - mid) / width))
        s.fit()
    return s


def fitted_to_noise(n_bins=32):
    """An info-uniform schedule fitted as a barely trained model feeds it (the ablation's
    ``evo gaussian info-uniform``): cross-entropies that fall with the noise except for one
    rise at very high noise, and no data below the smallest trained time. Normalized by that
    rise alone, the fit squeezed almost the whole time axis into its bins (``w(1/64) ~ 0.98``);
    with the cross-entropy pinned to 0 at ``u = 0`` the rise is a tenth of the curve."""
    s = schedules.get("info-uniform", n_bins=n_bins)
    lam = torch.linspace(-10, 4, 400, dtype=F64)
    s.update(lam, 4.0 + 0.05 * lam + 0.4 * torch.sigmoid(-(lam + 8.5) / 0.3))
    s.fit()
    return s


SCHEDULES = {name: schedules.get(name) for name in schedules.names()}
SCHEDULES.update(
    {
        "shifted-linear+2": schedules.get("shifted", base="linear", shift=2.0),
        "shifted-cosine-1.5": schedules.get("shifted", base="cosine", shift=-1.5),
        "shifted-vp+1": schedules.get("shifted", base="vp", shift=1.0),
        "vp-wide": schedules.get("vp", beta_min=0.5, beta_max=5.0),
        "info-uniform-fitted-cosine": fitted_info_uniform(),
        "info-uniform-fitted-linear": fitted_info_uniform("linear", mid=3.0, width=0.5),
        "info-uniform-steep-high-noise": fitted_info_uniform(mid=-9.0, width=0.3),
        "info-uniform-steep-low-noise": fitted_info_uniform("vp", mid=6.0, width=0.3),
        "info-uniform-fitted-to-noise": fitted_to_noise(),
    }
)
IDS = list(SCHEDULES)
interior = st.floats(min_value=1e-3, max_value=1 - 1e-3)


def is_vp_like(s):
    base = s.base if isinstance(s, (schedules.Shifted, schedules.InfoUniform)) else s
    return isinstance(base, schedules.VP)


def test_registry_lists_required_names():
    assert {"linear", "cosine", "vp", "shifted", "info-uniform"} <= set(schedules.names())


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="valid names: .*cosine.*linear"):
        schedules.get("cosinus")
    with pytest.raises(ConfigError, match="bad arguments"):
        schedules.get("linear", shift=3)
    with pytest.raises(ConfigError):
        schedules.get("vp", beta_min=-1.0)


@pytest.mark.parametrize("name", IDS)
def test_boundary_values(name):
    s = SCHEDULES[name]
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    a, sig = s.alpha(t), s.sigma(t)
    assert a[0] == pytest.approx(1.0, abs=1e-12) and sig[0] == pytest.approx(0.0, abs=1e-12)
    if is_vp_like(s):  # alpha(1) small but positive, variance preserving
        assert 0 < a[1] < 1
        assert a[1] ** 2 + sig[1] ** 2 == pytest.approx(1.0, abs=1e-12)
    else:
        assert a[1] == pytest.approx(0.0, abs=1e-12) and sig[1] == pytest.approx(1.0, abs=1e-12)
    assert s.log_snr(t)[0] == math.inf


@pytest.mark.parametrize("name", IDS)
@given(t1=interior, t2=interior)
def test_log_snr_strictly_decreasing(name, t1, t2):
    s = SCHEDULES[name]
    if abs(t1 - t2) < 1e-6:
        return
    lo, hi = sorted([t1, t2])
    lam = s.log_snr(torch.tensor([lo, hi], dtype=torch.float64))
    assert lam[0] > lam[1]
    assert bool((s.d_log_snr(torch.tensor([lo, hi], dtype=torch.float64)) < 0).all())


@pytest.mark.parametrize("name", IDS)
@given(ts=st.lists(interior, min_size=1, max_size=8))
def test_derivatives_equal_autograd(name, ts):
    s = SCHEDULES[name]
    t = torch.tensor(ts, dtype=torch.float64, requires_grad=True)
    for f, df in [(s.alpha, s.d_alpha), (s.sigma, s.d_sigma), (s.log_snr, s.d_log_snr)]:
        (g,) = torch.autograd.grad(f(t).sum(), t)
        torch.testing.assert_close(g, df(t.detach()), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", [n for n in IDS if n.startswith(("shifted", "info-uniform"))])
def test_warped_endpoint_derivatives_match_one_sided_differences(name):
    s = SCHEDULES[name]
    h = 1e-9  # below the width of a fitted warp's first segment in t
    for t0, sign in [(0.0, 1.0), (1.0, -1.0)]:
        t = torch.tensor([t0], dtype=torch.float64)
        # second-order one-sided difference
        a0, a1, a2 = (s.alpha(t + sign * k * h) for k in range(3))
        fd = sign * (-3 * a0 + 4 * a1 - a2) / (2 * h)
        torch.testing.assert_close(s.d_alpha(t), fd, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", IDS)
@given(ts=st.lists(st.floats(min_value=1e-4, max_value=1 - 1e-4), min_size=1, max_size=8))
def test_inverse_log_snr(name, ts):
    s = SCHEDULES[name]
    t = torch.tensor(ts, dtype=torch.float64)
    torch.testing.assert_close(s.t_from_log_snr(s.log_snr(t)), t, rtol=1e-8, atol=1e-9)
    lam = torch.linspace(-8, 8, 17, dtype=torch.float64)
    if is_vp_like(s):  # the VP log-SNR only spans [lambda(1), inf)
        lam = lam[lam > s.log_snr(torch.tensor(1.0, dtype=torch.float64))]
    torch.testing.assert_close(s.log_snr(s.t_from_log_snr(lam)), lam, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("name", IDS)
@given(seed=st.integers(0, 2**31 - 1))
def test_velocity_from_exact_x_equals_path_derivative(name, seed):
    s = SCHEDULES[name]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    t = torch.rand(2, 5, generator=g, dtype=torch.float64).clamp_min(1e-3)
    t[0, 0] = 1.0  # the noise end is included
    z = conditional_path(x, eps, t, s)
    torch.testing.assert_close(
        velocity(z, x, t, s), conditional_velocity(x, eps, t, s), rtol=1e-9, atol=1e-9
    )
    # the path's own time derivative, by autograd through alpha and sigma (interior times:
    # autograd through log(1 - t) is undefined at t = 1)
    ti = t.clamp_max(1 - 1e-3)
    tt = ti.clone().requires_grad_(True)
    (dz,) = torch.autograd.grad((conditional_path(x, eps, tt, s) * eps).sum(), tt)
    torch.testing.assert_close(dz, (conditional_velocity(x, eps, ti, s) * eps).sum(-1))


def test_velocity_is_finite_at_t_zero_for_every_schedule():
    for s in SCHEDULES.values():
        x = torch.randn(1, 3, 2, dtype=torch.float64)
        t = torch.zeros(1, 3, dtype=torch.float64)
        u = velocity(x, x, t, s)
        assert torch.isfinite(u).all()
        torch.testing.assert_close(u, s.d_alpha(t)[..., None] * x)


# ---------------------------------------------------------------------------------------------
# T11: the information-uniform schedule (theory §4c)


def logistic_ce(lam, mid, width, total=3.0):
    """A model whose expected commit cross-entropy is a logistic in the log-SNR."""
    return total * torch.sigmoid(-(lam - mid) / width)


def train_schedule(s, mid, width, *, steps=60, batch=2048, seed=0, fit_every=20, noisy=True):
    """Feed ``(lambda, ce)`` pairs as a trainer would: times uniform under the current schedule,
    per-token cross-entropies exponential around the mean (or exact), a fit every few steps."""
    g = torch.Generator().manual_seed(seed)
    for i in range(steps):
        t = torch.rand(batch, generator=g, dtype=torch.float64)
        lam = s.log_snr(t)
        noise = torch.empty_like(t).exponential_(1.0, generator=g) if noisy else 1.0
        s.update(lam, logistic_ce(lam, mid, width) * noise)
        if i % fit_every == fit_every - 1:
            s.fit()
    return s


def linearity_error(s, mid, width):
    """Max deviation of the normalized expected cross-entropy from ``t`` on a fine grid."""
    t = torch.linspace(0, 1, 401, dtype=torch.float64)
    c = logistic_ce(s.log_snr(t), mid, width)
    return ((c - c[0]) / (c[-1] - c[0]) - t).abs().max().item()


@settings(max_examples=8)
@given(
    base=st.sampled_from(["cosine", "linear", "vp"]),
    mid=st.floats(-4.0, 4.0),
    width=st.floats(0.5, 2.0),
)
def test_t11_fitted_schedule_makes_the_known_ce_curve_linear_in_t(base, mid, width):
    s = train_schedule(schedules.get("info-uniform", base=base), mid, width, steps=20, noisy=False)
    assert linearity_error(s, mid, width) < 0.02


def test_t11_with_noisy_per_token_ce(monkeypatch):
    mid, width = -3.0, 0.7  # all information at high noise: the situation of theory §4c
    before = linearity_error(schedules.get("cosine"), mid, width)
    s = train_schedule(schedules.get("info-uniform"), mid, width, steps=100)
    after = linearity_error(s, mid, width)
    assert before > 0.3 and after < 0.08, (before, after)
    # the wrong direction of the warp (F instead of F^{-1}) is detected
    monkeypatch.setattr(schedules.InfoUniform, "warp", schedules.InfoUniform.cdf)
    assert linearity_error(s, mid, width) > 0.3


def test_info_uniform_state_round_trips_and_is_deterministic(tmp_path):
    s = train_schedule(schedules.get("info-uniform", n_bins=16), 1.0, 1.0, steps=20)
    path = tmp_path / "state.pt"
    torch.save({"schedule": s.state_dict()}, path)
    state = torch.load(path, weights_only=True)["schedule"]
    r = schedules.get("info-uniform", n_bins=16)
    r.load_state_dict(state)
    t = torch.rand(50, dtype=torch.float64)
    lam = torch.linspace(-10, 10, 21, dtype=torch.float64)
    for f in ("alpha", "sigma", "d_alpha", "d_sigma", "log_snr", "d_log_snr"):
        assert torch.equal(getattr(s, f)(t), getattr(r, f)(t)), f
    assert torch.equal(s.t_from_log_snr(lam), r.t_from_log_snr(lam))
    # the same state and the same data give the same refit
    batch = torch.linspace(-6, 6, 64, dtype=torch.float64)
    for sched in (s, r):
        sched.update(batch, logistic_ce(batch, 0.0, 1.0))
        sched.fit()
    assert torch.equal(s.state_dict()["density"], r.state_dict()["density"])
    assert not torch.equal(s.state_dict()["density"], state["density"])


def test_info_uniform_frozen_for_evaluation():
    s = schedules.get("info-uniform", frozen=True)
    lam = torch.zeros(3)
    with pytest.raises(ConfigError, match="frozen"):
        s.update(lam, torch.ones(3))
    with pytest.raises(ConfigError, match="frozen"):
        s.fit()
    s.unfreeze()
    s.update(torch.tensor([-2.0, 2.0]), torch.tensor([1.0, 0.1]))
    s.fit()
    s.freeze()
    r = schedules.get("info-uniform")
    r.load_state_dict(s.state_dict())
    assert r.frozen
    with pytest.raises(ConfigError, match="frozen"):
        r.update(lam, torch.ones(3))


def test_info_uniform_bad_input():
    from flowtext.errors import CheckpointError, ShapeError

    with pytest.raises(ConfigError):
        schedules.get("info-uniform", n_bins=1)
    with pytest.raises(ConfigError):
        schedules.get("info-uniform", floor=0.0)
    s = schedules.get("info-uniform", n_bins=8)
    with pytest.raises(ConfigError, match="two bins"):
        s.fit()
    with pytest.raises(ShapeError):
        s.update(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ShapeError):
        s.update(torch.zeros(2), torch.tensor([1.0, float("nan")]))
    with pytest.raises(CheckpointError, match="other knots"):
        s.load_state_dict(schedules.get("info-uniform", n_bins=9).state_dict())
    with pytest.raises(CheckpointError):
        s.load_state_dict({"density": torch.ones(9)})


def test_info_uniform_flat_curve_keeps_the_identity_warp():
    s = schedules.get("info-uniform", base="linear", n_bins=8)
    s.update(torch.linspace(-8, 8, 100), torch.full((100,), 2.0))
    s.fit()
    t = torch.linspace(0, 1, 33, dtype=torch.float64)
    torch.testing.assert_close(s.warp(t), t, rtol=0, atol=1e-12)
    torch.testing.assert_close(s.alpha(t), 1 - t, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# The fitted warp on the grids the bounds read (float32 and float64), whatever the data


@settings(max_examples=20, deadline=None)
@given(
    ce=st.lists(st.floats(0.0, 8.0), min_size=3, max_size=12),
    train_steps=st.integers(2, 16),
    base=st.sampled_from(["cosine", "linear", "vp"]),
    floor=st.sampled_from([1e-3, 0.01, 0.5]),
)
def test_a_warp_fitted_to_any_data_keeps_the_endpoints_and_is_strictly_monotone(
    ce, train_steps, base, floor
):
    """Arbitrary per-bin cross-entropies (non-monotone, flat, spiky) fed at the times of a
    coarse training grid: ``w(0) = 0``, ``w(1) = 1`` exactly, ``F(w(t)) = t``, ``w`` strictly
    increasing and the log-SNR strictly decreasing on every 2..1024-step grid (their
    ``t_min = 1/m`` included) in float64 and float32, and ``alpha``/``sigma`` at the grid's
    smallest time those of the base at ``w(t_min)``."""
    s = schedules.get("info-uniform", base=base, n_bins=16, floor=floor)
    t_fed = torch.arange(1, train_steps, dtype=F64).repeat(len(ce)) / train_steps
    values = torch.tensor(ce, dtype=F64).repeat_interleave(max(1, train_steps - 1))[: len(t_fed)]
    s.update(s.log_snr(t_fed), values)
    if int((~torch.isnan(s.estimates()[1])).sum()) >= 2:
        s.fit()
    ends = torch.tensor([0.0, 1.0], dtype=F64)
    assert s.warp(ends).tolist() == [0.0, 1.0] and s.cdf(ends).tolist() == [0.0, 1.0]
    for m in (2, 64, 1024):
        t = torch.linspace(1, 0, m + 1, dtype=F64)[:-1]  # 1, ..., 1/m: the inner times read
        torch.testing.assert_close(s.cdf(s.warp(t)), t, rtol=0, atol=1e-12)
        for dt in (F64, torch.float32):
            w, lam = s.warp(t.to(dt)), s.log_snr(t.to(dt))
            assert bool((w[1:] < w[:-1]).all()), (m, dt)
            assert bool((lam[1:] > lam[:-1]).all()), (m, dt)
        tm = t[-1:]
        torch.testing.assert_close(s.alpha(tm), s.base.alpha(s.warp(tm)), rtol=0, atol=0)
        torch.testing.assert_close(s.sigma(tm), s.base.sigma(s.warp(tm)), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Degenerate data: no warp where the estimates locate no rise


def fed_flat(rare, *, steps=60, seed=0):
    """Fed as a trainer would, by a model whose cross-entropy does not depend on the noise:
    per-token values exponential around 3 nats, or (``rare``) 0 but for one token in 500 at
    5 nats, so the noise of the bins' averages is as large as their level; a fit every 20
    steps."""
    s = schedules.get("info-uniform")
    g = torch.Generator().manual_seed(seed)
    for i in range(steps):
        t = torch.rand(2048, generator=g, dtype=F64)
        if rare:
            ce = 5.0 * (torch.rand(t.shape, generator=g, dtype=F64) < 0.002)
        else:
            ce = 3.0 * torch.empty_like(t).exponential_(1.0, generator=g)
        s.update(s.log_snr(t), ce)
        if i % 20 == 19:
            s.fit()
    return s


@pytest.mark.parametrize("rare", [False, True], ids=["exponential", "rare"])
@pytest.mark.parametrize("seed", [0, 1])
def test_a_noisy_flat_curve_gives_a_near_identity_warp(rare, seed, monkeypatch):
    t = torch.linspace(0, 1, 257, dtype=F64)
    s = fed_flat(rare, seed=seed)
    assert (s.warp(t) - t).abs().max() < 0.02
    assert s.warp(torch.tensor([1 / 64], dtype=F64)) < 0.03
    if rare:  # here the pin does not help: the significance gate is what keeps the identity
        monkeypatch.setattr(schedules.InfoUniform, "NOISE_Z", 1e-9)
        assert (fed_flat(rare, seed=seed).warp(t) - t).abs().max() > 0.1


def test_a_rise_at_very_high_noise_over_a_flat_curve_keeps_small_times_small():
    """The ablation's degenerate warp: the pin to 0 at ``u = 0`` makes the rise at very high
    noise a tenth of the curve, so ``w(1/64)`` stays near ``1/64`` (it was 0.978); the same rise
    from 0 is all the information there is, and the warp squeezes the axis into it."""
    s = fitted_to_noise()
    assert s.warp(torch.tensor([1 / 64], dtype=F64)) < 0.03
    alone = schedules.get("info-uniform", n_bins=32)
    lam = torch.linspace(-10, 4, 400, dtype=F64)
    alone.update(lam, 0.4 * torch.sigmoid(-(lam + 8.5) / 0.3))
    alone.fit()
    assert alone.warp(torch.tensor([1 / 64], dtype=F64)) > 0.5
