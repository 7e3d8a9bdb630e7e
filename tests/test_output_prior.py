"""The output prior (docs/theory.md §3f): Bayes posterior logits added to the readout.

With the network's own readout zeroed and the prior set to the data's unigram law, the network
*is* the exact per-token posterior of i.i.d. tokens (test_mixture.UnigramOracle): its commit
cross-entropies, its mixture bounds (= the entropy) and its samples (drawn from ``pi``) say so.
With a trained-looking network the option keeps T2, T4 and the cache exactness.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from flowtext import policies, schedules
from flowtext.errors import ConfigError, ShapeError
from flowtext.nn import FlowTransformer, FlowTransformerConfig
from flowtext.nn.latents import PRIOR_MAX_LOG_SNR, bind_prior_schedule
from flowtext.objectives import (
    autoregressive_loss,
    discrete_elbo,
    single_stream_loss,
    two_stream_loss,
)

from ._nets import perturbed_net, tiny, validate_and_decode
from .test_mixture import UnigramOracle, excess

F64 = torch.float64


def bayes_net(schedule="cosine", seed=0, vocab=8, d=4):
    """A network whose readout is zeroed, prior ``pi`` random: its logits are the prior's."""
    net = FlowTransformer(FlowTransformerConfig(**tiny(vocab_size=vocab, d_embed=d,
                                                       output_prior=True))).double().eval()  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        net.embedding.copy_(torch.randn(vocab, d, generator=g, dtype=F64))
        net.prior_logits.copy_(1.5 * torch.randn(vocab, generator=g, dtype=F64))
        net.readout.weight.zero_()
        net.readout.bias.zero_()
    sched = schedules.get(schedule)
    bind_prior_schedule(net, sched)
    log_pi = torch.log_softmax(net.prior_logits.detach(), 0)
    oracle = UnigramOracle(log_pi, net.embedding_table().detach(), sched)
    return net, oracle, sched, log_pi


def unigram_tokens(log_pi, rows, length, seed):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.multinomial(log_pi.exp(), rows * length, True, generator=g)
    return tokens.view(rows, length), g


def prior_net(seed, schedule="cosine", **overrides):
    """A perturbed tiny network with the output prior on, bound to ``schedule``."""
    net = perturbed_net(seed, overrides.pop("scale", 0.2), output_prior=True, **overrides)
    bind_prior_schedule(net, schedules.get(schedule))
    return net


# ------------------------------------------------------------------------ the prior itself


@pytest.mark.parametrize("schedule", ["cosine", "linear", "vp"])
def test_zeroed_readout_gives_the_exact_bayes_posterior(schedule):
    net, oracle, sched, log_pi = bayes_net(schedule)
    tokens, g = unigram_tokens(log_pi, 4, 16, 1)
    t = torch.rand(4, 16, generator=g, dtype=F64)
    t[:, :2] = torch.tensor([0.0, 1.0], dtype=F64)  # committed and pure-noise tokens
    t = torch.where(sched.log_snr(t) > PRIOR_MAX_LOG_SNR, 0.5, t)  # below the cap: exact
    x = net.embed(tokens)
    z = sched.alpha(t)[..., None] * x + sched.sigma(t)[..., None] * torch.randn(x.shape, generator=g, dtype=F64)  # fmt: skip
    with torch.no_grad():
        got = torch.log_softmax(net(z, t, torch.zeros_like(tokens)).logits, -1)
    want = torch.log_softmax(oracle(z, t, None, None).logits, -1)
    want[:, 1] = log_pi  # t = 1: z is not read, the law of a token no state informs
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
    # the commit cross-entropy is the exact posterior's
    ce = F.cross_entropy(got.transpose(1, 2), tokens, reduction="none")
    torch.testing.assert_close(ce, -want.gather(-1, tokens[..., None])[..., 0], rtol=0, atol=1e-9)


def test_above_the_log_snr_cap_the_prior_is_finite_and_one_hot():
    net, _, sched, log_pi = bayes_net()
    tokens, _ = unigram_tokens(log_pi, 2, 8, 2)
    lam = torch.tensor([PRIOR_MAX_LOG_SNR + 2.0, 60.0], dtype=F64)
    t = sched.t_from_log_snr(lam).repeat(2, 4)
    x = net.embed(tokens)
    z = sched.alpha(t)[..., None] * x + sched.sigma(t)[..., None] * torch.randn_like(x)
    with torch.no_grad():
        logits = net(z, t, torch.zeros_like(tokens)).logits
    assert bool(torch.isfinite(logits).all())
    ce = F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none")
    assert float(ce.max()) < 1e-6


