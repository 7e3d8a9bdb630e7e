"""T4 (ELBO under AR = teacher-forced CE) and T5 (synchronous K-step ELBO -> continuous ELBO)."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from flowtext import policies, schedules
from flowtext.attention import LIVE
from flowtext.nn import FlowTransformer, FlowTransformerConfig
from flowtext.objectives import (
    block_grid,
    continuous_elbo,
    discrete_elbo,
    gaussian_kl_weight,
    single_stream_loss,
    two_stream_loss,
    with_t_min,
)
from flowtext.solvers import posterior


def tiny_net(seed, vocab=11, max_len=16):
    torch.manual_seed(seed)
    cfg = FlowTransformerConfig(
        vocab_size=vocab,
        max_len=max_len,
        d_model=32,
        n_layers=2,
        n_heads=2,
        d_embed=8,
        cond_dim=16,
        cond_rank=4,
        attention_backend="sdpa",
    )
    net = FlowTransformer(cfg).double().eval()
    with torch.no_grad():  # non-trivial conditioning (zero-initialised gates would hide bugs)
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def teacher_forced_ce(net, tokens):
    """Plain AR loop: token i predicted from the committed prefix, written independently."""
    b, n = tokens.shape
    x = net.embed(tokens)
    out = torch.zeros(b, n, dtype=x.dtype)
    for i in range(n):
        t = torch.ones(b, n, dtype=x.dtype)
        t[:, :i] = 0.0
        o = torch.full((b, n), LIVE, dtype=torch.long)
        o[:, :i] = torch.arange(i)
        z = torch.where((t == 0)[..., None], x, torch.randn_like(x))
        logits = net(z, t, o).logits
        out[:, i] = F.cross_entropy(logits[:, i], tokens[:, i], reduction="none")
    return out


@given(seed=st.integers(0, 1000), length=st.integers(1, 9), batch=st.integers(1, 3))
@settings(max_examples=10)
def test_t4_elbo_under_autoregressive_is_teacher_forced_ce(seed, length, batch):
    net = tiny_net(seed)
    tokens = torch.randint(0, 11, (batch, length), generator=torch.Generator().manual_seed(seed))
    ref = teacher_forced_ce(net, tokens)
    with torch.no_grad():
        grid = policies.get("autoregressive").grid(length, length, dtype=torch.float64)
        sequential = discrete_elbo(net, tokens, grid, net_schedule := schedules.get("cosine"))
        vectorized = two_stream_loss(net, tokens, net_schedule, block_size=1).nats
    torch.testing.assert_close(sequential, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(vectorized, ref, rtol=1e-10, atol=1e-10)


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
    from flowtext.errors import ConfigError
    from flowtext.objectives import sample_steps

    with pytest.raises(ConfigError, match="stratified"):
        sample_steps(4, 3, sampling="sobol")
