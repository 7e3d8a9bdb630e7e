"""T8: schedule boundary values, monotone log-SNR, derivatives, inverse, conditional velocity."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flowtext import schedules
from flowtext.errors import ConfigError
from flowtext.flow import conditional_path, conditional_velocity, velocity

SCHEDULES = {name: schedules.get(name) for name in schedules.names()}
SCHEDULES.update(
    {
        "shifted-linear+2": schedules.get("shifted", base="linear", shift=2.0),
        "shifted-cosine-1.5": schedules.get("shifted", base="cosine", shift=-1.5),
        "shifted-vp+1": schedules.get("shifted", base="vp", shift=1.0),
        "vp-wide": schedules.get("vp", beta_min=0.5, beta_max=5.0),
    }
)
IDS = list(SCHEDULES)
interior = st.floats(min_value=1e-3, max_value=1 - 1e-3)


def is_vp_like(s):
    base = s.base if isinstance(s, schedules.Shifted) else s
    return isinstance(base, schedules.VP)


def test_registry_lists_required_names():
    assert {"linear", "cosine", "vp", "shifted"} <= set(schedules.names())


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


@pytest.mark.parametrize("name", [n for n in IDS if n.startswith("shifted")])
def test_shifted_endpoint_derivatives_match_one_sided_differences(name):
    s = SCHEDULES[name]
    h = 1e-7
    for t0, sign in [(0.0, 1.0), (1.0, -1.0)]:
        t = torch.tensor([t0], dtype=torch.float64)
        fd = sign * (s.alpha(t + sign * h) - s.alpha(t)) / h
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