def test_the_prior_needs_a_schedule_and_a_bool_flag():
    net = FlowTransformer(FlowTransformerConfig(**tiny(output_prior=True)))
    z, t, o = torch.zeros(1, 3, 8), torch.full((1, 3), 0.5), torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ConfigError, match="bind_prior_schedule"):
        net(z, t, o)
    with pytest.raises(ConfigError, match="output_prior"):
        FlowTransformerConfig(**tiny(output_prior=1))
    plain = FlowTransformer(FlowTransformerConfig(**tiny()))
    assert plain.log_prior() is None and "prior_logits" not in plain.state_dict()


# --------------------------------------------------------- bounds: parametrization change only


@pytest.mark.parametrize(
    ("policy", "kwargs", "steps"),
    [("synchronous", {}, 1), ("synchronous", {}, 4), ("block", {"size": 4}, 8),
     ("diagonal", {"width": 0.5}, 16)],
)  # fmt: skip
def test_zeroed_readout_mixture_bound_is_the_oracle_bound_and_the_entropy(policy, kwargs, steps):
    net, oracle, sched, log_pi = bayes_net(seed=steps)
    tokens, _ = unigram_tokens(log_pi, 512, 8, steps)
    grid = policies.get(policy, **kwargs).grid(8, steps, dtype=F64)
    with torch.no_grad():
        got = discrete_elbo(net, tokens, grid, sched, generator=torch.Generator().manual_seed(0),
                            reverse="mixture")  # fmt: skip
        want = discrete_elbo(oracle, tokens, grid, sched, reverse="mixture",
                             generator=torch.Generator().manual_seed(0))  # fmt: skip
    # the same draws: equal wherever no state lies above the cap (there both are ~0)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    m, se = excess(got, -log_pi[tokens])
    assert abs(m) < 4.5 * se + 1e-9, (m, se)


