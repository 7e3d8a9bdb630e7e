"""The Lightning modules: one code path, three configurations, regimes validated."""

import dataclasses
import inspect
import math

import pytest
import torch

import flowtext
from flowtext import policies
from flowtext.errors import ConfigError
from flowtext.lm import FlowLM
from flowtext.nn import FlowTransformerConfig
from flowtext.objectives import (
    autoregressive_loss,
    discrete_elbo,
    single_stream_loss,
    two_stream_loss,
    with_t_min,
)
from flowtext.regime import TrainingRegime

from ._nets import tiny

TINY = tiny()


@pytest.mark.parametrize("cls", [flowtext.Evo, flowtext.AutoregressiveLM, flowtext.DiffusionLM])
def test_special_cases_are_configurations_of_one_module(cls):
    assert issubclass(cls, FlowLM)
    own = {k for k, v in vars(cls).items() if callable(v) and not k.startswith("__")}
    assert own == set(), f"{cls.__name__} must only change defaults, but defines {own}"
    assert set(inspect.signature(cls).parameters) - {"kwargs"} <= set(
        inspect.signature(FlowLM).parameters
    )
    # the default regime is the only difference, and it is one of TrainingRegime's presets
    default = inspect.signature(cls).parameters["regime"].default
    presets = {"Evo": "evo", "AutoregressiveLM": "autoregressive", "DiffusionLM": "diffusion"}
    assert default == getattr(TrainingRegime, presets[cls.__name__])()
    assert cls(net=FlowTransformerConfig(**TINY)).regime == default


@pytest.mark.parametrize("cls", [flowtext.Evo, flowtext.AutoregressiveLM, flowtext.DiffusionLM])
def test_training_and_validation_steps_run(cls):
    torch.manual_seed(0)
    model = cls(net=FlowTransformerConfig(**TINY), val_block_size=4, val_steps_per_block=4)
    tokens = torch.randint(0, 13, (3, 12))
    for _ in range(8):  # several draws of the regime mixture
        loss, logs = model.training_loss(tokens)
        assert torch.isfinite(loss) and loss.ndim == 0
        assert ("train/ar_bpt" in logs) == (cls is not flowtext.DiffusionLM)
        loss.backward()
    trained = [
        (n, p)
        for n, p in model.net.named_parameters()
        if model.regime.difficulty_weight > 0 or not n.startswith("difficulty_head")
    ]
    assert all(p.grad is not None for _, p in trained), [n for n, p in trained if p.grad is None]
    logged = {}
    model.log = lambda name, value, **kw: logged.__setitem__(name, value)
    model.validation_step({"tokens": tokens}, 0)
    trained = {  # ar always (the checkpoint monitor), then what the regime trains on
        flowtext.Evo: {"ar", "block4", "sync"},
        flowtext.AutoregressiveLM: {"ar"},
        flowtext.DiffusionLM: {"ar", "sync"},
    }[cls]
    assert set(logged) == {f"val/bpb_{name}" for name in trained}
    assert all(torch.isfinite(v) and v > 0 for v in logged.values())


def test_ar_module_trains_exactly_the_ar_likelihood():
    """The AR module's one causal stream is the exact AR bound of the same network (float64)."""
    torch.manual_seed(0)
    model = flowtext.AutoregressiveLM(net=FlowTransformerConfig(**TINY)).double()
    with torch.no_grad():
        for p in model.parameters():  # non-trivial conditioning: zero gates would hide bugs
            p.add_(0.05 * torch.randn_like(p))
    tokens = torch.randint(0, 13, (2, 9))
    loss, logs = model.training_loss(tokens)
    grid = policies.get("autoregressive").grid(9, 9, dtype=torch.float64)
    exact = discrete_elbo(model.net, tokens, grid, model.schedule).mean()
    torch.testing.assert_close(loss, exact, rtol=1e-10, atol=1e-10)
    noisy = two_stream_loss(model.net, tokens, model.schedule, block_size=1).nats.mean()
    torch.testing.assert_close(noisy, exact, rtol=1e-10, atol=1e-10)
    assert float(logs["train/ar_bpt"]) == pytest.approx(
        float(exact.detach()) / math.log(2), rel=1e-12
    )
    calls: list = []
    model.net.register_forward_hook(lambda m, a, out: calls.append(tuple(a[0].shape)))
    lean = model.net.null_logits
    model.net.null_logits = lambda: calls.append("null") or lean()
    model.training_loss(tokens)
    assert calls == [(2, 9, 8), "null"]  # one stream of L tokens + the (lean) null query


