"""T3 and the grid contract of static policies."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flowtext import policies
from flowtext.errors import ConfigError

STATIC = {
    "synchronous": {},
    "autoregressive": {},
    "block-1": {"size": 1},
    "block-3": {"size": 3},
    "diagonal-0.3": {"width": 0.3},
    "diagonal-2": {"width": 2.0},
}


def build(key):
    return policies.get(key.split("-")[0], **STATIC[key])


def valid_steps(policy, length, mult):
    if isinstance(policy, policies.Block):
        return policy.n_blocks(length) * mult
    return mult


def built(key, length, mult):
    """The policy of ``key``, a valid step count for ``length`` and its float64 grid."""
    policy = build(key)
    steps = valid_steps(policy, length, mult)
    return policy, steps, policy.grid(length, steps, dtype=torch.float64)


def test_registry_has_required_policies():
    assert {"synchronous", "autoregressive", "block", "diagonal"} <= set(policies.names())
    assert all(
        policies.get(n, **({"size": 2} if n == "block" else {})).static
        for n in ["synchronous", "autoregressive", "block", "diagonal"]
    )


@pytest.mark.parametrize("key", list(STATIC))
@given(length=st.integers(1, 24), mult=st.integers(1, 5))
def test_grid_contract(key, length, mult):
    _, steps, g = built(key, length, mult)
    assert g.shape == (steps + 1, length)
    assert bool((g[0] == 1).all()) and bool((g[-1] == 0).all())
    assert bool(((g >= 0) & (g <= 1)).all())
    assert bool((g[1:] <= g[:-1]).all()), "every column must be non-increasing"


@given(length=st.integers(1, 20), mult=st.integers(1, 4))
def test_autoregressive_moves_one_token_at_a_time_left_to_right(length, mult):
    g = policies.get("autoregressive").grid(length, length * mult, dtype=torch.float64)
    moving = g[1:] != g[:-1]  # [K, L]
    assert bool((moving.sum(1) == 1).all())
    who = moving.float().argmax(1)
    assert bool((who[1:] >= who[:-1]).all())
    assert who.tolist() == [k // mult for k in range(length * mult)]
    # earlier tokens committed, later ones pure noise while token k moves
    for k in range(length * mult):
        i = k // mult
        assert bool((g[k + 1, :i] == 0).all()) and bool((g[k, i + 1 :] == 1).all())


@given(length=st.integers(1, 20), mult=st.integers(1, 4))
def test_block_limits_are_ar_and_synchronous(length, mult):
    ar = policies.get("autoregressive").grid(length, length * mult, dtype=torch.float64)
    assert torch.equal(
        policies.get("block", size=1).grid(length, length * mult, dtype=torch.float64), ar
    )
    sync = policies.get("synchronous").grid(length, mult * 3, dtype=torch.float64)
    for size in (length, length + 5):
        assert torch.equal(
            policies.get("block", size=size).grid(length, mult * 3, dtype=torch.float64), sync
        )


@given(length=st.integers(1, 16))
def test_diagonal_tends_to_autoregressive_as_width_shrinks(length):
    ar = policies.get("autoregressive").grid(length, length, dtype=torch.float64)
    widths = [1.0, 0.3, 0.1, 0.03, 0.01, 0.25 / length]
    dists = [
        (policies.get("diagonal", width=w).grid(length, length, dtype=torch.float64) - ar)
        .abs()
        .max()
        .item()
        for w in widths
    ]
    assert all(a >= b - 1e-12 for a, b in zip(dists, dists[1:]))
    assert dists[-1] == 0.0


@given(length=st.integers(2, 16), steps=st.integers(1, 12))
def test_diagonal_flattens_towards_synchronous(length, steps):
    sync = policies.get("synchronous").grid(length, steps, dtype=torch.float64)
    dists = [
        (policies.get("diagonal", width=w).grid(length, steps, dtype=torch.float64) - sync)
        .abs()
        .max()
        .item()
        for w in (1.0, 10.0, 100.0, 1000.0)
    ]
    assert dists[-1] <= 2.0 / 1000.0
    assert all(d <= 2.0 / w + 1e-12 for d, w in zip(dists, (1.0, 10.0, 100.0, 1000.0)))


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ConfigError, match="steps"):
        policies.get("synchronous").grid(4, 0)
    with pytest.raises(ConfigError, match="length"):
        policies.get("synchronous").grid(0, 3)
    with pytest.raises(ConfigError, match="block size"):
        policies.get("block", size=0)
    with pytest.raises(ConfigError, match="width"):
        policies.get("diagonal", width=0.0)
    with pytest.raises(ConfigError, match="width"):
        policies.get("diagonal", width=-1)
    with pytest.raises(ConfigError, match="multiple of 5"):
        policies.get("autoregressive").grid(5, 7)
    with pytest.raises(ConfigError, match="multiple of 2"):
        policies.get("block", size=3).grid(5, 3)
    with pytest.raises(ValueError, match="valid names"):
        policies.get("zigzag")
    with pytest.raises(ConfigError):
        policies.get("autoregressive", size=2)


# ------------------------------------------------------------- the one awake / next_times interface
def _every_policy():
    kwargs = {"block": {"size": 2}}
    return [policies.get(n, **kwargs.get(n, {})) for n in policies.names()]


def _random_view(policy, seed, length=8, steps=8):
    """A mid-decoding view: some tokens committed, some mid-flight, some at t = 1."""
    g = torch.Generator().manual_seed(seed)
    b = 3
    t = torch.rand(b, length, generator=g, dtype=torch.float64)
    t = torch.where(t < 0.3, 0.0, torch.where(t > 0.7, 1.0, t))
    live = t > 0
    step = int(torch.randint(0, steps, (), generator=g))
    plan = policy.plan(length, steps, dtype=torch.float64, device=None)
    view = policies.PolicyView(t, live, step, steps, plan)
    awake = policy.awake(view)
    n = int(awake.sum(1).max())
    index = torch.argsort((~awake).to(torch.int8), dim=1, stable=True)[:, :n]
    ev = policies.Evaluation(
        logits=3 * torch.randn(b, n, 11, generator=g, dtype=torch.float64),
        difficulty=torch.rand(b, n, generator=g, dtype=torch.float64),
        index=index,
        valid=torch.gather(awake, 1, index),
    )
    return policies.PolicyView(t, live, step, steps, plan, ev), awake


@pytest.mark.parametrize("policy", _every_policy(), ids=policies.names())
@given(seed=st.integers(0, 10_000))
def test_every_policy_moves_only_awake_tokens_and_never_back(policy, seed):
    view, awake = _random_view(policy, seed)
    assert not bool((awake & ~view.live).any())
    nxt = policy.next_times(view)
    assert nxt.shape == view.t.shape
    assert bool((nxt <= view.t).all()) and bool((nxt >= 0).all())
    assert torch.equal(nxt[~awake], view.t[~awake])


@pytest.mark.parametrize("key", list(STATIC))
@given(length=st.integers(1, 12), mult=st.integers(1, 3))
def test_static_next_times_read_the_grid(key, length, mult):
    policy, steps, grid = built(key, length, mult)
    plan = policy.plan(length, steps, dtype=torch.float64, device=None)
    assert torch.equal(plan, grid)
    t = grid[0][None].clone()
    for k in range(steps):  # following next_times from t = 1 walks the grid exactly
        view = policies.PolicyView(t, t > 0, k, steps, plan if k % 2 else None)
        awake = policy.awake(view)
        t = policy.next_times(view)
        assert torch.equal(t[0], grid[k + 1])
        moved = grid[k + 1] < grid[k]
        assert bool((awake[0] | ~moved).all())  # every moving token is awake


def test_adaptive_needs_the_evaluation():
    pol = policies.get("adaptive", window=2)
    t = torch.ones(1, 4, dtype=torch.float64)
    view = policies.PolicyView(t, t > 0, 0, 4)
    assert pol.awake(view).tolist() == [[True, True, False, False]]
    with pytest.raises(ConfigError, match="evaluation"):
        pol.next_times(view)
    with pytest.raises(ConfigError, match="evaluation"):
        view.spread(torch.zeros(1, 2))


def test_spread_scatters_back_to_positions():
    ev = policies.Evaluation(
        logits=torch.zeros(2, 2, 3),
        difficulty=torch.zeros(2, 2),
        index=torch.tensor([[1, 3], [0, 0]]),
        valid=torch.tensor([[True, True], [True, False]]),
    )
    view = policies.PolicyView(torch.ones(2, 4), torch.ones(2, 4, dtype=torch.bool), 0, 1, None, ev)
    out = view.spread(torch.tensor([[5.0, 7.0], [9.0, 11.0]]), fill=-1.0)
    assert out.tolist() == [[-1, 5, -1, 7], [9, -1, -1, -1]]
