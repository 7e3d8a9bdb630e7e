"""The decoding engine: T2, cache exactness, batching, infilling, EOS, adaptive, errors, CLI."""

import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from flowtext import policies, solvers
from flowtext.attention import LIVE
from flowtext.decoding import Adaptive, GenerationResult, generate
from flowtext.errors import ConfigError, DataError, FlowtextError, ShapeError
from flowtext.nn import FlowOutput, FlowTransformerConfig

from ._nets import perturbed_net, tiny

V = 13
TINY = tiny(max_len=24)


def make_net(seed=0):
    return perturbed_net(seed, 0.2, **TINY)


NET = make_net()
SCHED = "cosine"


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------- T2
def ar_loop(net, prompt, length, *, greedy, generator=None, temperature=1.0):
    """A plain causal AR loop with a KV cache, written against the backbone API only.

    As a GPT decodes: feed the last token (a committed query against the cache of the ones
    before it), read the next token's logits there, cache it. Position 0 without a prompt reads
    the null query (``t = 1``, sees only itself).
    """
    b, p = prompt.shape
    d = net.config.d_embed
    one = torch.ones(b, 1, dtype=torch.float64)
    cache = net.new_cache(b)
    if p > 1:
        q = p - 1
        cache = net.commit(
            cache, net.embed(prompt[:, :q]), torch.arange(q).expand(b, q), torch.arange(q)
        )
    last = prompt[:, -1:] if p else None
    out = []
    with torch.no_grad():
        for i in range(length):
            if last is None:  # the null query at position 0
                zero = torch.zeros(b, 1, dtype=torch.long)
                logits = net(torch.zeros(b, 1, d, dtype=torch.float64), one, zero, zero).logits
            else:
                pos = torch.full((b, 1), p + i - 1)
                z = net.embed(last)
                logits = net(z, 0 * one, pos, positions=pos, cache=cache).logits
                cache = net.commit(cache, z, pos, pos)
            logits = logits[:, 0]
            if greedy:
                x = logits.argmax(-1)
            else:
                probs = torch.softmax(logits / temperature, -1)
                x = torch.multinomial(probs, 1, generator=generator)[:, 0]
            last = x[:, None]
            out.append(x)
    return torch.stack(out, 1)


@pytest.mark.parametrize("greedy", [True, False])
@pytest.mark.parametrize("p", [0, 3])
def test_t2_autoregressive_equals_causal_ar_loop(greedy, p):
    torch.manual_seed(11)
    b, length = 3, 10
    prompt = torch.randint(0, V, (b, p))
    want = ar_loop(NET, prompt, length, greedy=greedy, generator=gen(5), temperature=0.8)
    res = generate(
        NET,
        SCHED,
        prompt=prompt if p else None,
        batch_size=b,
        length=length,
        policy="autoregressive",
        steps=length,
        greedy=greedy,
        temperature=0.8,
        generator=gen(5),
    )
    assert res.tokens == want.tolist()
    per = 2 if NET.config.self_condition else 1  # a self-conditioned net runs two passes
    assert res.stats.nfe == per * length and res.stats.passes == per * length  # commits fused
    assert res.stats.tokens_per_eval == pytest.approx(1.0 / per)
    # tokens differ from a decoder whose positions are off by one (the test can fail)
    shifted = ar_loop(NET, torch.randint(0, V, (b, p + 1)), length, greedy=True)
    assert shifted.tolist() != want.tolist() or not greedy


# --------------------------------------------------------------------------- cache exactness
STATIC_CASES = [
    ("autoregressive", {}, 8),
    ("block", {"size": 4}, 8),
    ("diagonal", {"width": 0.3}, 8),
    ("synchronous", {}, 6),
    ("adaptive", {}, 8),
    ("adaptive", {"signal": "difficulty", "threshold": 0.3, "window": 3}, 5),
]


def test_cases_cover_every_registered_policy():
    assert {name for name, _, _ in STATIC_CASES} == set(policies.names())


