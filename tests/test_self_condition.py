"""Self-conditioning (docs/theory.md §3g): the two-pass denoiser ``f(z, sg(x_hat(f(z, 0))))``.

Off, nothing changes; on with the zero-initialized projection, every output is the plain
network's. With a perturbed projection every bound (exact, both estimators, both reverse steps)
is the bound of the two-pass denoiser, written out here independently as :class:`TwoPass`; the
estimators stay unbiased, the bound stays above a toy's entropy, T2 and the cache exactness hold,
no gradient flows through the estimate, and a model trains with the option on.
"""

import dataclasses
import math

import pytest
import torch

from flowtext import policies, schedules
from flowtext.decoding import generate
from flowtext.errors import ConfigError, ShapeError
from flowtext.nn import FlowTransformer, FlowTransformerConfig
from flowtext.objectives import (
    _self_cond,
    autoregressive_loss,
    block_grid,
    discrete_elbo,
    single_stream_loss,
    two_stream_loss,
    with_t_min,
)
from flowtext.visibility import LIVE

from . import test_nn
from ._nets import perturbed_net, tiny, validate_and_decode
from .test_mixture import excess

F64 = torch.float64
SCHED = schedules.get("cosine")


def sc_net(seed=0, proj=1.0, **overrides):
    """A perturbed tiny float64 network with self-conditioning and a projection of scale
    ``proj`` (large enough that the two-pass and the one-pass denoisers differ clearly)."""
    net = perturbed_net(seed, overrides.pop("scale", 0.2), self_condition=True, **overrides)
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        net.self_cond_proj.copy_(proj * torch.randn(net.self_cond_proj.shape, generator=g,
                                                    dtype=F64))  # fmt: skip
    return net


class TwoPass(torch.nn.Module):
    """The two-pass denoiser written out with the explicit-estimate API (the reference).

    Its config says ``self_condition=False``, so the objectives treat it as a plain network
    and read exactly what ``__call__`` returns; ``passes=1`` gives the one-pass denoiser.
    """

    def __init__(self, net, passes=2):
        super().__init__()
        self.net, self.passes = net, passes
        self.config = dataclasses.replace(net.config, self_condition=False)

    def embed(self, tokens):
        return self.net.embed(tokens)

    def embedding_table(self):
        return self.net.embedding_table()

    def x0_hat(self, logits):
        return self.net.x0_hat(logits)

    def forward(self, z, t, o, positions=None, cache=None):
        first = self.net(z, t, o, positions, cache, self_cond=False)
        if self.passes == 1:
            return first
        estimate = self.net.x0_hat(first.logits).detach()
        return self.net(z, t, o, positions, cache, self_cond=estimate)


def random_state(seed, b=2, n=7):
    g = torch.Generator().manual_seed(seed)
    z, t, o = test_nn.random_state(g, b, n)
    t[:, 0], o[:, 0] = 1.0, LIVE  # a noise token, a committed token, live ones
    t[:, 1], o[:, 1] = 0.0, 0
    t[:, 2], o[:, 2] = 0.5, LIVE
    return z, t, o


# ------------------------------------------------------------------ off, and zero-initialized


def test_off_has_no_projection_and_rejects_an_estimate():
    net = perturbed_net()
    assert not any("self_cond" in name for name in net.state_dict())
    z, t, o = random_state(0)
    ref = net(z, t, o)
    for flag in (True, False):  # read only with the option on
        assert torch.equal(net(z, t, o, self_cond=flag).logits, ref.logits)
    with pytest.raises(ConfigError, match="self_condition"):
        net(z, t, o, self_cond=torch.zeros_like(z))
    with pytest.raises(ConfigError, match="self_condition"):
        FlowTransformerConfig(**tiny(self_condition=1))
    with pytest.raises(ShapeError, match="estimate"):
        sc_net()(z, t, o, self_cond=torch.zeros(2, 7, 3, dtype=F64))


