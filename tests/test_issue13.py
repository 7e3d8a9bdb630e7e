"""The info-uniform schedule during training: fed, refit, frozen for evaluation, checkpointed."""

import pytest
import torch

from flowtext.checkpoint import load_checkpoint
from flowtext.data import CharTokenizer
from flowtext.lm import FlowLM
from flowtext.nn import FlowTransformerConfig
from flowtext.objectives import LossTerms, two_stream_loss
from flowtext.regime import TrainingRegime
from flowtext.schedules import InfoUniform

TINY = dict(
    vocab_size=13, max_len=16, d_model=32, n_layers=2, n_heads=2, d_embed=8, cond_dim=16,
    cond_rank=4, attention_backend="sdpa",
)  # fmt: skip
T = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)


def _model(fit_every=2):
    torch.manual_seed(0)
    regime = TrainingRegime(block_sizes=(0, 4), steps_per_block=8, schedule_fit_every=fit_every)
    return FlowLM(
        net=FlowTransformerConfig(**TINY),
        regime=regime,
        schedule="info-uniform",
        schedule_kwargs={"n_bins": 16},
        val_block_size=4,
        val_steps_per_block=4,
    )


def _train(model, steps, tokens):
    for _ in range(steps):
        loss, _ = model.training_loss(tokens)
        loss.backward()