@pytest.mark.parametrize("name,kwargs,steps", STATIC_CASES)
@pytest.mark.parametrize(
    "solver,greedy",
    [
        ("euler", True),
        ("heun", False),
        ("midpoint", False),
        ("rk4", False),
        ("ancestral", False),
        ("ancestral-mixture", False),
    ],
)
def test_cached_equals_uncached(name, kwargs, steps, solver, greedy):
    outs = []
    for use_cache in (True, False):
        outs.append(
            generate(
                NET,
                SCHED,
                prompt=[[1, 2, 3], [4], [5, 6]],
                length=8,
                policy=name,
                policy_kwargs=kwargs,
                steps=steps,
                solver=solver,
                greedy=greedy,
                generator=gen(3),
                use_cache=use_cache,
                record=True,
            )
        )
    a, b = outs
    assert a.tokens == b.tokens
    assert torch.equal(a.commit_order, b.commit_order)
    torch.testing.assert_close(a.times, b.times, atol=1e-9, rtol=0)
    assert a.stats.nfe == b.stats.nfe
    assert all(len(r) == 8 for r in a.tokens)


# ------------------------------------------------------------------------------- batching
@pytest.mark.parametrize(
    "name,kwargs,steps,solver",
    [
        ("autoregressive", {}, 6, "euler"),
        ("synchronous", {}, 4, "ancestral"),
        ("adaptive", {"threshold": 0.5}, 6, "euler"),
    ],
)
def test_batched_equals_one_by_one(name, kwargs, steps, solver):
    prompts = [[1, 2, 3, 4, 5], [6], [], [7, 8]]
    common = dict(length=6, policy=name, policy_kwargs=kwargs, steps=steps, solver=solver)
    batched = generate(
        NET, SCHED, prompt=prompts, generator=[gen(10 + i) for i in range(4)], **common
    )
    for i, p in enumerate(prompts):
        single = generate(NET, SCHED, prompt=[p], generator=[gen(10 + i)], **common)
        assert single.tokens[0] == batched.tokens[i]
        assert torch.equal(single.commit_order[0], batched.commit_order[i])
    padded = torch.tensor([p + [0] * (5 - len(p)) for p in prompts])
    again = generate(
        NET,
        SCHED,
        prompt=padded,
        prompt_lengths=torch.tensor([len(p) for p in prompts]),
        generator=[gen(10 + i) for i in range(4)],
        **common,
    )
    assert again.tokens == batched.tokens
    ids, lengths = batched.padded(pad_id=-7)
    assert ids.shape == (4, 6) and lengths.tolist() == [6] * 4


# ------------------------------------------------------------------------------- infilling
@pytest.mark.parametrize(
    "name,steps", [("synchronous", 4), ("autoregressive", 10), ("adaptive", 6)]
)
def test_fixed_tokens_are_never_changed_and_the_rest_is_filled(name, steps):
    fixed = {0: 3, 1: 4, 5: 7, 8: 9, 9: 10}  # prefix, middle, suffix
    res = generate(
        NET,
        SCHED,
        prompt=[[1, 2], [5]],
        length=10,
        policy=name,
        steps=steps,
        fixed=fixed,
        generator=gen(0),
        record=True,
    )
    for row in res.tokens:
        assert len(row) == 10
        assert all(row[p] == v for p, v in fixed.items())
    free = [p for p in range(10) if p not in fixed]
    assert bool((res.commit_order[:, list(fixed)] == 0).all())
    assert bool((res.commit_order[:, free] > 0).all())
    assert bool((res.times[:, :, list(fixed)] == 0).all())  # committed from the start
    # AR over a region with fixed tokens skips their steps: one evaluation per free token
    if name == "autoregressive":
        assert res.stats.nfe == len(free)
    # per-row tensor constraints
    f = torch.full((2, 10), -1)
    f[0, 4], f[1, 2] = 11, 12
    res2 = generate(NET, SCHED, prompt=[[1], [2]], length=10, policy=name, steps=steps, fixed=f)
    assert res2.tokens[0][4] == 11 and res2.tokens[1][2] == 12


