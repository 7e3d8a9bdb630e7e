"""T4 (ELBO under AR = teacher-forced CE) and T5 (synchronous K-step ELBO -> continuous ELBO)."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from flowtext import policies, schedules
from flowtext.attention import LIVE
from flowtext.errors import ConfigError
from flowtext.objectives import (
    autoregressive_loss,
    block_grid,
    continuous_elbo,
    discrete_elbo,
    gaussian_kl_weight,
    next_token_readout,
    single_stream_loss,
    two_stream_loss,
    with_t_min,
)
from flowtext.solvers import posterior

from ._nets import perturbed_net


def tiny_net(seed, vocab=11, max_len=16):
    return perturbed_net(seed, 0.05, vocab_size=vocab, max_len=max_len)


def ar_loop(net, tokens):
    """Independent AR loop: one state per token, written against the network API only.

    Before token ``i`` commits, tokens ``0..i-1`` are committed in position order and the rest
    sit at ``t = 1``. Token 0 reads its own (null-query) output; token ``i > 0`` reads the logits
    of committed token ``i - 1`` (the next-token readout).
    """
    b, n = tokens.shape
    x = net.embed(tokens)
    out = torch.zeros(b, n, dtype=x.dtype)
    for i in range(n):
        t = torch.ones(b, n, dtype=x.dtype)
        t[:, :i] = 0.0
        o = torch.full((b, n), LIVE, dtype=torch.long)
        o[:, :i] = 7 * torch.arange(i) + 3  # any increasing orders
        z = torch.where((t == 0)[..., None], x, torch.randn_like(x))
        logits = net(z, t, o).logits[:, max(i - 1, 0)]
        out[:, i] = F.cross_entropy(logits, tokens[:, i], reduction="none")
    return out


def teacher_forced_ce(net, tokens):
    """Teacher-forced CE of one causal stream (a plain GPT's loss) plus the null query."""
    b, n = tokens.shape
    x = net.embed(tokens)
    pos = torch.arange(n).expand(b, n)
    stream = net(x, torch.zeros(b, n, dtype=x.dtype), pos, pos).logits
    null = net(
        torch.zeros(1, 1, x.shape[-1], dtype=x.dtype),
        torch.ones(1, 1, dtype=x.dtype),
        torch.zeros(1, 1, dtype=torch.long),
        torch.zeros(1, 1, dtype=torch.long),
    ).logits
    logits = torch.cat([null.expand(b, 1, -1), stream[:, :-1]], 1)
    return F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none")


@given(seed=st.integers(0, 1000), length=st.integers(1, 9), batch=st.integers(1, 3))
@settings(max_examples=10)
def test_t4_elbo_under_autoregressive_is_teacher_forced_ce(seed, length, batch):
    net = tiny_net(seed)
    tokens = torch.randint(0, 11, (batch, length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = teacher_forced_ce(net, tokens)
        loop = ar_loop(net, tokens)
        grid = policies.get("autoregressive").grid(length, length, dtype=torch.float64)
        sequential = discrete_elbo(net, tokens, grid, net_schedule := schedules.get("cosine"))
        two = two_stream_loss(net, tokens, net_schedule, block_size=1)  # noisy stream kept
        one = two_stream_loss(net, tokens, net_schedule, block_size=1, difficulty=False)
        direct = autoregressive_loss(net, tokens, net_schedule)
    torch.testing.assert_close(loop, ref, rtol=1e-10, atol=1e-10)
    for got in (sequential, two.nats, one.nats, direct.nats, direct.ar_nats):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    assert two.difficulty.shape == tokens.shape
    with pytest.raises(ConfigError, match="difficulty"):
        _ = one.difficulty


def test_t4_fails_for_the_old_readout():
    """The AR bound is not the token's own output any more: the test above can fail."""
    net = tiny_net(1)
    tokens = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        x = net.embed(tokens)
        pos = torch.arange(6).expand(2, 6)
        own = net(x, torch.zeros(2, 6, dtype=x.dtype), pos, pos).logits  # reads x_i itself
        bad = F.cross_entropy(own.transpose(1, 2), tokens, reduction="none")
        good = autoregressive_loss(net, tokens, schedules.get("cosine")).nats
    assert float((bad[:, 1:] - good[:, 1:]).abs().max()) > 1e-3


@pytest.mark.parametrize("name", schedules.names())
@given(seed=st.integers(0, 10_000))
def test_t5_kl_weight_equals_direct_gaussian_kl(name, seed):
    sched = schedules.get(name)
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(3, 4, generator=g, dtype=torch.float64) * 0.98 + 0.02
    s = t * torch.rand(3, 4, generator=g, dtype=torch.float64).clamp(0.05, 0.95)
    x, x_hat, z_t = (torch.randn(3, 4, 5, generator=g, dtype=torch.float64) for _ in range(3))
    mu1, std = posterior(z_t, x, t, s, sched)
    mu2, _ = posterior(z_t, x_hat, t, s, sched)
    direct = ((mu1 - mu2) ** 2).sum(-1) / (2 * std[..., 0] ** 2)
    weight = gaussian_kl_weight(t, s, sched) * ((x - x_hat) ** 2).sum(-1)
    torch.testing.assert_close(weight, direct, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_t5_synchronous_elbo_converges_to_continuous_like_one_over_k(schedule):
    net = tiny_net(3)
    sched = schedules.get(schedule)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 11, (2, 6), generator=g)
    eps = torch.randn(2, 6, 8, generator=g, dtype=torch.float64)
    t_min = 0.1
    with torch.no_grad():
        cont = continuous_elbo(net, tokens, sched, t_min=t_min, eps=eps, n_points=1024).sum()
        errs = []
        ks = (16, 32, 64, 128, 256)
        for k in ks:
            grid = block_grid(6, 6, k, t_min)
            assert grid[-2].min().item() == pytest.approx(t_min)
            errs.append(abs(discrete_elbo(net, tokens, grid, sched, eps=eps).sum() - cont).item())
    # least-squares slope of log(error) against log(K): about -1
    lk = torch.log(torch.tensor(ks, dtype=torch.float64))
    le = torch.log(torch.tensor(errs, dtype=torch.float64))
    slope = (((lk - lk.mean()) * (le - le.mean())).sum() / ((lk - lk.mean()) ** 2).sum()).item()
    assert -1.5 < slope < -0.75, (errs, slope)
    assert errs[-1] < errs[0] / 8, errs


def test_t5_detects_wrong_weights(monkeypatch):
    """The convergence check fails when the Gaussian weights are off (here, doubled)."""
    import flowtext.objectives as obj

    net = tiny_net(3)
    sched = schedules.get("cosine")
    tokens = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(0))
    eps = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        cont = continuous_elbo(net, tokens, sched, t_min=0.1, eps=eps, n_points=512).sum()
        good = discrete_elbo(net, tokens, block_grid(6, 6, 64, 0.1), sched, eps=eps).sum()
        monkeypatch.setattr(obj, "gaussian_kl_weight", lambda t, s, sc: sc.snr(s) - sc.snr(t))
        bad = discrete_elbo(net, tokens, block_grid(6, 6, 64, 0.1), sched, eps=eps).sum()
    assert abs(good - cont) < 0.05 * abs(bad - cont)


@given(seed=st.integers(0, 1000))
@settings(max_examples=5)
def test_estimators_are_unbiased_for_the_discrete_bound(seed):
    """Averages of the one-pass estimators approach the exact K-step bound."""
    net = tiny_net(seed % 4)
    sched = schedules.get("cosine")
    tokens = torch.randint(0, 11, (1, 4), generator=torch.Generator().manual_seed(seed)).expand(
        64, -1
    )
    grid = block_grid(4, 2, 3)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        exact = torch.stack(
            [discrete_elbo(net, tokens[:1], grid, sched, generator=g).sum() for _ in range(64)]
        )
        single = torch.stack(
            [
                single_stream_loss(net, tokens, grid, sched, generator=g).nats.sum(1).mean()
                for _ in range(8)
            ]
        )
        two = torch.stack(
            [
                two_stream_loss(net, tokens, sched, block_size=2, steps_per_block=3, generator=g)
                .nats.sum(1)
                .mean()
                for _ in range(8)
            ]
        )
    m = exact.mean()
    tol = 6 * exact.std() / math.sqrt(64) + 0.05 * m.abs()
    assert abs(single.mean() - m) < tol + 6 * single.std() / math.sqrt(8)
    assert abs(two.mean() - m) < tol + 6 * two.std() / math.sqrt(8)


def test_with_t_min_keeps_ar_columns_and_moves_the_last_positive_time():
    ar = policies.get("autoregressive").grid(5, 5, dtype=torch.float64)
    assert torch.equal(with_t_min(ar, 0.01), ar)
    g = with_t_min(policies.get("synchronous").grid(3, 10, dtype=torch.float64), 0.02)
    assert (
        g[-2].min().item() == pytest.approx(0.02)
        and bool((g[-1] == 0).all())
        and bool((g[0] == 1).all())
    )
    assert bool((g[1:] <= g[:-1]).all())


def test_one_block_skips_the_clean_stream_without_changing_the_loss():
    """With one block no clean key is visible; the single-stream shortcut must equal 2L."""
    from flowtext.attention import two_stream_layout

    net = tiny_net(5)
    sched = schedules.get("cosine")
    tokens = torch.randint(0, 11, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        short = two_stream_loss(
            net,
            tokens,
            sched,
            block_size=7,
            steps_per_block=5,
            generator=torch.Generator().manual_seed(3),
        )
        # the same draw through the full 2L layout
        g = torch.Generator().manual_seed(3)
        from flowtext.objectives import stratified_uniform

        j = (stratified_uniform(2, generator=g) * 5).long().clamp_max(4) + 1
        tau = block_grid(1, 1, 5)[:, 0]
        t_prev = tau[j - 1][:, None].expand(2, 7).double()
        eps = torch.randn(2, 7, 8, generator=g, dtype=torch.float64)
        x = net.embed(tokens)
        z = sched.alpha(t_prev)[..., None] * x + sched.sigma(t_prev)[..., None] * eps
        t2, o2 = two_stream_layout(torch.zeros_like(tokens), t_prev)
        full = net(torch.cat([x, z], 1), t2, o2, torch.arange(7).repeat(2)[None].expand(2, -1))
        ce = F.cross_entropy(full.logits[:, 7:].transpose(1, 2), tokens, reduction="none")
    recon = (j == 5)[:, None].expand(2, 7)
    torch.testing.assert_close(short.ce, ce, rtol=1e-10, atol=1e-10)
    assert bool((short.nats[recon] == 5 * ce[recon]).all()) or not recon.any()


@pytest.mark.parametrize("sampling", ["stratified", "independent"])
def test_each_step_is_drawn_uniformly_by_either_sampling(sampling):
    """Unbiasedness of both estimators needs only a uniform marginal over ``1..K``."""
    from flowtext.objectives import sample_steps

    g, n_steps, n, reps = torch.Generator().manual_seed(0), 5, 10, 400
    draws = torch.stack(
        [sample_steps(n, n_steps, sampling=sampling, generator=g) for _ in range(reps)]
    )
    assert int(draws.min()) >= 1 and int(draws.max()) <= n_steps
    freq = torch.bincount(draws.flatten(), minlength=n_steps + 1)[1:].double() / draws.numel()
    p = 1 / n_steps
    assert float((freq - p).abs().max()) <= 5 * math.sqrt(p * (1 - p) / draws.numel())
    per_batch = torch.stack([torch.bincount(d, minlength=n_steps + 1)[1:] for d in draws])
    if sampling == "stratified":  # n / K draws of every step in every batch
        assert bool((per_batch == n // n_steps).all())
    else:
        assert bool((per_batch != n // n_steps).any())


def test_unknown_step_sampling_is_a_config_error():
    from flowtext.objectives import sample_steps

    with pytest.raises(ConfigError, match="stratified"):
        sample_steps(4, 3, sampling="sobol")


# ------------------------------------------------------------------ the next-token readout
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 8))
def test_next_token_readout_matches_its_definition(seed, n):
    g = torch.Generator().manual_seed(seed)
    t_prev = torch.tensor([0.0, 1.0, 0.5])[torch.randint(0, 3, (3, n), generator=g)]
    t_prev[:, : int(torch.randint(0, n + 1, (), generator=g))] = 0.0  # often a committed prefix
    t_next = torch.where(torch.rand(3, n, generator=g) < 0.7, 0.0, 0.25 * t_prev)
    orders = torch.where(t_prev == 0, torch.randint(0, 4, (3, n), generator=g).cumsum(1), LIVE)
    orders[0, :] = torch.randint(0, 9, (n,), generator=g)  # a row of unordered commits
    got = next_token_readout(t_prev, t_next, orders)
    for r in range(3):
        for j in range(n):
            prefix = all(t_prev[r, i] == 0 for i in range(j)) and all(
                orders[r, i] >= orders[r, i - 1] for i in range(1, j)
            )
            want = j > 0 and prefix and t_prev[r, j] == 1 and t_next[r, j] == 0
            assert bool(got[r, j]) == want


@pytest.mark.parametrize("block", [2, 3])
def test_one_jump_block_bound_is_exact_in_both_forms(block):
    """block(B) with one jump per block reads no noise: two-stream == the exact K-step bound.

    Each block's first token reads its predecessor's clean logits, the others their own
    null query; the sequential bound reaches the same states with (step, position) orders.
    """
    net = tiny_net(2)
    sched = schedules.get("cosine")
    tokens = torch.randint(0, 11, (3, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        exact = discrete_elbo(net, tokens, block_grid(7, block, 1), sched)
        two = two_stream_loss(net, tokens, sched, block_size=block, steps_per_block=1).nats
    torch.testing.assert_close(two, exact, rtol=1e-10, atol=1e-10)
    firsts = torch.arange(7) % block == 0
    assert bool((firsts[1:]).any())  # some tokens take the next-token readout


def test_single_stream_under_ar_with_one_draw_per_step_is_exact():
    """Stratified draws hit every step once per K rows; AR reads no noise: mean == exact."""
    net = tiny_net(3)
    sched = schedules.get("cosine")
    tokens = torch.randint(0, 11, (1, 6), generator=torch.Generator().manual_seed(5))
    grid = policies.get("autoregressive").grid(6, 6, dtype=torch.float64)
    with torch.no_grad():
        exact = discrete_elbo(net, tokens, grid, sched).sum()
        est = single_stream_loss(net, tokens.expand(6, -1), grid, sched, generator=gen(0))
    torch.testing.assert_close(est.nats.sum(1).mean(), exact, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("block,m", [(1, 1), (2, 4), (3, 2), (7, 4)])
def test_every_estimator_returns_the_ar_bound_of_the_batch(block, m):
    """``ar=True`` gives the exact AR bound, free from the clean stream or from one stream."""
    net = tiny_net(4)
    sched = schedules.get("cosine")
    tokens = torch.randint(0, 11, (2, 7), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = autoregressive_loss(net, tokens, sched).nats
        two = two_stream_loss(net, tokens, sched, block_size=block, steps_per_block=m, ar=True)
        grid = policies.get("diagonal", width=0.5).grid(7, 14, dtype=torch.float64)
        one = single_stream_loss(net, tokens, with_t_min(grid, 0.2), sched, ar=True)
        plain = two_stream_loss(net, tokens, sched, block_size=block, steps_per_block=m)
    torch.testing.assert_close(two.ar_nats, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(one.ar_nats, want, rtol=1e-10, atol=1e-10)
    assert plain.ar_nats is None


def test_commit_orders_are_step_then_position():
    """Tokens committed in one step see each other causally (the token-causal clean stream)."""
    from flowtext.objectives import _orders

    t = torch.tensor([[0.0, 0.0, 0.0, 0.5]])
    o = _orders(t, torch.tensor([[2, 1, 2, 3]]))
    assert o.tolist() == [[2 * 4 + 0, 1 * 4 + 1, 2 * 4 + 2, LIVE]]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_a_noisy_window_scores_its_tokens_as_the_whole_stream_does(monkeypatch):
    """Each block sees only the clean stream, so a window's per-token terms are the whole pass's
    at those positions (same noise and steps): averaged over the windows, the estimate is the
    full one. The AR term reads all L clean tokens either way. (The Gaussian-mean step reads no
    further draw; the mixture step's ``xi`` is drawn at the window's shape, a fresh draw of the
    same law.)"""
    reverse = "gaussian"
    import flowtext.objectives as obj

    net = perturbed_net(seed=2)
    tokens = torch.randint(0, 13, (3, 16), generator=torch.Generator().manual_seed(0))
    kw = dict(block_size=4, steps_per_block=3, ar=True, reverse=reverse)

    def terms(window):
        gen = torch.Generator().manual_seed(5)
        sched = schedules.get("cosine")
        return two_stream_loss(net, tokens, sched, generator=gen, window=window, **kw)

    full = terms(None)
    real = obj._window_positions
    for start in range(0, 16, 8):
        fixed = lambda b, length, block, window, gen, cover, dev, s=start: (  # noqa: E731
            torch.arange(s, s + window, device=dev).expand(b, -1)
        )
        monkeypatch.setattr(obj, "_window_positions", fixed)
        part = terms(8)
        assert part.nats.shape == (3, 8)
        torch.testing.assert_close(part.nats, full.nats[:, start : start + 8], rtol=0, atol=1e-10)
        torch.testing.assert_close(part.ce, full.ce[:, start : start + 8], rtol=0, atol=1e-10)
        torch.testing.assert_close(part.ar_nats, full.ar_nats, rtol=0, atol=1e-10)
    monkeypatch.setattr(obj, "_window_positions", real)
    drawn = terms(8)  # drawn windows: block-aligned, one per row
    assert drawn.nats.shape == (3, 8)
    with pytest.raises(ConfigError, match="multiple of the block size"):
        terms(6)