def test_zeroed_readout_ar_bound_is_exactly_minus_log_pi():
    """The next-token readout of a committed token adds ``log pi`` of the token it predicts."""
    net, _, sched, log_pi = bayes_net()
    tokens, _ = unigram_tokens(log_pi, 3, 9, 3)
    with torch.no_grad():
        ar = autoregressive_loss(net, tokens, sched).nats
        two = two_stream_loss(net, tokens, sched, block_size=3, steps_per_block=1).nats
    want = -log_pi[tokens] + (ar - ar.detach())  # prior_kl is ~1e-33 under cosine
    torch.testing.assert_close(ar, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(two, want, rtol=0, atol=1e-12)


def test_zeroed_readout_estimators_are_unbiased_for_the_entropy():
    net, _, sched, log_pi = bayes_net(seed=5)
    tokens, g = unigram_tokens(log_pi, 2048, 8, 5)
    grid = policies.get("block", size=4).grid(8, 8, dtype=F64)
    with torch.no_grad():
        single = single_stream_loss(net, tokens, grid, sched, generator=g, reverse="mixture")
        two = two_stream_loss(net, tokens, sched, block_size=4, steps_per_block=4, generator=g,
                              reverse="mixture")  # fmt: skip
    for terms in (single, two):
        m, se = excess(terms.nats, -log_pi[tokens])
        assert abs(m) < 4.5 * se, (m, se)


def test_gradients_reach_the_prior_and_the_table():
    net = prior_net(0, scale=0.05)
    tokens = torch.randint(0, 13, (2, 8), generator=torch.Generator().manual_seed(0))
    loss = two_stream_loss(net, tokens, schedules.get("cosine"), block_size=4, steps_per_block=4,
                           generator=torch.Generator().manual_seed(1), reverse="mixture")  # fmt: skip
    loss.nats.mean().backward()
    assert float(net.prior_logits.grad.abs().sum()) > 0
    assert float(net.embedding.grad.abs().sum()) > 0


# ------------------------------------------------------------ decoding (reruns: test_option_reruns)


def test_commit_forward_reads_the_next_token_prior():
    net = prior_net(3)
    b, n = 2, 5
    x = net.embed(torch.randint(0, 13, (b, n)))
    o = torch.arange(n).expand(b, n)
    t = torch.zeros(b, n, dtype=F64)
    with torch.no_grad():
        full = net(x, t, o).logits
        out, _ = net.commit_forward(net.new_cache(b), (x[:, :3], o[:, :3], torch.arange(3)),
                                    x[:, 3:], t[:, 3:], o[:, 3:], torch.arange(3, n),
                                    readout=torch.tensor([2, 1]))  # fmt: skip
    torch.testing.assert_close(out.next_logits, full[[0, 1], [2, 1]], rtol=0, atol=1e-10)


# ----------------------------------------------------------- what is sampled is what is scored


@pytest.mark.parametrize(
    ("policy", "solver", "steps"),
    [("autoregressive", "ancestral", 8), ("synchronous", "ancestral-mixture", 4)],
)
def test_the_decoder_samples_the_bayes_posterior_it_scores(policy, solver, steps):
    """The zeroed-readout network is the exact posterior of i.i.d. ``pi`` tokens, and the
    mixture sampler (and AR) with the exact posterior draws the data law: token frequencies
    match ``pi`` (a chi-square test). Without the prior in the decoder they are uniform."""
    from flowtext.decoding import generate

    net, _, sched, log_pi = bayes_net(seed=7)
    res = generate(net, sched, batch_size=512, length=8, policy=policy, steps=steps,
                   solver=solver, generator=torch.Generator().manual_seed(0))  # fmt: skip
    counts = torch.bincount(torch.tensor(res.tokens).flatten(), minlength=8).to(F64)
    expected = counts.sum() * log_pi.exp()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 7 + 5 * math.sqrt(2 * 7), chi2  # 7 degrees of freedom, far in the tail


# ------------------------------------------------------------------ the pretrained backbone


def test_the_pretrained_backbone_adds_the_same_prior():
    """Zero-initialized, the prior is uniform (the pretrained readout unchanged); perturbed, the
    logits are the pretrained readout plus ``prior(z, t)``, and a committed token's readout
    (``commit_forward``) adds ``log pi`` as its own output does."""
    tf = pytest.importorskip("transformers", reason="the hf extra is not installed")
    from flowtext.nn.hf_backbone import AdapterConfig, PretrainedBackbone

    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=40, n_embd=32, n_layer=2, n_head=2, n_positions=32,
                        bos_token_id=1, eos_token_id=2)  # fmt: skip
    lm = tf.AutoModelForCausalLM.from_config(cfg)
    net = PretrainedBackbone(lm, AdapterConfig(d_embed=8, cond_dim=16, output_prior=True))
    net = net.double().eval()
    bind_prior_schedule(net, schedules.get("cosine"))
    tokens = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(1))
    x, o = net.embed(tokens), torch.arange(6).expand(2, 6)
    t = torch.tensor([0.0, 0.0, 0.0, 0.3, 0.7, 1.0], dtype=F64).expand(2, 6)
    z = torch.where((t == 0)[..., None], x, 0.6 * x + 0.5 * torch.randn_like(x))
    with torch.no_grad():
        out = net(z, t, o)
        readout = net.lm.get_output_embeddings()(out.hidden)
        torch.testing.assert_close(out.logits[:, :3] - readout[:, :3], torch.full_like(readout[:, :3], -math.log(40)))  # fmt: skip
        net.prior_logits.normal_()
        out = net(z, t, o)
        readout = net.lm.get_output_embeddings()(out.hidden)
        torch.testing.assert_close(out.logits, readout + net.prior(z, t), rtol=0, atol=1e-10)
        got, _ = net.commit_forward(net.new_cache(2), (x[:, :3], o[:, :3], o[:, :3]), z[:, 3:],
                                    t[:, 3:], o[:, 3:], o[:, 3:], readout=torch.tensor([2, 0]))  # fmt: skip
    torch.testing.assert_close(got.logits, out.logits[:, 3:], rtol=0, atol=1e-10)
    torch.testing.assert_close(got.next_logits, out.logits[[0, 1], [2, 0]], rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------- in training


def test_a_flow_lm_with_the_output_prior_trains_validates_and_decodes():
    from flowtext.lm import FlowLM
    from flowtext.regime import TrainingRegime

    torch.manual_seed(0)
    model = FlowLM(
        net=FlowTransformerConfig(**tiny(output_prior=True)),
        regime=TrainingRegime(block_sizes=(0, 4), steps_per_block=4, reverse="mixture"),
        schedule="info-uniform",
        schedule_kwargs={"n_bins": 16},
        val_block_size=4,
        val_steps_per_block=4,
    )
    tokens = torch.randint(0, 13, (4, 12))
    loss, _ = model.training_loss(tokens)
    loss.backward()
    assert model.net.prior_schedule is model.schedule  # the fitted warp itself, not a copy
    assert float(model.net.prior_logits.grad.abs().sum()) > 0
    assert "net.prior_logits" in model.state_dict()
    validate_and_decode(model, tokens, policy="block", policy_kwargs={"size": 3})


# ----------------------------------------------------------- the prior from the data's counts


def _skewed_corpus(tmp_path, **kwargs):
    """A byte-tokenized data module over a text whose letters have very unequal frequencies."""
    import random

    from flowtext.data import FlowTextDataModule

    rng = random.Random(0)
    path = tmp_path / "skewed.txt"
    path.write_text("".join(rng.choice("aaaaaaaabbbbcc d\n") for _ in range(4000)))
    return FlowTextDataModule(str(path), seq_len=12, batch_size=4, train_samples_per_epoch=16,
                              cache_dir=str(tmp_path / "cache"), **kwargs)  # fmt: skip


def _train_split_counts(dm):
    import numpy as np

    from flowtext.data import open_tokens

    ids = np.asarray(open_tokens(dm._prepare("train"))[0], dtype=np.int64)
    return torch.from_numpy(np.bincount(ids, minlength=dm.vocab_size))


def test_token_counts_read_the_training_split_or_a_bounded_spread_of_it(tmp_path):
    from flowtext.data import FlowTextDataModule

    dm = _skewed_corpus(tmp_path)
    dm.prepare_data()
    full = _train_split_counts(dm)
    assert torch.equal(dm.token_counts(), full)  # a small split is read whole
    part = dm.token_counts(max_tokens=640)  # 64 runs of 10 tokens
    assert int(part.sum()) == 640 and bool((part <= full).all())
    assert int(part.argmax()) == int(full.argmax())
    task = FlowTextDataModule("addition", seq_len=16, train_samples_per_epoch=5)
    assert int(task.token_counts(max_tokens=10_000).sum()) == 5 * 16  # at most an epoch
    assert int(task.token_counts(max_tokens=40).sum()) == 2 * 16
    with pytest.raises(ConfigError, match="max_tokens"):
        dm.token_counts(max_tokens=0)


class _PriorAtStart(__import__("lightning").Callback):
    """Records ``prior_logits`` when training starts (after setup and any restore)."""

    def on_train_start(self, trainer, pl_module):
        logits = getattr(pl_module.net, "prior_logits", None)
        self.seen = None if logits is None else logits.detach().clone()


def _fit(model, dm, steps, ckpt_path=None):
    import lightning as L

    start = _PriorAtStart()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[start])  # fmt: skip
    trainer.fit(model, dm, ckpt_path=ckpt_path)
    return trainer, start.seen