# ------------------------------------------------------------------------------------ EOS
@pytest.mark.parametrize("use_cache", [True, False])
def test_eos_stops_each_row_on_its_own(use_cache):
    prompts = [[1, 2], [3], [4, 5, 6]]
    common = dict(length=12, policy="autoregressive", greedy=True, use_cache=use_cache)
    full = generate(NET, SCHED, prompt=prompts, **common)
    eos = full.tokens[0][3]
    res = generate(NET, SCHED, prompt=prompts, eos_id=eos, **common)
    for b in range(3):
        row = full.tokens[b]
        cut = row.index(eos) if eos in row else len(row)
        assert res.tokens[b] == row[:cut]
        assert res.eos[b] == (eos in row)
        assert eos not in res.tokens[b]
    assert res.eos[0]
    # a stopped row is no longer evaluated or committed
    assert res.stats.committed == sum(
        min(len(r), r.index(eos) + 1 if eos in r else 99) for r in full.tokens
    )
    # synchronous: EOS anywhere drops the rest of the row
    sync = generate(
        NET,
        SCHED,
        prompt=prompts,
        length=12,
        policy="synchronous",
        steps=4,
        greedy=True,
        eos_id=eos,
    )
    for row in sync.tokens:
        assert eos not in row


class Wrapped(nn.Module):
    """A network around ``net``: its latents, cache and commits, and no ``commit_forward``.

    Subclasses give ``forward``; without ``embedding_table`` the decoder reads no table.
    """

    def __init__(self, net):
        super().__init__()
        self.inner, self.config = net, net.config

    def embed(self, tokens):
        return self.inner.embed(tokens)

    def x0_hat(self, logits):
        return self.inner.x0_hat(logits)

    def new_cache(self, b, **kw):
        return self.inner.new_cache(b, **kw)

    def commit(self, cache, z, o, positions):
        return self.inner.commit(cache, z, o, positions)


# -------------------------------------------------------------------------------- adaptive
class OneHotStub(Wrapped):
    """A network whose readout is certain about the leftmost live token, uniform elsewhere."""

    def __init__(self, net):
        super().__init__(net)
        self.calls = 0
        self.raise_at = None

    def forward(self, z, t, o, positions=None, cache=None):
        self.calls += 1
        if self.raise_at is not None and self.calls >= self.raise_at:
            raise KeyboardInterrupt
        b, n, _ = z.shape
        pos = positions.expand(b, n) if positions.ndim == 1 else positions
        live = t > 0
        first = torch.where(live, pos, 10**9).amin(1, keepdim=True)
        sure = live & (pos == first)
        certain = torch.nn.functional.one_hot(pos % V, V).to(z.dtype) * 50.0  # token pos % V
        logits = torch.where(sure[..., None], certain, torch.zeros_like(certain))
        # a committed token's readout predicts the next one (the next-token readout)
        following = torch.nn.functional.one_hot((pos + 1) % V, V).to(z.dtype) * 50.0
        logits = torch.where((t == 0)[..., None], following, logits)
        difficulty = torch.where(sure, 0.0, 10.0).to(z.dtype)
        return FlowOutput(logits=logits, difficulty=difficulty, hidden=None)


@pytest.mark.parametrize("signal", ["entropy", "difficulty"])
@pytest.mark.parametrize("window", [1, 4])
def test_adaptive_with_one_hot_confidence_is_autoregressive(signal, window):
    stub = OneHotStub(NET)
    length = 7
    res = generate(
        stub,
        SCHED,
        prompt=[[1, 2], [3, 4]],
        length=length,
        policy=Adaptive(signal=signal, window=window),
        steps=length,
        record=True,
        greedy=True,
    )
    ar_grid = policies.get("autoregressive").grid(length, length, dtype=torch.float64)
    torch.testing.assert_close(res.times, ar_grid[:, None].expand(-1, 2, -1), atol=0, rtol=0)
    assert res.commit_order.tolist() == [list(range(1, length + 1))] * 2
    assert res.tokens[0] == [(2 + i) % V for i in range(length)]