@pytest.mark.parametrize("w", [1.0, 0.5])
def test_evo_loss_contains_the_ar_term_on_every_batch(w):
    """Whatever bound is drawn, the loss adds ``w`` times the exact AR bound of the batch."""
    torch.manual_seed(0)
    regime = dataclasses.replace(
        TrainingRegime.evo(), ar_weight=w, steps_per_block=4, normalize=False, bound_weights={}
    )
    model = flowtext.Evo(net=FlowTransformerConfig(**TINY), regime=regime).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tokens = torch.randint(0, 13, (4, 12))
    with torch.no_grad():
        ar = autoregressive_loss(model.net, tokens, model.schedule).nats.mean()
    seen = set()
    for seed in range(40):
        gen = torch.Generator().manual_seed(seed)
        label = regime.draw(12, torch.Generator().manual_seed(seed)).label
        loss, logs = model.training_loss(tokens, regime_generator=gen)
        seen.add(label)
        assert float(logs["train/ar_bpt"]) == pytest.approx(float(ar) / math.log(2), rel=1e-10)
        rest = logs["train/elbo_bpt"] * math.log(2) + 0.1 * logs["train/difficulty_mse"]
        torch.testing.assert_close(loss - rest, w * ar, rtol=1e-9, atol=1e-9)
        # the AR term reaches the readout through the clean (committed) stream on every draw
        grad = torch.autograd.grad(loss - rest, model.net.readout.weight)[0]
        assert float(grad.abs().sum()) > 0
    assert seen == set(regime.probabilities())


def _evo(**fields) -> FlowLM:
    torch.manual_seed(0)
    fields = {"normalize": False, "bound_weights": {}, **fields}
    regime = dataclasses.replace(TrainingRegime.evo(), steps_per_block=4, **fields)
    model = flowtext.Evo(net=FlowTransformerConfig(**TINY), regime=regime).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _drawn(label: str, length: int = 12):
    """The first bound labelled ``label`` that Evo's regime draws (seeds 0, 1, ...)."""
    return next(
        b for s in range(100)
        if (b := TrainingRegime.evo().draw(length, torch.Generator().manual_seed(s))).label == label
    )  # fmt: skip


def _terms(model, tokens, bound, seed=0):
    model._gen.manual_seed(seed)
    loss, logs = model.bound_loss(tokens, bound)
    return loss, logs["train/elbo_bpt"] * math.log(2), logs["train/ar_bpt"] * math.log(2)


@pytest.mark.parametrize("label", ["block0", "block4", "diagonal"])
def test_bound_weights_scale_the_drawn_term_and_only_it(label):
    tokens = torch.randint(0, 13, (3, 12))
    bound = _drawn(label)
    base, elbo, ar = _terms(_evo(), tokens, bound)
    scaled, elbo2, ar2 = _terms(_evo(bound_weights={label: 0.25, "block1": 3.0}), tokens, bound)
    torch.testing.assert_close(elbo2, elbo)  # the logged bound is never weighted
    torch.testing.assert_close(ar2, ar)
    torch.testing.assert_close(base - scaled, 0.75 * elbo, rtol=1e-9, atol=1e-9)


