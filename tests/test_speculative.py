"""Self-speculative decoding: exactly the model's AR decoder, several tokens per evaluation."""

import itertools

import pytest
import torch
from torch import nn

from flowtext.decoding import generate, speculative_generate
from flowtext.decoding.speculative import _Row, _verify
from flowtext.errors import ConfigError
from flowtext.nn import FlowOutput, FlowTransformerConfig

from ._nets import perturbed_net, tiny


@pytest.mark.parametrize("draft", [1, 3, 8])
def test_greedy_speculative_decoding_is_the_greedy_ar_decoder(draft):
    net = perturbed_net(seed=3, scale=0.5)
    prompts = [[1, 2], [3], [4, 5, 6, 7]]
    ar = generate(net, "cosine", prompt=prompts, length=8, policy="autoregressive", greedy=True)
    spec = generate(
        net, "cosine", prompt=prompts, length=8, policy="speculative", greedy=True,
        policy_kwargs={"draft": draft},
    )  # fmt: skip
    assert spec.tokens == ar.tokens
    assert spec.stats.committed == sum(len(r) for r in ar.tokens)
    assert spec.stats.nfe <= 8  # never more evaluations than the AR decoder


def test_without_a_prompt_the_first_token_comes_from_the_null_query():
    net = perturbed_net(seed=9, scale=0.5)
    kw = dict(prompt=None, batch_size=2, length=7, greedy=True)
    ar = generate(net, "cosine", policy="autoregressive", **kw)
    for cache in (True, False):
        spec = speculative_generate(net, "cosine", draft=3, use_cache=cache, **kw)
        assert spec.tokens == ar.tokens


def test_greedy_speculative_decoding_stops_at_eos_like_the_ar_decoder():
    net = perturbed_net(seed=4, scale=0.5)
    prompts = [[1], [2, 3], [4]]
    ar = generate(net, "cosine", prompt=prompts, length=10, policy="autoregressive", greedy=True)
    eos = ar.tokens[0][2]  # a token the AR decoder writes: rows stop there
    kw = dict(prompt=prompts, length=10, greedy=True, eos_id=eos)
    ar = generate(net, "cosine", policy="autoregressive", **kw)
    spec = speculative_generate(net, "cosine", draft=4, **kw)
    assert spec.tokens == ar.tokens and spec.eos == ar.eos and spec.eos[0]


def _ar_law(net, prompt: list[int], length: int) -> dict[tuple[int, ...], float]:
    """Exact probability of every continuation under the network's AR readout."""
    vocab, law = net.config.vocab_size, {}
    for cont in itertools.product(range(vocab), repeat=length):
        ids = torch.tensor([prompt + list(cont)])
        pos = torch.arange(ids.shape[1])[None]
        emb = net.embed(ids)
        with torch.no_grad():
            out = net(emb, torch.zeros(ids.shape, dtype=emb.dtype), pos, pos)
        logp = out.logits.log_softmax(-1)
        n = len(prompt)
        law[cont] = float(sum(logp[0, n - 1 + i, c] for i, c in enumerate(cont)).exp())
    return law


SOFTEN = 0.05
"""Scale of the tiny network's logits: a spread AR law over the 64 continuations."""


class _SkewedDrafts(nn.Module):
    """A network whose live tokens' readout leans to token 0: drafts far from the AR law."""

    def __init__(self, net) -> None:
        super().__init__()
        self.net, self.config = net, net.config

    def embed(self, ids):
        return self.net.embed(ids)

    def forward(self, z, t, o, positions=None, cache=None):
        out = self.net(z, t, o, positions)
        lean = torch.zeros(out.logits.shape[-1], dtype=out.logits.dtype)
        lean[0] = 3.0
        logits = SOFTEN * out.logits + (t > 0)[..., None] * lean
        return FlowOutput(logits=logits, difficulty=out.difficulty)


@pytest.mark.parametrize("draft_temperature", [None, 0.5])
def test_speculative_sampling_draws_the_ar_law_exactly(draft_temperature):
    """Empirical law of 6000 three-token samples against the AR readout's exact law.

    The drafts lean to token 0 (their law is far from the AR one), so keeping drafts by any
    other rule than the verification's would show; a sharper draft law changes nothing either.
    """
    net = _SkewedDrafts(perturbed_net(seed=5, scale=0.6, vocab_size=4))
    law = _ar_law(net, [1, 2], 3)
    n = 6000
    res = speculative_generate(
        net, "cosine", prompt=[[1, 2]] * n, length=3, draft=4,
        generator=torch.Generator().manual_seed(0), draft_temperature=draft_temperature,
    )  # fmt: skip
    counts: dict[tuple[int, ...], int] = {}
    for row in res.tokens:
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    tv = 0.5 * sum(abs(counts.get(k, 0) / n - p) for k, p in law.items())
    assert tv < 0.07, tv  # sampling noise alone: about 0.04 at n = 6000 over 64 outcomes
    assert res.stats.tokens_per_eval > 1.05  # drafts were kept: the test exercised acceptance


def test_the_verification_rule_keeps_the_target_law_and_refuses_the_draft_law():
    """``_verify`` on drafts from ``q``: its first token follows ``p``, far from ``q``."""
    p = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.1, 0.1, 0.1, 0.7]])
    gen = torch.Generator().manual_seed(1)
    n, first = 20000, torch.zeros(4)
    kept = 0
    for _ in range(n):
        d = int(torch.multinomial(q[0], 1, generator=gen))
        out = _verify(_Row(ids=[0], end=9, drafts=[d], q=q), p, gen)
        first[out[0]] += 1
        kept += len(out) == 2
    assert (first / n - p[0]).abs().max() < 0.015
    # P(keep) = sum_v min(p, q) = 0.4: the rule is not "always keep" (whose law would be q)
    assert abs(kept / n - 0.4) < 0.015