def test_zero_initialized_projection_gives_the_plain_network_bit_for_bit():
    """Same seed: every other weight is drawn as without the option, and the outputs, bounds
    and samples are identical (the projection is registered last and starts at zero)."""
    torch.manual_seed(3)
    plain = FlowTransformer(FlowTransformerConfig(**tiny()))
    torch.manual_seed(3)
    on = FlowTransformer(FlowTransformerConfig(**tiny(self_condition=True)))
    assert float(on.self_cond_proj.detach().abs().max()) == 0.0
    for name, p in plain.named_parameters():
        assert torch.equal(p, on.get_parameter(name)), name
    z, t, o = (x.float() if x.is_floating_point() else x for x in random_state(1))
    a, b = plain(z, t, o), on(z, t, o)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.difficulty, b.difficulty)
    assert torch.equal(plain.null_logits(), on.null_logits())
    tokens = torch.randint(0, 13, (4, 8), generator=torch.Generator().manual_seed(0))
    for reverse in ("gaussian", "mixture"):
        x, y = (discrete_elbo(n, tokens, block_grid(8, 4, 2), SCHED, reverse=reverse,
                              generator=torch.Generator().manual_seed(1)) for n in (plain, on))  # fmt: skip
        assert torch.equal(x, y)
    plain.train(), on.train()  # the training coin is drawn, yet the one pass equals the two
    x, y = (two_stream_loss(n, tokens, SCHED, block_size=4, steps_per_block=2,
                            generator=torch.Generator().manual_seed(2)).nats for n in (plain, on))  # fmt: skip
    assert torch.equal(x, y)
    res = [
        generate(
            n.eval(),
            "cosine",
            batch_size=2,
            length=6,
            policy="block",
            policy_kwargs={"size": 3},
            steps=4,
            solver="ancestral-mixture",
            generator=torch.Generator().manual_seed(4),
        )  # fmt: skip
        for n in (plain, on)
    ]
    assert res[0].tokens == res[1].tokens
    assert res[1].stats.nfe == 2 * res[0].stats.nfe  # a self-conditioned evaluation is 2 passes


# -------------------------------------------------------------------- the two-pass denoiser


def test_forward_is_the_two_pass_denoiser_and_committed_tokens_ignore_it():
    net = sc_net()
    z, t, o = random_state(2)
    with torch.no_grad():
        out = net(z, t, o)
        want = TwoPass(net)(z, t, o)
        one = net(z, t, o, self_cond=False)
    torch.testing.assert_close(out.logits, want.logits, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.difficulty, want.difficulty, rtol=0, atol=1e-12)
    live, committed = t > 0, t == 0
    assert float((out.logits - one.logits)[live].abs().max()) > 1e-2  # the estimate matters
    assert torch.equal(out.logits[committed], one.logits[committed])  # ... only to live tokens