def test_normalize_trains_the_log_of_each_term_and_reports_the_bound():
    tokens = torch.randint(0, 13, (3, 12))
    bound = TrainingRegime.evo().block_bound(0, 12)
    plain, normal = _evo(difficulty_weight=0.0), _evo(difficulty_weight=0.0, normalize=True)
    loss, elbo, ar = _terms(plain, tokens, bound)
    nloss, nelbo, nar = _terms(normal, tokens, bound)
    torch.testing.assert_close(nelbo, elbo)
    assert float(nloss.detach()) == pytest.approx(2.0, rel=1e-9)  # elbo / elbo + ar / ar
    # the gradient is that of log(elbo) + log(ar)
    ar = autoregressive_loss(plain.net, tokens, plain.schedule).nats.mean()
    want = torch.autograd.grad(torch.log(elbo) + torch.log(ar), plain.net.readout.weight)[0]
    got = torch.autograd.grad(nloss, normal.net.readout.weight)[0]
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("label", ["block0", "block4", "diagonal", "block1"])
def test_ce_weight_adds_the_denoiser_cross_entropy_of_the_drawn_states(label):
    """``ce_weight`` adds w x the mean commit cross-entropy of the evaluated states, read from
    the same network call as the bound (the same noise), and leaves every logged bound alone."""
    tokens = torch.randint(0, 13, (3, 12))
    bound = _drawn(label)
    base, elbo, ar = _terms(_evo(), tokens, bound)
    model = _evo(ce_weight=0.5)
    model._gen.manual_seed(0)
    loss, logs = model.bound_loss(tokens, bound)
    torch.testing.assert_close(logs["train/elbo_bpt"] * math.log(2), elbo)
    torch.testing.assert_close(logs["train/ar_bpt"] * math.log(2), ar)
    if label == "block1":  # the AR bound is a cross-entropy already: nothing is added
        torch.testing.assert_close(loss, base)
        assert "train/ce_bpt" not in logs
        return
    model._gen.manual_seed(0)
    terms = model.policy_bound(tokens, bound.policy, bound.steps, ar=True, difficulty=True)
    scored = terms.scored.double()
    ce = (terms.ce * scored).sum() / scored.sum()
    # the commit cross-entropy, not the K-weighted bound
    assert 0 < float(ce.detach()) < float(terms.nats.mean().detach())
    torch.testing.assert_close(loss - base, 0.5 * ce, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(logs["train/ce_bpt"] * math.log(2), ce.detach())
    # trained by cross-entropy alone: the bound's weight 0, the gradient is the CE's
    alone = _evo(ce_weight=1.0, ar_weight=0.0, difficulty_weight=0.0, bound_weights={label: 0.0})
    alone._gen.manual_seed(0)
    only, _ = alone.bound_loss(tokens, bound)
    torch.testing.assert_close(only, ce.detach(), rtol=1e-9, atol=1e-9)
    assert float(torch.autograd.grad(only, alone.net.readout.weight)[0].abs().sum()) > 0


def test_difficulty_on_ar_off_trains_ar_draws_on_one_causal_stream():
    """An AR draw without the head's noisy stream: the same bound, one pass of L tokens."""
    tokens = torch.randint(0, 13, (3, 12))
    bound = TrainingRegime.evo().block_bound(1, 12)
    on, off = _evo(), _evo(difficulty_on_ar=False)
    widths: list[int] = []
    off.net.register_forward_hook(lambda mod, args, out: widths.append(args[0].shape[1]))
    loss_on, logs_on = on.bound_loss(tokens, bound)
    loss_off, logs_off = off.bound_loss(tokens, bound)
    assert widths == [12]  # one causal stream, not the two-stream 2L
    assert "train/difficulty_mse" not in logs_off
    torch.testing.assert_close(logs_off["train/ar_bpt"], logs_on["train/ar_bpt"])
    head = on.regime.difficulty_weight * logs_on["train/difficulty_mse"]
    torch.testing.assert_close(loss_off, loss_on - head, rtol=1e-9, atol=1e-9)
    # other draws still train the head
    _, logs = off.bound_loss(tokens, TrainingRegime.evo().block_bound(4, 12))
    assert "train/difficulty_mse" in logs


@pytest.mark.parametrize("label", ["block0", "block4", "diagonal"])
def test_bound_row_fraction_estimates_the_drawn_bound_on_the_first_rows_only(label):
    """The drawn bound on the first rows (the same estimate as on those rows alone), the exact
    AR term on every row; an AR draw keeps the whole batch."""
    tokens = torch.randint(0, 13, (4, 12))
    bound = _drawn(label)
    model = _evo(bound_row_fraction=0.5, difficulty_weight=0.0)
    widths: list[tuple[int, int]] = []
    model.net.register_forward_hook(lambda m, args, out: widths.append(tuple(args[0].shape[:2])))
    loss = _terms(model, tokens, bound)[0]
    assert all(b == 2 for b, _ in widths[:-1]) and widths[-1] == (2, 12)  # the rest: causal
    _, elbo, ar = _terms(_evo(difficulty_weight=0.0), tokens[:2], bound)
    full_ar = autoregressive_loss(model.net, tokens, model.schedule).nats.mean()
    torch.testing.assert_close(loss, model.regime.weight(label) * elbo + full_ar)
    assert model.regime.bound_rows(4) == 2 and model.regime.bound_rows(1) == 1
    ar_draw = TrainingRegime.evo().block_bound(1, 12)
    whole, _ = model.bound_loss(tokens, ar_draw)
    torch.testing.assert_close(whole, 2 * full_ar)  # AR drawn + the AR term, all four rows


def test_bound_window_thins_block_bounds_by_position_and_the_rest_by_rows():
    """A windowed block draw keeps every row, with ``L + W`` tokens per row; the whole-sequence
    draw, which no window can hold, falls back to the row fraction."""
    tokens = torch.randint(0, 13, (4, 12))
    model = _evo(bound_window=0.5, bound_row_fraction=0.5, difficulty_weight=0.0)
    assert model.regime.window(12, 2) == 6 and model.regime.window(12, 4) is None  # 6 % 4
    assert model.regime.window(12, 0) is None and _evo().regime.window(12, 2) is None
    widths: list[tuple[int, int]] = []
    model.net.register_forward_hook(lambda m, args, out: widths.append(tuple(args[0].shape[:2])))
    _terms(model, tokens, TrainingRegime.evo().block_bound(2, 12))
    assert (4, 18) in widths  # every row: 12 clean tokens and a window of 6 noisy ones
    widths.clear()
    _terms(model, tokens, _drawn("block0"))
    assert all(b == 2 for b, _ in widths[:-1]) and widths[-1] == (2, 12)


def test_ar_tail_trains_the_ar_bound_alone_at_the_end_of_the_schedule():
    """From step ``(1 - ar_tail) * max_lr_steps`` on, every batch is the AR bound on one causal
    stream (the draw is made all the same); before it, the regime's draws as usual."""
    tokens = torch.randint(0, 13, (3, 12))
    regime = dataclasses.replace(
        TrainingRegime.evo(), block_sizes=(4,), single_stream_fraction=0.0, ar_tail=0.25,
        difficulty_on_ar=False,
    )  # fmt: skip
    model = FlowLM(net=tiny(), regime=regime, max_lr_steps=100)
    assert [regime.ar_only(s, 100) for s in (0, 74, 75, 99, 500)] == [0, 0, 1, 1, 1]
    assert not regime.ar_only(10**6, 0)  # no decay, no tail
    widths: list[int] = []
    model.net.register_forward_hook(lambda m, args, out: widths.append(args[0].shape[1]))
    gen = torch.Generator().manual_seed(0)
    _, before = model.training_loss(tokens, regime_generator=gen, step=74)
    assert "train/elbo_bpt_block4" in before and 24 in widths  # two streams
    widths.clear()
    model._gen.manual_seed(0)
    loss, after = model.training_loss(tokens, regime_generator=gen, step=75)
    assert "train/elbo_bpt_block1" in after and widths == [12]
    model._gen.manual_seed(0)
    expected, _ = model.bound_loss(tokens, regime.block_bound(1, 12))
    torch.testing.assert_close(loss, expected)
    _, unstepped = model.training_loss(tokens, regime_generator=gen)
    assert "train/elbo_bpt_block4" in unstepped


def test_noise_draws_average_independent_draws_and_leave_the_ar_bound_alone():
    tokens = torch.randint(0, 13, (3, 12))
    model = _evo(noise_draws=3, difficulty_weight=0.0)
    bound = TrainingRegime.evo().block_bound(4, 12)
    model._gen.manual_seed(0)
    terms = model.policy_bound(tokens.repeat(3, 1), bound.policy, bound.steps)
    per_draw = terms.nats.view(3, 3, 12).sum(-1)  # [draw, row]: one bound estimate each
    assert float((per_draw[0] - per_draw[1]).detach().abs().min()) > 0  # independent noise per copy
    _, elbo, ar = _terms(model, tokens, bound)
    torch.testing.assert_close(elbo, terms.nats.mean())
    with torch.no_grad():
        exact = autoregressive_loss(model.net, tokens, model.schedule).nats.mean()
    torch.testing.assert_close(ar, exact, rtol=1e-10, atol=1e-10)
    # the AR bound itself is exact: it is never repeated
    ar_bound = TrainingRegime.evo().block_bound(1, 12)
    _, ar_elbo, _ = _terms(model, tokens, ar_bound)
    torch.testing.assert_close(ar_elbo, exact, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("label", ["block0", "block4", "diagonal"])
def test_noise_draws_equal_the_repeated_batch_with_one_ar_stream_per_sequence(label, monkeypatch):
    """``noise_draws`` gives what repeating the batch gave (loss, bounds, gradient), but the
    extra causal stream of the AR term (single-stream and one-block bounds) runs on the ``B``
    sequences, not on ``noise_draws * B`` rows."""
    import flowtext.objectives as objectives

    tokens = torch.randint(0, 13, (3, 12), generator=torch.Generator().manual_seed(1))
    bound = _drawn(label)
    model = _evo(noise_draws=3, difficulty_weight=0.5, ar_weight=0.7)
    ar_rows: list[int] = []
    plain_ar = objectives.autoregressive_loss

    def counted(net, toks, schedule):
        ar_rows.append(toks.shape[0])
        return plain_ar(net, toks, schedule)

    monkeypatch.setattr(objectives, "autoregressive_loss", counted)
    model._gen.manual_seed(5)
    old = model.policy_bound(
        tokens.repeat(3, 1), bound.policy, bound.steps, ar=True, difficulty=True
    )
    old_loss = old.nats.mean() + 0.7 * old.ar_nats.mean() + 0.5 * old.difficulty_loss()
    (old_grad,) = torch.autograd.grad(old_loss, model.net.readout.weight)
    old_rows, ar_rows[:] = list(ar_rows), []
    model._gen.manual_seed(5)
    loss, logs = model.bound_loss(tokens, bound)
    (grad,) = torch.autograd.grad(loss, model.net.readout.weight)
    torch.testing.assert_close(loss, old_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, old_grad, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(logs["train/elbo_bpt"] * math.log(2), old.nats.mean())
    torch.testing.assert_close(logs["train/ar_bpt"] * math.log(2), old.ar_nats.mean())
    if label != "block4":  # one block or one stream: the AR term's own causal stream
        assert old_rows == [9] and ar_rows == [3]
    else:  # several blocks: read from the clean stream the noisy one needs (no extra stream)
        assert old_rows == ar_rows == []


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(block_sizes=(4,), steps_per_block=1), "steps_per_block"),
        (dict(single_stream_fraction=1.5), "single_stream_fraction"),
        (dict(block_sizes=(), single_stream_fraction=0.0), "block_sizes"),
        (dict(block_sizes=(-2,)), ">= 0"),
        (dict(block_sizes=(1.5,)), "integers"),
        (dict(t_min=1.0, steps_per_block=4, block_sizes=(4,)), "t_min"),
        (dict(single_stream_fraction=0.5, diagonal_widths=(0.0,)), "diagonal_widths"),
        (dict(single_stream_fraction=0.5, diagonal_steps=0), "diagonal_steps"),
        (dict(difficulty_weight=-1.0), "difficulty_weight"),
        (dict(ar_weight=float("nan")), "ar_weight"),
        (dict(ce_weight=-0.5), "ce_weight"),
        (dict(bound_row_fraction=0.0, ar_weight=1.0), "bound_row_fraction"),
        (dict(bound_row_fraction=0.5), "ar_weight > 0"),
        (dict(bound_window=1.5), "bound_window"),
        (dict(ar_tail=1.0), "ar_tail"),
        (dict(ar_tail=-0.1), "ar_tail"),
        (dict(step_sampling="sobol"), "step_sampling"),
        (dict(reverse="laplace"), "reverse step"),
        (dict(bound_weights={"blok1": 1.0}), "unknown bound label"),
        (dict(bound_weights={"block0": -1.0}), "bound_weights"),
        (dict(bound_weights=[("block0", 1.0)]), "bound_weights"),
        (dict(noise_draws=0), "noise_draws"),
        (dict(block_sizes=(4,), steps_per_block=4, step_choices=(4, 1)), "step_choices"),
        (dict(block_sizes=(4,), steps_per_block=4, step_choices=(4.5,)), "integers"),
    ],
)
def test_incompatible_regimes_fail_with_a_clear_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        TrainingRegime(**kwargs)