def test_a_row_with_its_own_generator_decodes_alike_in_any_batch():
    net = perturbed_net(seed=6, scale=0.3)
    kw = dict(length=6, draft=3, temperature=1.0)
    alone = speculative_generate(net, "cosine", prompt=[[2, 3]], generator=[_gen(7)], **kw)
    batch = speculative_generate(
        net, "cosine", prompt=[[1], [2, 3], [4, 5, 6]], generator=[_gen(1), _gen(7), _gen(2)], **kw
    )
    assert batch.tokens[1] == alone.tokens[0]


@pytest.mark.parametrize("greedy", [True, False])
def test_the_cache_changes_nothing_but_the_cost(greedy):
    """Exact KV cache (theory §2): the same tokens, draws and steps as whole-sequence passes."""
    net = perturbed_net(seed=8, scale=0.4)
    prompts = [[1, 2, 3], [4], [5, 6]]
    out = [
        speculative_generate(
            net, "cosine", prompt=prompts, length=9, draft=3, greedy=greedy, use_cache=cache,
            generator=[_gen(1), _gen(2), _gen(3)], eos_id=None if greedy else 7,
        )
        for cache in (True, False)
    ]  # fmt: skip
    assert out[0].tokens == out[1].tokens
    assert torch.equal(out[0].commit_order, out[1].commit_order)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class _Constant(nn.Module):
    """A network whose every readout is sure of one token: every draft holds."""

    def __init__(self, token: int) -> None:
        super().__init__()
        self.config = FlowTransformerConfig(**tiny())
        self.table = nn.Parameter(torch.randn(self.config.vocab_size, self.config.d_embed))
        self.token = token
        self.widths: list[int] = []

    def embed(self, ids):
        return self.table[ids]

    def forward(self, z, t, o, positions=None, cache=None):
        self.widths.append(z.shape[1])
        logits = torch.full((*z.shape[:2], self.config.vocab_size), -30.0)
        logits[..., self.token] = 0.0
        return FlowOutput(logits=logits, difficulty=torch.zeros(z.shape[:2]))


def test_sure_drafts_commit_a_whole_block_per_evaluation():
    net = _Constant(token=5)
    res = speculative_generate(net, "cosine", prompt=[[1], [2, 3]], length=12, draft=4)
    assert res.tokens == [[5] * 12, [5] * 12]
    # pass 1 commits one token and drafts 3; each later pass keeps them and commits one more
    assert res.stats.nfe == 4 and res.stats.tokens_per_eval == 3.0
    assert res.commit_order[0].tolist() == [1] + [2] * 4 + [3] * 4 + [4] * 3
    assert max(net.widths) <= 3 + 12 + 4 * 4  # prompt + committed + drafts + (k + 1) groups


def test_recorded_times_fall_to_zero_at_each_tokens_commit_step():
    net = perturbed_net(seed=7, scale=0.4)
    res = generate(
        net, "cosine", prompt=[[1], [2, 3]], length=7, policy="speculative", record=True,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert res.times.shape == (res.stats.steps + 1, 2, 7)
    steps = torch.arange(res.stats.steps + 1)[:, None, None]
    assert torch.equal(res.times == 0, steps >= res.commit_order[None])
    assert (res.canvas >= 0).all() and res.canvas.tolist() == res.tokens


def test_an_interrupt_returns_what_was_committed():
    net = _Constant(token=5)
    forward = net.forward

    def third_pass_interrupts(*args, **kwargs):
        if len(net.widths) == 2:
            raise KeyboardInterrupt
        return forward(*args, **kwargs)

    net.forward = third_pass_interrupts
    res = speculative_generate(net, "cosine", prompt=[[1]], length=12, draft=4)
    assert res.interrupted and res.tokens == [[5] * 5]  # passes 1 and 2: 1 + 4 tokens
    assert res.commit_order[0].tolist() == [1] + [2] * 4 + [-1] * 7


def test_speculative_decoding_refuses_what_it_cannot_honour():
    net = perturbed_net()
    with pytest.raises(ConfigError, match="does not take steps"):
        generate(net, "cosine", prompt=[[1]], length=3, policy="speculative", steps=3)
    with pytest.raises(ConfigError, match="draft"):
        speculative_generate(net, "cosine", prompt=[[1]], length=3, draft=0)
    with pytest.raises(ConfigError, match="eos_id"):  # checked as generate checks it
        speculative_generate(net, "cosine", prompt=[[1]], length=3, eos_id=99)
    with pytest.raises(ConfigError, match="draft_temperature"):
        speculative_generate(net, "cosine", prompt=[[1]], length=3, draft_temperature=0.0)
    with pytest.raises(ConfigError, match="length"):
        speculative_generate(net, "cosine", prompt=[[1]], length=0)
    with pytest.raises(ConfigError, match="one per row"):
        speculative_generate(net, "cosine", prompt=[[1]], length=3, generator=[None])
    with pytest.raises(ConfigError):
        speculative_generate(net, "cosine", prompt=[[1]], length=99)  # beyond max_len
