"""The time-conditioned Transformer backbone: shapes, null input, visibility, two-stream, cache."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from flowtext.attention import LIVE, two_stream_layout
from flowtext.errors import ConfigError, DataError, ShapeError, TimeRangeError
from flowtext.nn import FlowOutput, FlowTransformer, FlowTransformerConfig, KVCache
from flowtext.nn.layers import LowRankModulation, widening_linear

from ._nets import tiny

TINY = tiny(vocab_size=11, max_len=24, n_heads=4)
ATOL = 1e-10


def make_model(seed=0, randomize=True, **overrides):
    """A tiny float64 model; ``randomize`` perturbs every parameter (zero-init gates included)."""
    torch.manual_seed(seed)
    model = FlowTransformer(FlowTransformerConfig(**{**TINY, **overrides})).double().eval()
    if randomize:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.2 * torch.randn_like(p))
    return model


MODEL = make_model()
seeds = st.integers(0, 2**31 - 1)


def random_state(gen, b, n, p_committed=0.4, p_noise=0.2, n_orders=3):
    """Random single-stream state: committed (t=0, random orders), live (0<t<1), noise (t=1)."""
    u = torch.rand(b, n, generator=gen)
    committed, noise = u < p_committed, u > 1 - p_noise
    t = torch.rand(b, n, generator=gen, dtype=torch.float64).clamp(0.01, 0.99)
    t = torch.where(committed, 0.0, torch.where(noise, 1.0, t))
    o = torch.where(committed, torch.randint(0, n_orders, (b, n), generator=gen), LIVE)
    z = torch.randn(b, n, TINY["d_embed"], generator=gen, dtype=torch.float64)
    return z, t, o


def assert_outputs_close(a: FlowOutput, b: FlowOutput, atol=ATOL):
    torch.testing.assert_close(a.logits, b.logits, atol=atol, rtol=0)
    torch.testing.assert_close(a.difficulty, b.difficulty, atol=atol, rtol=0)


# ---------------------------------------------------------------- shapes, embeddings, heads


def test_shapes_and_heads():
    gen = torch.Generator().manual_seed(0)
    z, t, o = random_state(gen, 3, 7)
    out = MODEL(z, t, o)
    assert out.logits.shape == (3, 7, TINY["vocab_size"])
    assert out.difficulty.shape == (3, 7)
    assert out.hidden.shape == (3, 7, TINY["d_model"])
    assert out.logits.dtype == torch.float64
    assert (out.difficulty >= 0).all()
    # a float32 model accepts the same call, and float32 times work with a float64 model
    model32 = make_model().float()
    assert model32(z.float(), t.float(), o).logits.dtype == torch.float32
    torch.testing.assert_close(  # t is rounded to float32, so only close
        MODEL(z, t.float(), o).logits, MODEL(z, t, o).logits, atol=1e-4, rtol=1e-4
    )


def test_embeddings_have_fixed_norm():
    model = make_model()
    with torch.no_grad():
        model.embedding.mul_(torch.rand(TINY["vocab_size"], 1) * 100)  # raw table scale is moot
    tokens = torch.randint(0, TINY["vocab_size"], (4, 9))
    norms = model.embed(tokens).norm(dim=-1)
    torch.testing.assert_close(norms, torch.full_like(norms, math.sqrt(TINY["d_embed"])))
    torch.testing.assert_close(model.embed(tokens), model.embedding_table()[tokens])


@settings(max_examples=20)
@given(seed=seeds, scale=st.floats(0.0, 30.0))
def test_x0_hat_is_a_convex_combination(seed, scale):
    gen = torch.Generator().manual_seed(seed)
    v, d = TINY["vocab_size"], TINY["d_embed"]
    logits = scale * torch.randn(2, 5, v, generator=gen, dtype=torch.float64)
    x0 = MODEL.x0_hat(logits)
    assert x0.shape == (2, 5, d)
    table = MODEL.embedding_table()
    torch.testing.assert_close(x0, torch.softmax(logits, -1) @ table)
    assert (x0.norm(dim=-1) <= math.sqrt(d) * (1 + 1e-12)).all()  # inside the ball of the e(v)
    # vertices and centre of the simplex
    peaked = F.one_hot(torch.tensor([3, 7]), v).double() * 1e4
    torch.testing.assert_close(MODEL.x0_hat(peaked), table[[3, 7]])
    torch.testing.assert_close(MODEL.x0_hat(torch.zeros(v, dtype=torch.float64)), table.mean(0))


# ---------------------------------------------------------------- null input and visibility


@settings(max_examples=15)
@given(seed=seeds, b=st.integers(1, 3), n=st.integers(2, 12))
def test_noise_tokens_input_is_not_read(seed, b, n):
    gen = torch.Generator().manual_seed(seed)
    z, t, o = random_state(gen, b, n)
    t[:, 0] = 1.0  # at least one token at pure noise
    o[:, 0] = LIVE
    noise = (t == 1)[..., None]
    z2 = torch.where(noise, 1e6 * torch.randn(z.shape, generator=gen, dtype=z.dtype), z)
    z3 = torch.where(noise, torch.full_like(z, math.nan), z)
    ref = MODEL(z, t, o)
    for other in (z2, z3):
        out = MODEL(other, t, o)
        assert torch.equal(out.logits, ref.logits) and torch.equal(out.difficulty, ref.difficulty)
    model = make_model()
    zg = z3.clone().requires_grad_(True)
    model(zg, t, o).logits.sum().backward()  # the NaN must not leak into any gradient either
    assert torch.isfinite(zg.grad).all() and (zg.grad[noise.expand_as(zg)] == 0).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@settings(max_examples=40)
@given(seed=seeds, b=st.integers(1, 3), n=st.integers(2, 14))
def test_committed_outputs_ignore_live_and_noise_tokens(seed, b, n):
    gen = torch.Generator().manual_seed(seed)
    z, t, o = random_state(gen, b, n)
    live = t > 0
    z2 = torch.where(live[..., None], torch.randn(z.shape, generator=gen, dtype=z.dtype), z)
    t_new = torch.rand(b, n, generator=gen, dtype=t.dtype).clamp_min(0.01)
    t_new = torch.where(torch.rand(b, n, generator=gen) < 0.3, 1.0, t_new)
    t2 = torch.where(live, t_new, t)
    ref, out = MODEL(z, t, o), MODEL(z2, t2, o)
    committed = ~live
    torch.testing.assert_close(out.logits[committed], ref.logits[committed], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.hidden[committed], ref.hidden[committed], atol=ATOL, rtol=0)


@settings(max_examples=15)
@given(seed=seeds, n=st.integers(3, 12))
def test_informative_live_tokens_influence_each_other(seed, n):
    gen = torch.Generator().manual_seed(seed)
    z, t, o = random_state(gen, 1, n, p_committed=0.3, p_noise=0.0)
    t[0, :2], o[0, :2] = torch.tensor([0.3, 0.7], dtype=t.dtype), LIVE  # two live tokens
    z2 = z.clone()
    z2[0, 1] += 1.0
    assert not torch.allclose(MODEL(z2, t, o).logits[0, 0], MODEL(z, t, o).logits[0, 0])
    # the same token at t = 1 carries nothing: changing its time from 1 to 0.7 matters
    t_noise = t.clone()
    t_noise[0, 1] = 1.0
    assert not torch.allclose(MODEL(z, t_noise, o).logits[0, 0], MODEL(z, t, o).logits[0, 0])


# ---------------------------------------------------------------- two-stream == sequential


@settings(max_examples=30)
@given(seed=seeds, b=st.integers(1, 2), n=st.integers(1, 12), block=st.integers(1, 5))
def test_two_stream_equals_sequential_blocks(seed, b, n, block):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, TINY["vocab_size"], (b, n), generator=gen)
    block_ids = (torch.arange(n) // block).expand(b, n)
    n_blocks = int(block_ids.max()) + 1
    t_block = torch.rand(b, n_blocks, generator=gen, dtype=torch.float64).clamp_min(0.01)
    t_block = torch.where(torch.rand(b, n_blocks, generator=gen) < 0.25, 1.0, t_block)
    t_noisy = torch.gather(t_block, 1, block_ids)
    clean = MODEL.embed(tokens)
    noisy = torch.randn(b, n, TINY["d_embed"], generator=gen, dtype=torch.float64)

    t2, o2 = two_stream_layout(block_ids, t_noisy)
    out2 = MODEL(torch.cat([clean, noisy], 1), t2, o2, positions=torch.arange(n).repeat(2))

    pos = torch.arange(n).expand(b, n)
    commit_order = block_ids * n + pos  # (step, position): blocks commit in turn, causal inside
    all_clean = MODEL(clean, torch.zeros(b, n, dtype=torch.float64), commit_order)
    torch.testing.assert_close(out2.logits[:, :n], all_clean.logits, atol=ATOL, rtol=0)
    for k in range(n_blocks):
        before, here = block_ids < k, block_ids == k
        z = torch.where(before[..., None], clean, noisy)
        t = torch.where(before, 0.0, torch.where(here, t_noisy, 1.0))
        o = torch.where(before, commit_order, LIVE)
        seq = MODEL(z, t, o)
        torch.testing.assert_close(out2.logits[:, n:][here], seq.logits[here], atol=ATOL, rtol=0)
        torch.testing.assert_close(
            out2.difficulty[:, n:][here], seq.difficulty[here], atol=ATOL, rtol=0
        )


# ---------------------------------------------------------------- exact KV cache


@st.composite
def decoding_states(draw):
    """A sequence with tokens committed over several steps (grouped into commit calls) + live."""
    b, n = draw(st.integers(1, 3)), draw(st.integers(2, 16))
    sizes, total = [], 0
    for size in draw(st.lists(st.integers(1, 3), min_size=1, max_size=4)):
        size = min(size, n - 1 - total)  # keep at least one live token
        if size <= 0:
            break
        sizes.append(size)
        total += size
    new_call = draw(st.lists(st.booleans(), min_size=len(sizes), max_size=len(sizes)))
    return b, n, sizes, new_call, draw(seeds)


def build_decoding_case(b, n, sizes, seed):
    gen = torch.Generator().manual_seed(seed)
    perm = torch.stack([torch.randperm(n, generator=gen) for _ in range(b)])  # commit positions
    z = MODEL.embed(torch.randint(0, TINY["vocab_size"], (b, n), generator=gen))
    t = torch.rand(b, n, generator=gen, dtype=torch.float64).clamp_min(0.01)
    t = torch.where(torch.rand(b, n, generator=gen) < 0.3, 1.0, t)
    z = z + torch.randn(z.shape, generator=gen, dtype=z.dtype)  # exactness holds for any z
    o = torch.full((b, n), LIVE)
    steps, start = [], 0
    for s, size in enumerate(sizes):
        pos = perm[:, start : start + size]
        order = 3 * s + 1  # gaps in the orders are fine
        t.scatter_(1, pos, 0.0)
        o.scatter_(1, pos, order)
        steps.append((pos, order))
        start += size
    return z, t, o, steps, perm[:, start:]


def gather_tokens(x, pos):
    return torch.gather(x, 1, pos if x.ndim == 2 else pos[..., None].expand(-1, -1, x.shape[-1]))


@settings(max_examples=60)
@given(case=decoding_states())
def test_cache_is_exact(case):
    b, n, sizes, new_call, seed = case
    z, t, o, steps, live_pos = build_decoding_case(b, n, sizes, seed)
    full = MODEL(z, t, o)

    cache = MODEL.new_cache(b)
    calls: list[list] = []
    for (pos, _), fresh in zip(steps, new_call):
        if fresh or not calls:
            calls.append([])
        calls[-1].append(pos)
    for call in calls:
        pos = torch.cat(call, dim=1)
        before = cache
        cache = MODEL.commit(cache, gather_tokens(z, pos), gather_tokens(o, pos), pos)
        assert before.length + pos.shape[1] == cache.length  # the old cache is untouched
    assert cache.length == sum(sizes)

    live = [gather_tokens(x, live_pos) for x in (z, t, o)]
    out = MODEL(*live, positions=live_pos, cache=cache)
    torch.testing.assert_close(out.logits, gather_tokens(full.logits, live_pos), atol=ATOL, rtol=0)
    torch.testing.assert_close(
        out.difficulty, gather_tokens(full.difficulty, live_pos), atol=ATOL, rtol=0
    )
    again = MODEL(*live, positions=live_pos, cache=cache)
    assert torch.equal(again.logits, out.logits)  # forward does not modify the cache


@settings(max_examples=10)
@given(seed=seeds, b=st.integers(2, 3), n=st.integers(3, 10))
def test_cache_padding_entries_are_invisible(seed, b, n):
    gen = torch.Generator().manual_seed(seed)
    k = int(torch.randint(1, n - 1, (1,), generator=gen))  # committed prefix length, in order
    z = torch.randn(b, n, TINY["d_embed"], generator=gen, dtype=torch.float64)
    t = torch.rand(b, n, generator=gen, dtype=torch.float64).clamp_min(0.01)
    t[:, :k] = 0.0
    o = torch.where(t == 0, torch.arange(n), LIVE)
    full = MODEL(z, t, o)
    pos = torch.arange(n).expand(b, n)

    cache = MODEL.new_cache(b)
    for i in range(k):
        # row 0 commits token i plus one padding entry; the other rows commit two padding
        # entries only at odd steps, so the cache mixes real and padded columns differently
        junk = torch.randn(b, 1, TINY["d_embed"], generator=gen, dtype=torch.float64)
        zc = torch.cat([z[:, i : i + 1], junk], 1)
        oc = torch.tensor([[i, LIVE]]).repeat(b, 1)
        pc = torch.tensor([[i, 0]]).repeat(b, 1)
        cache = MODEL.commit(cache, zc, oc, pc)
        if i % 2:
            cache = MODEL.commit(cache, torch.cat([junk, junk], 1), torch.full((b, 2), LIVE), pc)
    out = MODEL(z[:, k:], t[:, k:], o[:, k:], cache=cache, positions=pos[:, k:])
    torch.testing.assert_close(out.logits, full.logits[:, k:], atol=ATOL, rtol=0)


def test_autoregressive_decoding_with_default_positions():
    """Left-to-right commits with default positions: the live token sits at position Lc."""
    gen = torch.Generator().manual_seed(1)
    n = 6
    z = MODEL.embed(torch.randint(0, TINY["vocab_size"], (2, n), generator=gen))
    cache = MODEL.new_cache(2)
    for i in range(n - 1):
        cache = MODEL.commit(cache, z[:, i : i + 1], torch.full((2, 1), i), torch.tensor([i]))
        query = torch.zeros(2, 1, TINY["d_embed"], dtype=torch.float64)
        one = torch.ones(2, 1, dtype=torch.float64)
        out = MODEL(query, one, torch.full((2, 1), LIVE), cache=cache)
        t = torch.cat([torch.zeros(2, i + 1), torch.ones(2, n - i - 1)], 1).double()
        o = torch.where(t == 0, torch.arange(n), LIVE)
        full = MODEL(z, t, o)
        torch.testing.assert_close(out.logits[:, 0], full.logits[:, i + 1], atol=ATOL, rtol=0)


# ---------------------------------------------------------------- parameters and gradients


def is_conditioning(name):
    return (
        name.startswith(("time_embed.", "time_in.", "final_modulation.")) or ".modulation." in name
    )


def test_conditioning_is_cheap():
    model = FlowTransformer(FlowTransformerConfig())  # the default (d_model 256, 4 layers) size
    total = sum(p.numel() for p in model.parameters())
    cond = sum(p.numel() for n, p in model.named_parameters() if is_conditioning(n))
    modulation = sum(
        p.numel()
        for m in model.modules()
        if isinstance(m, LowRankModulation)
        for p in m.parameters()
    )
    assert cond < 0.10 * total
    cfg = model.config
    full_rank = cfg.n_layers * (cfg.cond_dim + 1) * 6 * cfg.d_model  # a full-rank adaLN
    assert modulation < 0.25 * full_rank


def test_gradients_reach_every_parameter():
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, TINY["vocab_size"], (2, 10), generator=gen)
    for model in (make_model(randomize=False), make_model()):  # fresh init and trained-like
        model.train()
        z, t, o = random_state(gen, 2, 10)
        out = model(z, t, o)
        ce = F.cross_entropy(out.logits.flatten(0, 1), tokens.flatten())
        mse = (model.x0_hat(out.logits) - model.embed(tokens)).pow(2).mean()
        loss = ce + mse + out.difficulty.mean()
        loss.backward()
        time_mlp = [p.grad for p in model.time_embed.parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in time_mlp)
    # with every parameter perturbed away from its init, every one of them gets a gradient
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing


@pytest.mark.parametrize("detach", [True, False])
def test_difficulty_detach(detach):
    model = make_model(difficulty_detach=detach)
    gen = torch.Generator().manual_seed(3)
    z, t, o = random_state(gen, 1, 6)
    model(z, t, o).difficulty.sum().backward()
    trunk_grad = model.in_proj.weight.grad
    assert (trunk_grad is None or not trunk_grad.abs().sum()) == detach
    assert model.difficulty_head[0].weight.grad.abs().sum() > 0


def test_dropout_only_in_training():
    model = make_model(dropout=0.5)
    gen = torch.Generator().manual_seed(4)
    z, t, o = random_state(gen, 1, 6)
    assert torch.equal(model(z, t, o).logits, model(z, t, o).logits)
    model.train()
    assert not torch.equal(model(z, t, o).logits, model(z, t, o).logits)


# ---------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors():
    b, n, d = 2, 5, TINY["d_embed"]
    z = torch.randn(b, n, d, dtype=torch.float64)
    t = torch.rand(b, n, dtype=torch.float64)
    o = torch.full((b, n), LIVE)
    with pytest.raises(ShapeError, match="d_embed=8"):
        MODEL(z[..., :3], t, o)
    with pytest.raises(ShapeError, match="d_embed"):
        MODEL(z[0], t, o)
    with pytest.raises(ShapeError, match="floating"):
        MODEL(z.long(), t, o)
    with pytest.raises(ShapeError, match=r"t must have shape"):
        MODEL(z, t[:, :3], o)
    with pytest.raises(TimeRangeError, match=r"\[0, 1\]"):
        MODEL(z, t + 1.0, o)
    with pytest.raises(TimeRangeError):
        MODEL(z, torch.full_like(t, math.nan), o)
    with pytest.raises(ShapeError, match="integer"):
        MODEL(z, t, o.double())
    long_z = torch.randn(1, TINY["max_len"] + 1, d, dtype=torch.float64)
    long_t = torch.rand(1, TINY["max_len"] + 1, dtype=torch.float64)
    with pytest.raises(ShapeError, match="max_len=24"):
        MODEL(long_z, long_t, torch.zeros(1, TINY["max_len"] + 1, dtype=torch.long))
    with pytest.raises(ShapeError, match="max_len=24"):
        MODEL(z, t, o, positions=torch.tensor([0, 1, 2, 3, 24]))
    with pytest.raises(ShapeError, match="positions"):
        MODEL(z, t, o, positions=torch.arange(4))

    cache = MODEL.new_cache(b)
    cache = MODEL.commit(cache, z[:, :1], torch.zeros(b, 1, dtype=torch.long), torch.tensor([20]))
    big = torch.randn(b, TINY["max_len"], d, dtype=torch.float64)
    with pytest.raises(ShapeError, match="after 1 cached exceed max_len"):
        MODEL(
            big,
            torch.ones(b, TINY["max_len"], dtype=torch.float64),
            torch.full_like(o[:, :1], LIVE).expand(b, TINY["max_len"]),
            cache=cache,
        )
    with pytest.raises(ShapeError, match="rows"):
        MODEL(z[:1], t[:1], o[:1], cache=cache)
    with pytest.raises(TimeRangeError, match="must increase"):
        MODEL.commit(cache, z[:, :1], torch.zeros(b, 1, dtype=torch.long), torch.tensor([3]))
    with pytest.raises(TimeRangeError, match="LIVE"):
        MODEL.commit(cache, z[:, :1], torch.full((b, 1), LIVE + 1), torch.tensor([3]))
    with pytest.raises(ShapeError, match="positions"):
        MODEL.commit(cache, z[:, :1], torch.ones(b, 1, dtype=torch.long), None)
    other = make_model(n_layers=1).new_cache(b)
    with pytest.raises(ShapeError, match="different model"):
        MODEL(z, t, o, cache=other)

    with pytest.raises(DataError, match="vocab_size=11"):
        MODEL.embed(torch.tensor([[0, 11]]))
    with pytest.raises(ShapeError, match="integer"):
        MODEL.embed(torch.zeros(1, 2))
    with pytest.raises(ShapeError, match="vocab_size"):
        MODEL.x0_hat(torch.zeros(2, 5))
    assert issubclass(ShapeError, ValueError) and issubclass(TimeRangeError, ValueError)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(d_model=30, n_heads=4), "divisible"),
        (dict(d_model=12, n_heads=4), "even"),
        (dict(attention_backend="flash"), "auto, sdpa, triton"),
        (dict(dropout=1.0), "dropout"),
        (dict(cond_dim=15), "cond_dim"),
        (dict(cond_rank=0), "cond_rank"),
        (dict(n_layers=0), "n_layers"),
        (dict(vocab_size=2.5), "vocab_size"),
    ],
)
def test_bad_configs(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        FlowTransformerConfig(**kwargs)


def test_config_is_jsonargparse_friendly():
    from jsonargparse import ArgumentParser, set_parsing_settings

    # field docstrings become --help text once attribute docstrings are enabled (as litgpt does)
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    try:
        parser = ArgumentParser()
        parser.add_class_arguments(FlowTransformerConfig, "model")
        help_text = parser.format_help()
    finally:
        set_parsing_settings(docstring_parse_attribute_docstrings=False)
    cfg = parser.parse_args(["--model.d_model=64", "--model.attention_backend=sdpa"])
    assert cfg.model.d_model == 64 and cfg.model.attention_backend == "sdpa"
    assert FlowTransformerConfig(**vars(cfg.model)).d_model == 64
    assert "Width of the residual stream" in help_text
    with pytest.raises(SystemExit):  # not one of the Literal choices
        parser.parse_args(["--model.attention_backend=flash"])


def test_public_api():
    import flowtext.nn as nn_pkg

    public = (
        "FlowNetwork FlowNetworkConfig FlowOutput FlowTransformer FlowTransformerConfig KVCache"
    )
    assert sorted(nn_pkg.__all__) == public.split()
    assert all(getattr(nn_pkg, name).__doc__ for name in nn_pkg.__all__)  # documented
    assert isinstance(MODEL.new_cache(1), KVCache)


@pytest.mark.slow
def test_compiled_backbone_gives_the_eager_loss_and_gradients():
    """``compile=True`` compiles the blocks: the same state dict, loss and gradients as eager."""
    from flowtext import schedules
    from flowtext.objectives import two_stream_loss

    torch.manual_seed(0)
    eager = FlowTransformer(FlowTransformerConfig(**tiny()))
    compiled = FlowTransformer(FlowTransformerConfig(**tiny(compile=True)))
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    compiled.load_state_dict(eager.state_dict())
    with torch.no_grad():
        for p in eager.parameters():  # off the zero-initialised gates, identically in both
            p.add_(0.2 * torch.randn_like(p))
        compiled.load_state_dict(eager.state_dict())
    tokens = torch.randint(0, 13, (2, 16))
    losses = []
    for net in (eager, compiled):
        gen = torch.Generator().manual_seed(3)
        loss = two_stream_loss(net, tokens, schedules.get("cosine"), block_size=4, generator=gen)
        loss.nats.mean().backward()
        losses.append(loss.nats.mean().detach())
    assert compiled.blocks[0]._compiled_call_impl is not None
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="compile"):
        FlowTransformerConfig(**tiny(compile="yes"))


@pytest.mark.parametrize("pattern", ["token", "row", "column", "none"])
def test_conditioning_on_distinct_times_equals_per_token(monkeypatch, pattern):
    """Times shared across rows or along rows condition once per distinct time, same outputs."""
    import flowtext.nn.transformer as T

    from ._nets import perturbed_net

    net = perturbed_net()
    b, n = 3, 6
    gen = torch.Generator().manual_seed(0)
    t = {
        "token": torch.full((b, n), 0.3, dtype=torch.float64),
        "row": torch.rand(1, n, generator=gen, dtype=torch.float64).expand(b, n),
        "column": torch.rand(b, 1, generator=gen, dtype=torch.float64).expand(b, n),
        "none": torch.rand(b, n, generator=gen, dtype=torch.float64),
    }[pattern]
    shapes = {"token": (1, 1), "row": (1, n), "column": (b, 1), "none": (b, n)}
    assert T._distinct_times(t).shape == shapes[pattern]
    z = torch.randn(b, n, 8, generator=gen, dtype=torch.float64)
    o = torch.full((b, n), LIVE)
    shared = net(z, t, o).logits
    monkeypatch.setattr(T, "_distinct_times", lambda t: t)
    torch.testing.assert_close(shared, net(z, t, o).logits, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_block_folds_a_shared_modulation_into_its_weights(dropout):
    """One conditioning vector for every token (>= d_model tokens) folds into the linear maps:
    the same outputs and gradients as the per-token modulation, dropout included."""
    from flowtext.attention import plan_attention
    from flowtext.nn.layers import Block, LayerInputs, rotary

    cfg = FlowTransformerConfig(**tiny(dropout=dropout))
    torch.manual_seed(0)
    block = Block(cfg).double().train()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.3 * torch.randn_like(p))
    b, n, d = 3, 16, cfg.d_model
    assert b * n >= d  # the folded path
    pos = torch.arange(n).expand(b, n)
    t = torch.zeros(b, n, dtype=torch.float64)
    inputs = LayerInputs(
        rotary(pos[:1], cfg.head_dim, cfg.rope_base, torch.float64), t, pos, t, pos,
        plan_attention(t, pos, t, pos, backend="sdpa"),
    )  # fmt: skip
    c = torch.randn(1, 1, cfg.cond_dim, dtype=torch.float64)
    x = torch.randn(b, n, d, dtype=torch.float64)
    outs, grads = [], []
    for c_act in (c, c.expand(b, n, -1)):  # shared: folded; expanded: per token
        torch.manual_seed(1)  # the same dropout masks
        xg = x.clone().requires_grad_(True)
        out, (k, v) = block(xg, c_act, inputs)
        (out.square().sum() + k.sum() + v.sum()).backward()
        outs.append(out)
        grads.append([xg.grad, *(p.grad.clone() for p in block.parameters())])
        block.zero_grad()
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-10)
    for a, g in zip(*grads):
        torch.testing.assert_close(a, g, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(outs[0], x)  # the block did something


@pytest.mark.parametrize("output_prior", [False, True])
def test_null_logits_equal_the_lone_null_token_forward(output_prior):
    """The lean null query (no positions, mask or checks) gives forward's logits and grads."""
    from flowtext.nn.latents import bind_prior_schedule
    from flowtext.schedules import get

    from ._nets import perturbed_net

    net = perturbed_net(output_prior=output_prior)
    bind_prior_schedule(net, get("cosine"))
    zero = torch.zeros(1, 1, dtype=torch.long)
    ref = net(torch.zeros(1, 1, 8, dtype=torch.float64), torch.ones(1, 1).double(), zero, zero)
    lean = net.null_logits()
    assert lean.shape == (net.config.vocab_size,)
    torch.testing.assert_close(lean, ref.logits[0, 0], rtol=1e-12, atol=1e-12)
    g_ref = torch.autograd.grad(
        ref.logits.square().sum(), list(net.parameters()), allow_unused=True
    )
    g_lean = torch.autograd.grad(lean.square().sum(), list(net.parameters()), allow_unused=True)
    for p, a, b in zip(net.parameters(), g_ref, g_lean):  # None: no path (zero gradient)
        zero = torch.zeros_like(p)
        a, b = zero if a is None else a, zero if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert g_lean[0] is None  # the token table is not read


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True)])
def test_widening_linear_gives_linears_values_and_gradients(bias, needs):
    """The fast-backward up-projection equals nn.Linear in value and in every gradient."""
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(3, 20, bias=bias).double()
    x = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64, requires_grad=needs[0])
    linear.weight.requires_grad_(needs[1])
    g = torch.randn(2, 5, 20, generator=gen, dtype=torch.float64)
    wanted = [t for t in (x, linear.weight, linear.bias) if t is not None and t.requires_grad]
    ref = linear(x)
    fast = widening_linear(x, linear)
    assert torch.equal(ref, fast)
    for a, b in zip(torch.autograd.grad(ref, wanted, g), torch.autograd.grad(fast, wanted, g)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # no gradient recorded: plain nn.Linear
        assert torch.equal(widening_linear(x, linear), ref.detach())
    assert torch.autograd.gradcheck(
        lambda a: widening_linear(a, linear), (x.detach().requires_grad_(),)
    )