def _informative_terms(n=512):
    """Per-token terms whose cross-entropy lies only in t > 0.5 (a trained model's shape)."""
    t = torch.rand(4, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    ce = (2 * t - 1).clamp_min(0) * 3.0
    ones = torch.ones_like(t, dtype=torch.bool)
    return LossTerms(nats=ce, ce=ce, difficulty=None, scored=ones, t=t)


def test_training_feeds_the_schedule_and_refits_every_n_steps():
    model = _model(fit_every=3)
    assert isinstance(model.schedule, InfoUniform)
    before = model.schedule.warp(T)
    torch.testing.assert_close(before, T)  # identity before any fit
    _train(model, 1, torch.randint(0, 13, (4, 12)))  # the training loss feeds it
    assert not torch.isnan(model.schedule.estimates()[1]).all()
    model.feed_schedule(_informative_terms())
    assert torch.equal(model.schedule.warp(T), before)  # fed twice, not yet refit
    model.feed_schedule(_informative_terms())
    after = model.schedule.warp(T)
    assert not torch.allclose(after, before, atol=1e-3)
    assert bool((after[T < 0.5] > T[T < 0.5]).all())  # the empty half t < 0.5 is squeezed


def test_validation_does_not_update_the_schedule_and_training_resumes_it():
    model = _model()
    tokens = torch.randint(0, 13, (4, 12))
    _train(model, 2, tokens)
    state = model.schedule.state_dict()
    model.on_validation_start()
    logged = {}
    model.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    with torch.no_grad():
        model.validation_step({"tokens": tokens}, 0)
    _train(model, 2, tokens)  # a frozen schedule is not fed
    after = model.schedule.state_dict()
    assert all(torch.equal(after[k], state[k]) for k in state if k != "frozen")
    assert logged and all(torch.isfinite(torch.tensor(v)) for v in logged.values())
    model.on_train_batch_start(None, 0)
    _train(model, 1, tokens)
    assert not torch.equal(model.schedule.state_dict()["ema_sum"], state["ema_sum"])


def test_the_checkpoint_round_trips_the_fitted_schedule(tmp_path):
    model = _model()
    _train(model, 1, torch.randint(0, 13, (4, 12)))
    model.feed_schedule(_informative_terms())  # the second feed refits
    ckpt = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(ckpt)
    ckpt["flowtext_tokenizer"] = CharTokenizer("abcdefghij").state_dict()  # 13 ids
    torch.save(ckpt, tmp_path / "m.ckpt")
    assert "flowtext_schedule" in torch.load(tmp_path / "m.ckpt", weights_only=True)
    again, _, _ = load_checkpoint(tmp_path / "m.ckpt")
    assert torch.equal(again.schedule.warp(T), model.schedule.warp(T))
    assert not torch.allclose(again.schedule.warp(T), T, atol=1e-6)
    fresh = _model()
    assert not torch.equal(fresh.schedule.warp(T), model.schedule.warp(T))


def test_a_grid_with_one_inner_time_feeds_but_does_not_fit():
    torch.manual_seed(0)
    regime = TrainingRegime(block_sizes=(0,), steps_per_block=2, schedule_fit_every=1)
    model = FlowLM(net=FlowTransformerConfig(**TINY), regime=regime, schedule="info-uniform")
    _train(model, 2, torch.randint(0, 13, (4, 12)))  # every state at t = 1/2: one bin
    assert int((~torch.isnan(model.schedule.estimates()[1])).sum()) == 1
    torch.testing.assert_close(model.schedule.warp(T), T)


# ---------------------------------------------------------------------------------------------
# A reported bound is a true bound under a steep fitted warp (the 0.017 bits/byte of the
# ablation): a warp fitted where the training grid's times lie and read on a finer grid puts
# nearly the whole bound into ONE step (the commit at t_min = 1/m), and an estimate that draws
# fewer steps than the grid has misses it in most draws.

F64 = torch.float64


def steep_info_uniform(mid, width=0.3, base="cosine", n_bins=32):
    """An info-uniform schedule whose cross-entropy rises only around log-SNR ``mid``."""
    s = InfoUniform(base=base, n_bins=n_bins)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        lam = s.log_snr(torch.rand(4096, generator=g, dtype=F64))
        s.update(lam, 3.0 * torch.sigmoid(-(lam - mid) / width))
        s.fit()
    s.freeze()
    return s


def oracle(schedule, seed=0, rows=8, length=64):
    """The exact unigram posterior under ``schedule``, ``rows`` sequences and their info."""
    from tests.test_mixture import UnigramOracle, unigram_setup

    net, tokens, info, g = unigram_setup(seed=seed, rows=rows, length=length)
    return UnigramOracle(net.log_pi, net.table, schedule), tokens, info, g


def sync_estimate(net, tokens, schedule, m, g, reverse, cover):
    terms = two_stream_loss(
        net, tokens, schedule, block_size=tokens.shape[1], steps_per_block=m, generator=g,
        reverse=reverse, difficulty=False, cover=cover,
    )  # fmt: skip
    return terms.nats.mean().item()


@pytest.mark.parametrize("reverse", ["gaussian", "mixture"])
@pytest.mark.parametrize("mid", [-9.0, 2.0])
def test_a_covering_estimate_of_a_steep_warp_reads_the_entropy_in_every_draw(reverse, mid):
    """8 rows, 64 steps: every covering draw is near the entropy; draws of one step per row
    (the training estimator, still unbiased) miss the commit term in most draws."""
    sched = steep_info_uniform(mid)
    net, tokens, info, g = oracle(sched)
    entropy = info.mean().item()
    with torch.no_grad():
        covered = [sync_estimate(net, tokens, sched, 64, g, reverse, True) for _ in range(16)]
        single = [sync_estimate(net, tokens, sched, 64, g, reverse, False) for _ in range(16)]
    assert min(covered) > 0.6 * entropy, (covered, entropy)
    mean = sum(covered) / len(covered)
    if reverse == "mixture":  # T10: the mixture bound of the exact posterior is the entropy
        assert abs(mean - entropy) < 0.1 * entropy, (mean, entropy)
    else:  # the Gaussian-mean step pays at least the entropy
        assert mean > 0.9 * entropy, (mean, entropy)
    if mid < 0:  # the whole bound in the commit step: uncovered draws read ~0
        assert sorted(single)[8] < 0.1 * entropy, single


def test_the_reported_bound_of_a_model_under_a_steep_warp_covers_every_step():
    """FlowLM in evaluation (what validation and experiments report): each estimate of the
    synchronous bound at 64 steps over 4 rows lies near the exact 64-step bound."""
    model = _model()
    sched = model.schedule
    lam = sched.log_snr(torch.rand(4096, generator=torch.Generator().manual_seed(1), dtype=F64))
    sched.update(lam, 3.0 * torch.sigmoid(-(lam + 9.0) / 0.3))
    sched.fit()
    model.freeze_schedule()
    model.eval()
    tokens = torch.randint(0, 13, (4, 12), generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(3)
    from flowtext.objectives import block_grid, discrete_elbo

    with torch.no_grad():
        grid = block_grid(12, 12, 64, None)
        exact = discrete_elbo(model.net, tokens, grid, sched, generator=g).mean().item()
        est = [model.policy_bound(tokens, "synchronous", 64, generator=g).nats.mean().item()
               for _ in range(8)]  # fmt: skip
    assert exact > 1.0, exact  # the commit at t_min = 1/64 sits at almost pure noise
    assert min(est) > 0.5 * exact and max(est) < 2 * exact, (est, exact)


def _excess(a, b):
    diff = (a - b).flatten()
    return diff.mean().item(), (diff.std() / diff.numel() ** 0.5).item()


@pytest.mark.parametrize("reverse", ["gaussian", "mixture"])
@pytest.mark.parametrize("mid", [-9.0, 2.0])
def test_under_a_steep_warp_the_exact_bound_is_true_and_the_estimators_are_unbiased(reverse, mid):
    """The exact unigram posterior: the exact 16-step bound is the entropy (mixture) or above
    it (Gaussian-mean step); the one-draw estimators' means equal the exact bound (block(4) as
    two-stream, diagonal as single-stream; 2048 rows, so every step is drawn)."""
    from flowtext import policies
    from flowtext.objectives import block_grid, discrete_elbo, single_stream_loss, with_t_min

    sched = steep_info_uniform(mid)
    net, tokens, info, g = oracle(sched, seed=3, rows=2048, length=8)
    sync = block_grid(8, 4, 8, None)  # block(4), 8 steps per block, t_min = 1/8
    diag = with_t_min(policies.get("diagonal", width=0.5).grid(8, 16, dtype=F64), 1 / 8)
    with torch.no_grad():
        exact = {k: discrete_elbo(net, tokens, gr, sched, generator=g, reverse=reverse)
                 for k, gr in (("block", sync), ("diag", diag))}  # fmt: skip
        two = two_stream_loss(
            net, tokens, sched, block_size=4, steps_per_block=8, generator=g, reverse=reverse
        )
        single = single_stream_loss(net, tokens, diag, sched, generator=g, reverse=reverse)
    for key in exact:
        m, se = _excess(exact[key], info)
        if reverse == "mixture":
            assert abs(m) < 4.5 * se, (key, m, se)
        else:
            assert m > -4.5 * se, (key, m, se)
    for key, est in (("block", two.nats), ("diag", single.nats)):
        m, se = _excess(est, exact[key])
        assert abs(m) < 4.5 * se, (key, m, se)


@pytest.mark.parametrize("block,m", [(8, 16), (2, 8), (1, 1)])
def test_a_covering_estimate_keeps_the_batch_shape_and_every_side_output(block, m):
    """Copies are folded back per row: nats, ce, t, scored, difficulty ``[B, L]``; the AR bound
    is the uncovered one (it draws no step); the balanced draw reads every sub-step."""
    from flowtext.objectives import covering_copies, single_stream_loss, with_t_min
    from tests.test_objectives import tiny_net

    net = tiny_net(0)
    sched = InfoUniform()
    tokens = torch.randint(0, 11, (3, 8), generator=torch.Generator().manual_seed(0))
    kw = dict(block_size=block, steps_per_block=m, ar=True, difficulty=True)
    with torch.no_grad():
        plain = two_stream_loss(net, tokens, sched, generator=torch.Generator(), **kw)
        cov = two_stream_loss(net, tokens, sched, generator=torch.Generator(), cover=True, **kw)
        grid = with_t_min(policies_grid(8, 24), 0.25)
        single = single_stream_loss(net, tokens, grid, sched, ar=True, cover=True)
    for terms in (cov, single):
        for v in (terms.nats, terms.ce, terms.t, terms.scored, terms.difficulty, terms.ar_nats):
            assert v.shape == tokens.shape
    torch.testing.assert_close(cov.ar_nats, plain.ar_nats)
    torch.testing.assert_close(single.ar_nats, plain.ar_nats)
    assert covering_copies(3 * -(-8 // block), m) == max(1, -(-m // (3 * -(-8 // block))))


def policies_grid(length, steps):
    from flowtext import policies

    return policies.get("diagonal", width=0.5).grid(length, steps, dtype=F64)


def test_the_balanced_draw_is_uniform_and_hits_every_step():
    from flowtext.objectives import _draw_steps

    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(7)
    for _ in range(2000):
        k = _draw_steps(10, 7, "stratified", g, True)
        assert set(k.tolist()) == set(range(1, 8))  # every step, at least once
        counts += torch.bincount(k[:1] - 1, minlength=7)  # the first draw's law
    assert (counts / 2000 - 1 / 7).abs().max() < 0.03, counts / 2000


@pytest.mark.parametrize("seed", [0, 2])
def test_a_barely_trained_model_keeps_the_identity_warp(seed):
    """An untrained model's cross-entropy hardly depends on the noise: its noisy curve must not
    warp the time axis (before the significance scan and the pin at ``c(0) = 0`` these seeds
    gave ``max |w(t) - t|`` of 0.16 and 0.33, ``w(1/64)`` of 0.157 and 0.075)."""
    model = _model(fit_every=2)
    torch.manual_seed(seed)
    _train(model, 8, torch.randint(0, 13, (8, 12)))
    t = torch.linspace(0, 1, 65, dtype=torch.float64)
    assert (model.schedule.warp(t) - t).abs().max() < 0.02
    assert model.schedule.warp(torch.tensor([1 / 64], dtype=torch.float64)) < 0.03