@pytest.mark.parametrize("reverse", ["gaussian", "mixture"])
def test_every_bound_is_the_two_pass_denoisers(reverse):
    """The exact bound and both estimators (evaluation mode) equal the reference's under the
    same draws; the one-pass denoiser's are different numbers (the check can fail)."""
    net = sc_net(1, vocab_size=11)
    tokens = torch.randint(0, 11, (3, 7), generator=torch.Generator().manual_seed(5))
    grid = with_t_min(policies.get("diagonal", width=0.5).grid(7, 8, dtype=F64), 0.1)

    def bounds(model):
        g = torch.Generator().manual_seed(6)
        with torch.no_grad():
            return [
                discrete_elbo(model, tokens, grid, SCHED, generator=g, reverse=reverse),
                single_stream_loss(
                    model, tokens, grid, SCHED, generator=g, reverse=reverse, ar=True
                ).nats,  # fmt: skip
                two_stream_loss(
                    model,
                    tokens,
                    SCHED,
                    block_size=3,
                    steps_per_block=4,
                    generator=g,
                    reverse=reverse,
                    ar=True,
                ).nats,  # fmt: skip
                two_stream_loss(
                    model,
                    tokens,
                    SCHED,
                    block_size=7,
                    steps_per_block=4,
                    generator=g,
                    reverse=reverse,
                ).nats,  # fmt: skip
                autoregressive_loss(model, tokens, SCHED).nats,  # the null query: two passes
            ]

    got, want, one = bounds(net), bounds(TwoPass(net)), bounds(TwoPass(net, passes=1))
    for a, b, c in zip(got, want, one, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
        assert float((a - c).abs().max()) > 1e-3


@pytest.mark.parametrize("reverse", ["gaussian", "mixture"])
def test_estimators_are_unbiased_for_the_exact_two_pass_bound(reverse):
    """T4-style: the estimators' means equal the exact K-step bound within standard errors."""
    net = sc_net(2, vocab_size=11)
    tokens = torch.randint(0, 11, (1, 6), generator=torch.Generator().manual_seed(7))
    rows = tokens.expand(256, -1)
    grid = block_grid(6, 3, 3, 0.2)
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        exact = discrete_elbo(net, rows, grid, SCHED, generator=g, reverse=reverse).sum(1)
        single = single_stream_loss(net, rows, grid, SCHED, generator=g, reverse=reverse)
        two = two_stream_loss(net, rows, SCHED, block_size=3, steps_per_block=3, t_min=0.2,
                              generator=g, reverse=reverse)  # fmt: skip
        one_pass = discrete_elbo(TwoPass(net, 1), rows, grid, SCHED, generator=g,
                                 reverse=reverse).sum(1)  # fmt: skip

    def mean_se(v):
        return v.mean().item(), v.std().item() / math.sqrt(v.numel())

    m, se = mean_se(exact)
    for est in (single.nats.sum(1), two.nats.sum(1)):
        me, see = mean_se(est)
        assert abs(me - m) < 4.5 * math.hypot(se, see), (me, see, m, se)
    m1, se1 = mean_se(one_pass)  # a different denoiser: far outside those errors
    assert abs(m1 - m) > 8 * math.hypot(se, se1), (m1, m)


def test_the_bound_stays_above_the_entropy_of_iid_tokens():
    """Any true bound of i.i.d. unigram tokens is >= their entropy; the self-conditioned
    network's mixture bound (a perturbed readout on the exact posterior) is, and it differs
    from the one-pass denoiser's."""
    from .test_output_prior import bayes_net, unigram_tokens

    torch.manual_seed(0)
    plain, _, sched, log_pi = bayes_net(seed=3)
    net = FlowTransformer(FlowTransformerConfig(**tiny(vocab_size=8, d_embed=4, output_prior=True,
                                                       self_condition=True))).double().eval()  # fmt: skip
    net.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        net.readout.weight.normal_(0, 0.3)
        for p in (*net.blocks.parameters(), net.self_cond_proj):
            p.add_(0.3 * torch.randn_like(p))
    net.prior_schedule = sched
    tokens, _ = unigram_tokens(log_pi, 512, 8, 9)
    grid = policies.get("synchronous").grid(8, 4, dtype=F64)
    with torch.no_grad():
        bound = discrete_elbo(net, tokens, grid, sched, reverse="mixture",
                              generator=torch.Generator().manual_seed(0))  # fmt: skip
        one = discrete_elbo(TwoPass(net, 1), tokens, grid, sched, reverse="mixture",
                            generator=torch.Generator().manual_seed(0))  # fmt: skip
    m, se = excess(bound, -log_pi[tokens])
    assert m > -4 * se, (m, se)
    assert float((bound - one).abs().max()) > 1e-3


# ---------------------------------------------------------------------------------- training


def test_training_draws_the_first_pass_half_the_time_and_evaluation_never_draws():
    net = sc_net()
    g = torch.Generator().manual_seed(0)
    net.train()
    heads = [_self_cond(net, g)["self_cond"] for _ in range(400)]
    assert 160 < sum(heads) < 240
    net.eval()
    state = g.get_state()
    assert _self_cond(net, g) == {} and torch.equal(g.get_state(), state)
    assert _self_cond(perturbed_net().train(), g) == {}  # off: nothing drawn
    assert torch.equal(g.get_state(), state)


def test_training_loss_is_the_second_pass_and_no_gradient_flows_through_the_estimate():
    """Per batch the training estimator is either the two-pass or the one-pass denoiser's;
    its gradients are those of the second pass with the estimate as a constant input."""
    net = sc_net(4, scale=0.05)
    tokens = torch.randint(0, 13, (4, 8), generator=torch.Generator().manual_seed(1))
    seen = set()
    for seed in range(6):
        net.train()
        net.zero_grad()
        got = two_stream_loss(net, tokens, SCHED, block_size=4, steps_per_block=4,
                              generator=torch.Generator().manual_seed(seed))  # fmt: skip
        got.nats.mean().backward()
        grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
        for passes in (1, 2):
            ref = TwoPass(net, passes)
            net.zero_grad()  # the coin is the last draw of the Gaussian two-stream estimator
            want = two_stream_loss(ref, tokens, SCHED, block_size=4, steps_per_block=4,
                                   generator=torch.Generator().manual_seed(seed))  # fmt: skip
            if torch.allclose(got.nats, want.nats, rtol=0, atol=1e-10):
                seen.add(passes)
                want.nats.mean().backward()
                for n, p in net.named_parameters():
                    gw = torch.zeros_like(p) if p.grad is None else p.grad
                    torch.testing.assert_close(grads.get(n, torch.zeros_like(p)), gw, rtol=1e-9,
                                               atol=1e-12, msg=n)  # fmt: skip
                assert (passes == 2) == bool(grads["self_cond_proj"].abs().sum() > 0)
                break
        else:
            raise AssertionError(f"seed {seed}: neither the one- nor the two-pass loss")
    assert seen == {1, 2}


def test_a_flow_lm_with_self_conditioning_trains_reproducibly_validates_and_decodes():
    from flowtext.lm import FlowLM
    from flowtext.regime import TrainingRegime

    tokens = torch.randint(0, 13, (8, 12), generator=torch.Generator().manual_seed(0))

    def run():
        torch.manual_seed(0)
        model = FlowLM(
            net=dataclasses.asdict(FlowTransformerConfig(**tiny(self_condition=True))),
            regime=TrainingRegime(block_sizes=(0, 4), steps_per_block=4, reverse="mixture"),
            val_block_size=4, val_steps_per_block=4,
        )  # fmt: skip
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        losses = []
        for _ in range(30):
            loss, _ = model.training_loss(tokens)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return model, losses

    model, losses = run()
    assert run()[1] == losses  # the coin comes from the model's seeded generator
    assert sum(losses[-5:]) < 0.9 * sum(losses[:5]), losses
    assert float(model.net.self_cond_proj.detach().abs().sum()) > 0  # it trained
    assert "net.self_cond_proj" in model.state_dict() and model.hparams["net"]["self_condition"]
    model.eval()
    res = validate_and_decode(model, tokens, policy="synchronous")
    assert res.stats.nfe == 8  # two passes per step


def test_the_cli_switch_reaches_the_network(tmp_path):
    from .test_configs import CONFIGS, cli_main

    args = ["--config", str(CONFIGS[0]), f"--trainer.default_root_dir={tmp_path}",
            "--model.init_args.net.self_condition=true"]  # fmt: skip
    cli = cli_main(args, run=False)
    assert cli.model.net.config.self_condition and hasattr(cli.model.net, "self_cond_proj")


def test_the_ablation_has_a_self_conditioning_switch(tmp_path, capsys):
    from experiments import ablate

    argv = ["--quick", "--out", str(tmp_path), "--families", "diffusion", "--self-condition", "on"]
    assert ablate.main(argv) == 0
    assert "| diffusion | mixture | cosine | on |" in capsys.readouterr().out
    rows = (tmp_path / "ablate.csv").read_text().splitlines()
    assert rows[0].split(",")[3] == "self_cond" and len(rows) == 1 + 4