def test_bad_model_arguments_fail_with_a_clear_error():
    with pytest.raises(ConfigError, match="valid names"):
        FlowLM(net=FlowTransformerConfig(**TINY), schedule="cosinus")
    with pytest.raises(ConfigError, match="TrainingRegime"):
        FlowLM(net=FlowTransformerConfig(**TINY), regime=[1, 2])
    with pytest.raises(ConfigError, match="max_lr_steps"):  # a tail of no decay does nothing
        FlowLM(net=FlowTransformerConfig(**TINY), regime=TrainingRegime(ar_tail=0.1))


@pytest.mark.parametrize("regime", [TrainingRegime.evo(), TrainingRegime(single_stream_fraction=1)])
def test_regime_draws_follow_its_stated_probabilities(regime):
    gen, n = torch.Generator().manual_seed(0), 3000
    counts: dict[str, int] = {}
    for _ in range(n):
        label = regime.draw(32, gen).label
        counts[label] = counts.get(label, 0) + 1
    probs = regime.probabilities()
    assert set(counts) == set(probs) and sum(probs.values()) == pytest.approx(1.0)
    for label, p in probs.items():  # 5 standard deviations of a binomial count
        assert abs(counts[label] / n - p) <= 5 * math.sqrt(p * (1 - p) / n)