@pytest.mark.parametrize("steps", [3, 5, 12])
@pytest.mark.parametrize("max_commits", [None, 2])
def test_adaptive_guards(steps, max_commits):
    length = 10
    pol = Adaptive(threshold=0.6, rate=0.3, window=4, max_commits=max_commits)
    res = generate(
        NET,
        SCHED,
        prompt=[[1], [2, 3]],
        length=length,
        policy=pol,
        steps=steps,
        generator=gen(1),
        record=True,
    )
    times = res.times
    assert bool((times[1:] <= times[:-1]).all())  # monotone
    assert bool((times[-1] == 0).all()) and res.stats.steps <= steps  # within the budget
    commits = (times[1:] == 0) & (times[:-1] > 0)
    per_step = commits.sum(-1)  # [S, B]
    assert bool((per_step >= 1).all())  # at least one commit per step and row
    if max_commits is not None and steps >= length:
        assert bool((per_step <= max_commits).all())
    assert all(len(r) == length for r in res.tokens)


def test_adaptive_commits_several_tokens_when_confident():
    stub_conf = Adaptive(threshold=0.01, window=5)
    res = generate(
        NET, SCHED, prompt=[[1, 2]], length=10, policy=stub_conf, steps=10, generator=gen(0)
    )
    assert res.stats.tokens_per_eval > 1.5 and res.stats.nfe < 10


def test_adaptive_bad_knobs():
    for kw in (
        {"signal": "nope"},
        {"threshold": 0},
        {"rate": -1},
        {"window": 0},
        {"t_min": 1.0},
        {"max_commits": 0},
    ):
        with pytest.raises(ConfigError):
            Adaptive(**kw)
    assert not policies.get("adaptive").static


# ------------------------------------------------------------------------------- interrupts
def test_keyboard_interrupt_returns_partial_result():
    stub = OneHotStub(NET)
    stub.raise_at = 4
    res = generate(stub, SCHED, prompt=[[1, 2]], length=8, policy="autoregressive", greedy=True)
    assert isinstance(res, GenerationResult) and res.interrupted
    assert res.tokens == [[2, 3, 4]]
    assert res.stats.committed == 3


# ------------------------------------------------------------------------------- sampling
def test_tiny_top_p_and_zero_temperature_are_greedy():
    common = dict(prompt=[[1, 2, 3]], length=6, policy="autoregressive")
    g = generate(NET, SCHED, greedy=True, **common).tokens
    assert generate(NET, SCHED, top_p=1e-9, generator=gen(0), **common).tokens == g
    assert generate(NET, SCHED, temperature=0, **common).tokens == g
    a = generate(NET, SCHED, generator=gen(0), temperature=3.0, **common).tokens
    b = generate(NET, SCHED, generator=gen(0), temperature=3.0, **common).tokens
    assert a == b  # seeded


# ---------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        (dict(prompt=[list(range(10)) * 2]), ConfigError, "max_len"),
        (dict(steps=0), ConfigError, "steps"),
        (dict(length=0), ConfigError, "length"),
        (dict(policy="nope"), ConfigError, "valid names"),
        (dict(temperature=-1.0), ConfigError, "temperature"),
        (dict(top_p=0.0), ConfigError, "top_p"),
        (dict(top_p=1.5), ConfigError, "top_p"),
        (dict(prompt=[[1, 99]]), DataError, "vocabulary"),
        (dict(prompt=[[-1]]), DataError, "vocabulary"),
        (dict(fixed={0: 50}), DataError, "vocabulary"),
        (dict(fixed={9: 1}), ConfigError, "generated region"),
        (dict(eos_id=V), ConfigError, "eos_id"),
        (dict(policy="block", policy_kwargs={"size": 3}, steps=5), ConfigError, "multiple"),
        (dict(solver="torchdiffeq"), ConfigError, "Runge"),
        (dict(solver="nope"), ConfigError, "valid names"),
        (dict(prompt=torch.zeros(2, 2)), ShapeError, "integer"),
        (dict(generator=[gen(0), gen(1)]), ConfigError, "one per row"),
    ],
)
def test_bad_input_raises_clear_errors(kwargs, err, match):
    args = dict(prompt=[[1, 2]], length=6, policy="autoregressive")
    args.update(kwargs)
    with pytest.raises(err, match=match) as info:
        generate(NET, SCHED, **args)
    assert isinstance(info.value, FlowtextError)