def _prior_lm(**kwargs):
    from functools import partial

    from flowtext.lm import FlowLM

    torch.manual_seed(0)
    net = FlowTransformerConfig(**tiny(vocab_size=259, output_prior=kwargs.pop("prior", True)))
    return FlowLM(net=net, optimizer=partial(torch.optim.AdamW, lr=0.05), warmup_steps=0,
                  **kwargs)  # fmt: skip


def test_a_fit_from_scratch_starts_the_prior_at_the_smoothed_log_unigram_law(tmp_path):
    dm = _skewed_corpus(tmp_path)
    model = _prior_lm()
    _, seen = _fit(model, dm, 1)
    counts = _train_split_counts(dm).double()
    want = torch.log((counts + 1) / (counts.sum() + 259))
    torch.testing.assert_close(seen.double(), want, rtol=0, atol=1e-6)
    # a law already: log pi is the smoothed frequencies, the commonest byte the likeliest
    torch.testing.assert_close(torch.log_softmax(seen.double(), 0), want, rtol=0, atol=1e-6)
    assert int(seen.argmax()) == int(counts.argmax())


def test_a_resumed_or_reloaded_fit_keeps_the_trained_prior(tmp_path):
    from flowtext.lm import FlowLM

    dm = _skewed_corpus(tmp_path)
    trainer, init = _fit(_prior_lm(), dm, 3)
    ckpt = tmp_path / "three.ckpt"
    trainer.save_checkpoint(ckpt)
    trained = torch.load(ckpt, weights_only=False)["state_dict"]["net.prior_logits"]
    assert not torch.allclose(trained, init)  # three steps moved it off the data's law
    _, resumed = _fit(_prior_lm(), _skewed_corpus(tmp_path), 4, ckpt_path=str(ckpt))
    torch.testing.assert_close(resumed, trained, rtol=0, atol=0)
    reloaded = FlowLM.load_from_checkpoint(ckpt)  # weights loaded, then a fresh fit
    _, tuned = _fit(reloaded, _skewed_corpus(tmp_path), 1)
    torch.testing.assert_close(tuned, trained, rtol=0, atol=0)


def test_the_prior_off_or_uniform_is_left_alone(tmp_path, monkeypatch):
    from flowtext.data import FlowTextDataModule

    def never(self, *args, **kwargs):
        raise AssertionError("token_counts read without a prior to start")

    _, uniform = _fit(_prior_lm(prior_init="uniform"), _skewed_corpus(tmp_path), 1)
    assert not bool(uniform.any())
    monkeypatch.setattr(FlowTextDataModule, "token_counts", never)
    model = _prior_lm(prior=False)
    _, seen = _fit(model, _skewed_corpus(tmp_path), 1)
    assert seen is None and not any("prior" in k for k in model.state_dict())
    with pytest.raises(ConfigError, match="prior_init"):
        _prior_lm(prior_init="zipf")
    with pytest.raises(ConfigError, match="output prior is off"):
        model.net.init_prior_from_counts(torch.ones(259))
    with pytest.raises(ShapeError, match="vocab_size=259"):
        _prior_lm().net.init_prior_from_counts(torch.ones(258))