def test_step_choices_draw_every_grid_for_blocks_and_leave_ar_one_jump():
    regime = TrainingRegime(block_sizes=(1, 8, 0), steps_per_block=16, step_choices=(4, 64))
    gen, seen = torch.Generator().manual_seed(0), set()
    for _ in range(300):
        bound = regime.draw(32, gen)
        n_blocks = {"block1": 32, "block8": 4, "block0": 1}[bound.label]
        assert bound.steps % n_blocks == 0
        seen.add((bound.label, bound.steps // n_blocks))
    assert seen == {("block1", 1), ("block8", 4), ("block8", 64), ("block0", 4), ("block0", 64)}
    plain = TrainingRegime(block_sizes=(1, 8, 0), steps_per_block=16)  # off: one grid, as before
    gen, again = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    labels = [plain.draw(32, gen) for _ in range(50)]
    assert labels == [TrainingRegime(**plain.to_dict()).draw(32, again) for _ in range(50)]
    assert {b.steps for b in labels if b.label == "block8"} == {4 * 16}


def test_regime_is_plain_data_in_the_checkpoint_hyper_parameters():
    model = flowtext.Evo(net=FlowTransformerConfig(**TINY))
    plain = (dict, list, str, int, float, bool, type(None))

    def walk(x):
        assert isinstance(x, plain), type(x)
        for v in x.values() if isinstance(x, dict) else x if isinstance(x, list) else []:
            walk(v)

    walk({k: v for k, v in model.hparams.items()})
    assert TrainingRegime(**model.hparams["regime"]) == model.regime == TrainingRegime.evo()


def test_checkpoint_hparams_rebuild_the_module():
    model = flowtext.Evo(net=FlowTransformerConfig(**TINY))
    again = type(model)(**{k: v for k, v in model.hparams.items()})
    assert again.net.config == model.net.config
    assert again.regime == model.regime


def test_checkpoints_written_before_the_regime_keep_their_regime(tmp_path):
    from flowtext.checkpoint import load_checkpoint

    model = FlowLM(net=FlowTransformerConfig(**{**TINY, "vocab_size": 256}))  # raw bytes
    old = {k: v for k, v in model.hparams.items() if k != "regime"}
    old.update(train_block_sizes=[2, 0], steps_per_block=8, single_stream_fraction=0.5)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": old}, tmp_path / "a.ckpt")
    lm, _, _ = load_checkpoint(tmp_path / "a.ckpt")
    assert lm.regime == TrainingRegime(
        block_sizes=(2, 0), steps_per_block=8, single_stream_fraction=0.5
    )


def _seeded(model, seed=3):
    model._gen.manual_seed(seed)
    return model


@torch.no_grad()
def test_policy_bound_is_the_estimator_of_each_static_policy():
    model = FlowLM(net=FlowTransformerConfig(**TINY), regime=TrainingRegime(t_min=0.2))
    tokens = torch.randint(0, 13, (3, 12), generator=torch.Generator().manual_seed(0))
    net, sched = model.net, model.schedule

    def gen():
        return torch.Generator().manual_seed(3)

    got = _seeded(model).policy_bound(tokens, policies.Block(size=4), steps=3 * 5).nats
    ref = two_stream_loss(
        net, tokens, sched, block_size=4, steps_per_block=5, t_min=0.2, generator=gen()
    ).nats
    torch.testing.assert_close(got, ref)
    got = _seeded(model).policy_bound(tokens, "autoregressive", steps=12).nats
    torch.testing.assert_close(
        got, two_stream_loss(net, tokens, sched, block_size=1, generator=gen()).nats
    )
    sync = _seeded(model).policy_bound(tokens, "synchronous", steps=6).nats
    whole = _seeded(model).policy_bound(tokens, policies.Block(size=12), steps=6).nats
    torch.testing.assert_close(sync, whole)
    grid = with_t_min(policies.Diagonal(width=0.3).grid(12, 24, dtype=torch.float64), 0.2)
    got = _seeded(model).policy_bound(tokens, policies.Diagonal(width=0.3), steps=24).nats
    torch.testing.assert_close(
        got, single_stream_loss(net, tokens, grid, sched, generator=gen()).nats
    )


def test_policy_bound_refuses_what_it_cannot_estimate():
    model = FlowLM(net=FlowTransformerConfig(**TINY))
    tokens = torch.randint(0, 13, (2, 12))
    with pytest.raises(ConfigError, match="multiple of 3"):
        model.policy_bound(tokens, policies.Block(size=4), steps=4)
    with pytest.raises(ConfigError, match="static"):
        model.policy_bound(tokens, "adaptive", steps=12)


def test_val_policies_choose_the_validation_bounds():
    model = FlowLM(net=FlowTransformerConfig(**TINY), val_policies=["sync"])
    assert list(model.validation_bounds(12)) == ["sync"]
    with pytest.raises(ConfigError, match="val_policies"):
        FlowLM(net=FlowTransformerConfig(**TINY), val_policies=["diagonal"])


def test_validation_scores_the_policies_with_policy_bound():
    model = FlowLM(
        net=FlowTransformerConfig(**TINY),
        val_block_size=4,
        val_steps_per_block=4,
        val_policies=["ar", "block", "sync"],
    )
    tokens = torch.randint(0, 13, (2, 12))
    logged = {}
    model.log = lambda name, value, **kw: logged.__setitem__(name, float(torch.as_tensor(value).detach()))
    model.validation_step({"tokens": tokens}, 0)
    model._gen.manual_seed(model._key(2, 0, 0))
    for name, bound in model.validation_bounds(12).items():
        nats = model.policy_bound(tokens, bound.policy, bound.steps).nats.mean()
        assert logged[f"val/bpb_{name}"] == pytest.approx(float(nats.detach()) / math.log(2))
    assert model.validation_bounds(12)["block4"].steps == 3 * 4


def test_a_mixture_regime_trains_and_validates_with_the_mixture_step():
    torch.manual_seed(1)
    regime = dataclasses.replace(TrainingRegime.evo(), reverse="mixture", steps_per_block=4)
    model = flowtext.Evo(
        net=FlowTransformerConfig(**TINY), regime=regime, val_block_size=4, val_steps_per_block=4,
        val_policies=["ar", "block", "sync"],
    ).double()  # fmt: skip
    tokens = torch.randint(0, 13, (3, 12))
    for _ in range(3):
        loss, _ = model.training_loss(tokens)
        assert torch.isfinite(loss)
        loss.backward()
    logged = {}
    model.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    with torch.no_grad():
        model.validation_step({"tokens": tokens}, 0)
    assert set(logged) == {"val/bpb_ar", "val/bpb_block4", "val/bpb_sync"}
    assert all(math.isfinite(v) and v > 0 for v in logged.values())

    # the regime's reverse step reaches the estimator: same draws, the two steps differ
    def direct(reverse):
        return two_stream_loss(
            model.net, tokens, model.schedule, block_size=4, steps_per_block=4,
            t_min=regime.t_min, generator=torch.Generator().manual_seed(5), reverse=reverse,
        ).nats  # fmt: skip

    block = policies.get("block", size=4)
    got = model.policy_bound(tokens, block, 12, generator=torch.Generator().manual_seed(5)).nats
    torch.testing.assert_close(got, direct("mixture"), rtol=0, atol=0)
    assert not torch.allclose(got, direct("gaussian"))