# --------------------------------------------------------------------------- plots and lm
def test_plots(tmp_path):
    from flowtext.decoding import plot_maturity, plot_policy_comparison

    res = generate(NET, SCHED, prompt=[[1, 2]], length=6, policy="adaptive", record=True)
    path = plot_maturity(res, tmp_path / "m.png")
    assert path.stat().st_size > 1000
    results = {
        name: generate(NET, SCHED, prompt=[[1]], length=6, policy=name, steps=6, record=True)
        for name in ("autoregressive", "synchronous", "adaptive")
    }
    path = plot_policy_comparison(results, tmp_path / "c.png")
    assert path.stat().st_size > 1000
    with pytest.raises(ConfigError, match="record=True"):
        plot_maturity(generate(NET, SCHED, length=3), tmp_path / "x.png")


def test_flowlm_generate_delegates():
    from flowtext.lm import FlowLM

    lm = FlowLM(net=FlowTransformerConfig(**TINY)).double()
    lm.net.load_state_dict(NET.state_dict())
    a = lm.generate(prompt=[[1, 2]], length=5, greedy=True)
    b = generate(NET, lm.schedule, prompt=[[1, 2]], length=5, greedy=True)
    assert a.tokens == b.tokens and math.isfinite(a.stats.tokens_per_second)


# ------------------------------------------------------------------------------------- CLI
def _save_ckpt(path, with_tokenizer):
    from flowtext.data import CharTokenizer
    from flowtext.lm import FlowLM

    lm = FlowLM(net=FlowTransformerConfig(**TINY))
    ckpt = {"state_dict": lm.state_dict(), "hyper_parameters": dict(lm.hparams)}
    if with_tokenizer:
        ckpt["flowtext_tokenizer"] = CharTokenizer("abcdefghij").state_dict()
    torch.save(ckpt, path)
    return path


