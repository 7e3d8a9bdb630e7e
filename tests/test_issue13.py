"""The info-uniform schedule during training: fed, refit, frozen for evaluation, checkpointed."""

import torch

from flowtext.checkpoint import load_checkpoint
from flowtext.data import CharTokenizer
from flowtext.lm import FlowLM
from flowtext.nn import FlowTransformerConfig
from flowtext.objectives import LossTerms
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