def test_cli_sample(tmp_path, capsys):
    from flowtext.cli import main

    ckpt = _save_ckpt(tmp_path / "m.ckpt", with_tokenizer=True)
    png = tmp_path / "h.png"
    argv = [
        "sample",
        "--ckpt",
        str(ckpt),
        "--prompt",
        "abc",
        "--policy",
        "block",
        "--policy-arg",
        "size=4",
        "--steps",
        "8",
        "--length",
        "8",
        "--batch",
        "2",
        "--top-p",
        "0.9",
        "--heatmap",
        str(png),
        "--no-eos",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "tokens per evaluation" in out and "sample 1" in out
    assert png.stat().st_size > 1000


def test_cli_errors(tmp_path, capsys):
    from flowtext.cli import main

    ckpt = _save_ckpt(tmp_path / "m.ckpt", with_tokenizer=False)
    assert main(["sample", "--ckpt", str(ckpt), "--prompt", "a"]) == 2
    assert "vocab_size=13" in capsys.readouterr().err
    good = _save_ckpt(tmp_path / "g.ckpt", with_tokenizer=True)
    assert main(["sample", "--ckpt", str(good), "--policy", "nope"]) == 2
    assert "valid names" in capsys.readouterr().err
    assert main(["sample", "--ckpt", str(tmp_path / "missing.ckpt")]) == 2
    assert main(["sample", "--ckpt", str(good), "--temperature", "-1"]) == 2


# ------------------------------------------------------------------ backbone, solvers, layering
def test_commit_forward_equals_commit_then_forward():
    torch.manual_seed(2)
    b, d = 2, TINY["d_embed"]
    cache = NET.commit(
        NET.new_cache(b), NET.embed(torch.randint(0, V, (b, 3))), torch.arange(3).expand(b, 3),
        torch.arange(3),
    )  # fmt: skip
    new_ids = torch.randint(0, V, (b, 2))
    committed = (NET.embed(new_ids), torch.tensor([[5, 5], [5, LIVE]]), torch.tensor([3, 4]))
    z = torch.randn(b, 4, d, dtype=torch.float64)
    t = torch.tensor([[1.0, 0.7, 0.3, 1.0]] * b, dtype=torch.float64)
    o, pos = torch.full((b, 4), LIVE), torch.arange(5, 9).expand(b, 4)
    with torch.no_grad():
        out, fused = NET.commit_forward(cache, committed, z, t, o, pos)
        two = NET.commit(cache, *committed)
        want = NET(z, t, o, positions=pos, cache=two)
    torch.testing.assert_close(out.logits, want.logits, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.difficulty, want.difficulty, rtol=0, atol=1e-12)
    for k1, k2 in zip(fused.keys, two.keys, strict=True):
        torch.testing.assert_close(k1, k2, rtol=0, atol=1e-12)
    assert torch.equal(fused.orders, two.orders) and torch.equal(fused.positions, two.positions)
    with pytest.raises(FlowtextError, match="increase"):  # orders checked as in commit
        NET.commit_forward(fused, committed, z, t, o, pos)


class TokenDrawingStep(solvers.Solver):
    """Draws a token per moving token from the start readout, then z_s ~ q(z_s | z_t, e_v).

    The shape of the ancestral-mixture sampler (theory §4b): it needs the logits, the embedding
    table and categorical draws, which the decoder hands to every solver step.
    """

    name = "token-drawing"
    stochastic = True

    def step(self, field, z, t_now, t_next, *, noise=None, start=None):
        pred = start if start is not None else field.predict(z, t_now)
        moving = t_next < t_now
        v = noise.categorical(torch.softmax(pred.logits, -1), moving)
        mean, std = solvers.posterior(z, pred.table[v], t_now, t_next, field.schedule)
        z_s = mean + std * noise.normal(z, moving)
        return torch.where(moving[..., None], z_s, z)


def test_a_token_drawing_solver_plugs_into_the_decoder():
    prompts = [[1, 2, 3], [4], [5, 6]]
    common = dict(length=6, policy="synchronous", steps=3, solver=TokenDrawingStep())
    gens = [gen(20 + i) for i in range(3)]
    batched = generate(NET, SCHED, prompt=prompts, generator=gens, record=True, **common)
    again = generate(
        NET, SCHED, prompt=prompts, generator=[gen(20 + i) for i in range(3)], **common
    )
    assert again.tokens == batched.tokens
    for i, p in enumerate(prompts):  # per-row draws: a row does not depend on the batch
        single = generate(NET, SCHED, prompt=[p], generator=[gen(20 + i)], **common)
        assert single.tokens[0] == batched.tokens[i]
    uncached = generate(
        NET, SCHED, prompt=prompts, generator=[gen(20 + i) for i in range(3)], use_cache=False,
        **common,
    )  # fmt: skip
    assert uncached.tokens == batched.tokens
    other = generate(
        NET, SCHED, prompt=prompts, generator=[gen(90 + i) for i in range(3)], **common
    )
    assert other.tokens != batched.tokens  # the draws matter (the test can fail)


def test_ancestral_mixture_under_autoregressive_is_ar_sampling():
    """Every token jumps 1 -> 0: the decoder draws it from the readout, no solver step runs."""
    prompts = [[1, 2, 3], [4]]
    common = dict(length=6, policy="autoregressive", steps=6)
    runs = {
        name: generate(
            NET, SCHED, prompt=prompts, solver=name, generator=[gen(30), gen(31)], **common
        ).tokens
        for name in ("ancestral-mixture", "ancestral", "euler")
    }
    assert runs["ancestral-mixture"] == runs["ancestral"] == runs["euler"]
    sync = {
        name: generate(
            NET, SCHED, prompt=prompts, solver=name, generator=[gen(30), gen(31)], length=6,
            policy="synchronous", steps=3,
        ).tokens
        for name in ("ancestral-mixture", "ancestral")
    }  # fmt: skip
    assert sync["ancestral-mixture"] != sync["ancestral"]  # the solver matters off AR


def test_the_temperature_reaches_a_named_token_drawing_solver():
    """``temperature`` (and ``greedy``) set the draws of ``ancestral-mixture`` given by name."""
    from flowtext.solvers import AncestralMixture

    common = dict(prompt=[[1, 2], [3]], length=8, policy="synchronous", steps=4)

    def run(solver, **kw):
        return generate(NET, SCHED, solver=solver, generator=[gen(40), gen(41)], **common, **kw)

    for temperature in (0.3, 1.7):
        named = run("ancestral-mixture", temperature=temperature).tokens
        assert (
            named == run(AncestralMixture(temperature=temperature), temperature=temperature).tokens
        )
        assert named != run(AncestralMixture(), temperature=temperature).tokens  # it matters
    greedy = run("ancestral-mixture", greedy=True).tokens
    assert greedy == run(AncestralMixture(temperature=0.0), greedy=True).tokens
    # an instance keeps its own temperature whatever the decoder's
    mine = run(AncestralMixture(temperature=0.3), temperature=1.0).tokens
    assert mine != run("ancestral-mixture", temperature=1.0).tokens


def test_layers_point_down_at_import_time():
    code = (
        "import sys\n"
        "import flowtext.flow\n"
        "assert 'flowtext.solvers' not in sys.modules\n"
        "import flowtext.policies\n"
        "assert 'flowtext.decoding' not in sys.modules\n"
        "import flowtext.decoding\n"
        "assert not {'flowtext.lm', 'flowtext.checkpoint', 'flowtext.sample'} & set(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------ the next-token readout
class NoFusedCommit(Wrapped):
    """The network without ``commit_forward``: the decoder commits, then evaluates."""

    def embedding_table(self):
        return self.inner.embedding_table()

    def forward(self, z, t, o, positions=None, cache=None):
        return self.inner(z, t, o, positions=positions, cache=cache)


@pytest.mark.parametrize(
    "name,kwargs,steps", [("autoregressive", {}, 8), ("block", {"size": 2}, 8), ("adaptive", {}, 8)]
)
def test_without_commit_forward_the_decoder_reads_the_same_next_token_logits(name, kwargs, steps):
    args = dict(prompt=[[1, 2, 3], [4]], length=8, policy=name, policy_kwargs=kwargs, steps=steps)
    fused = generate(NET, SCHED, generator=gen(2), **args)
    plain = generate(NoFusedCommit(NET), SCHED, generator=gen(2), **args)
    assert fused.tokens == plain.tokens
    assert plain.stats.passes > fused.stats.passes  # the commits ran as a second pass


def test_one_jump_commits_after_an_in_order_prefix_read_the_predecessor():
    """Greedy block(2) with one jump per block: each block's first token is the argmax of its
    committed predecessor's logits, its second token the argmax of its own null query."""
    prompt = torch.tensor([[3, 1, 4]])
    res = generate(
        NET, SCHED, prompt=prompt, length=4, policy="block", policy_kwargs={"size": 2}, steps=2,
        greedy=True,
    )  # fmt: skip
    seq = prompt[0].tolist() + res.tokens[0]
    differs = []
    with torch.no_grad():
        for block_start in (3, 5):
            n = block_start
            x = NET.embed(torch.tensor([seq[:n]]))
            o = torch.arange(n)[None]
            committed = NET(x, torch.zeros(1, n, dtype=torch.float64), o).logits[0, -1]
            assert seq[n] == int(committed.argmax())
            z = torch.cat([x, torch.zeros(1, 2, NET.config.d_embed, dtype=torch.float64)], 1)
            t = torch.cat([torch.zeros(1, n), torch.ones(1, 2)], 1).double()
            own = NET(z, t, torch.cat([o, torch.full((1, 2), LIVE)], 1)).logits[0]
            assert seq[n + 1] == int(own[n + 1].argmax())
            differs.append(int(own[n].argmax()) != seq[n])
    assert any(differs)  # the old readout (own null query) would have drawn other tokens
