"""The SDPA backend's fast paths (:func:`sdpa_layout`) are exact and never fire wrongly."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from flowtext.attention import (
    LIVE,
    attention,
    sdpa_attention,
    sdpa_layout,
    two_stream_layout,
    visibility_mask,
)
from flowtext.errors import ShapeError


def layout(seed, b, lk, p_committed, p_one, n_groups):
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(b, lk, generator=gen)
    t = torch.rand(b, lk, generator=gen).clamp(1e-3, 0.999)
    t[u < p_committed] = 0.0
    t[u > 1 - p_one] = 1.0
    o = torch.randint(0, n_groups, (b, lk), generator=gen)
    return t, o


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    b=st.integers(1, 3),
    lk=st.integers(1, 12),
    lq_frac=st.floats(0.0, 1.0),
    p_committed=st.sampled_from([0.0, 0.0, 0.3]),
    p_one=st.sampled_from([0.0, 0.0, 0.2]),
    n_groups=st.sampled_from([1, 1, 3]),
)
def test_all_visible_implies_full_mask_and_same_output(
    seed, b, lk, lq_frac, p_committed, p_one, n_groups
):
    t, o = layout(seed, b, lk, p_committed, p_one, n_groups)
    lq = max(1, round(lq_frac * lk))
    t_q, o_q = t[:, lk - lq :], o[:, lk - lq :]
    mask = visibility_mask(t_q, o_q, t, o)
    fast = sdpa_layout(t_q, o_q, t, o).kind == "dense"
    if fast:
        assert bool(mask.all())
    if p_committed == 0 and p_one == 0 and n_groups == 1:  # the diffusion single stream
        assert fast
    gen = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(b, 2, lq, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(b, 2, lk, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
    torch.testing.assert_close(sdpa_attention(q, k, v, t_q, o_q, t, o), ref)


def test_fast_path_rejects_each_violated_condition():
    t = torch.full((1, 4), 0.5)
    o = torch.full((1, 4), LIVE)
    assert sdpa_layout(t, o, t, o).kind == "dense"
    for i, (dt, do) in enumerate([(0.0, None), (1.0, None), (None, 3)]):
        t2, o2 = t.clone(), o.clone()
        if dt is not None:
            t2[0, i] = dt
        if do is not None:
            o2[0, i] = do
        assert sdpa_layout(t2, o2, t2, o2).kind != "dense"
        assert not bool(visibility_mask(t2, o2, t2, o2).all())


def test_fast_path_keeps_shape_errors():
    t = torch.full((1, 4), 0.5)
    o = torch.full((1, 4), LIVE)
    with pytest.raises(ShapeError):
        sdpa_layout(t, o[:, :3], t, o)
    with pytest.raises(ShapeError):
        sdpa_attention(*(torch.zeros(1, 1, 4, 8) for _ in range(3)), t, o, t[:, :3], o)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    b=st.integers(1, 3),
    n=st.integers(1, 10),
    kind=st.sampled_from(["increasing", "ties", "live", "shuffled"]),
)
def test_causal_fast_path_is_exact_and_never_fires_wrongly(seed, b, n, kind):
    """``sdpa_layout`` says causal iff committed orders strictly increase; the mask is ``tril``."""
    gen = torch.Generator().manual_seed(seed)
    o = torch.randint(1, 4, (b, n), generator=gen).cumsum(1)
    t = torch.zeros(b, n)
    if kind == "ties" and n > 1:
        o[:, 1] = o[:, 0]
    if kind == "live":
        t[:, -1] = 0.5
    if kind == "shuffled" and n > 1:
        o = o[:, torch.randperm(n, generator=gen)]
    mask = visibility_mask(t, o, t, o)
    tril = torch.ones(n, n, dtype=torch.bool).tril().expand(b, n, n)
    fast = sdpa_layout(t, o, t, o).kind == "causal"
    if fast:
        assert torch.equal(mask, tril)
    if kind == "increasing":
        assert fast
    elif n > 1 and not (kind == "shuffled" and bool((o[:, 1:] > o[:, :-1]).all())):
        assert not fast
    q, k, v = (torch.randn(b, 2, n, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
    torch.testing.assert_close(sdpa_attention(q, k, v, t, o, t, o), ref)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    b=st.integers(1, 3),
    n=st.integers(1, 9),
    block=st.integers(1, 4),
    kind=st.sampled_from(["two-stream", "two-stream", "ties", "committed-tail", "odd", "noise"]),
)
def test_split_fast_path_is_exact_and_never_fires_wrongly(seed, b, n, block, kind):
    """``"split"`` fires on a committed causal half + a live half; output and gradients match."""
    gen = torch.Generator().manual_seed(seed)
    ids = (torch.arange(n) // block).expand(b, n)
    t_noisy = torch.rand(b, n, generator=gen, dtype=torch.float64).clamp(1e-3, 1.0)
    if kind == "noise":  # tokens at t = 1 are live too
        t_noisy[:, 0] = 1.0
    t, o = two_stream_layout(ids, t_noisy)
    if kind == "ties" and n > 1:
        o[:, 1] = o[:, 0]
    if kind == "committed-tail":
        t[:, -1] = 0.0
    if kind == "odd":  # one extra committed key in front: the halves no longer line up
        t, o = torch.cat([t.new_zeros(b, 1), t], 1), torch.cat([o.new_zeros(b, 1) - 1, o], 1)
    got = sdpa_layout(t, o, t, o)
    fires = kind in ("two-stream", "noise") or (kind == "ties" and n == 1)
    assert (got.kind == "split") == fires
    length = t.shape[1]
    mask = visibility_mask(t, o, t, o)
    if fires:
        torch.testing.assert_close(got.mask[:, 0], mask[:, length // 2 :], rtol=0, atol=0)
    q, k, v = (
        torch.randn(b, 2, length, 4, generator=gen, dtype=torch.float64, requires_grad=True)
        for _ in range(3)
    )
    g = torch.randn(b, 2, length, 4, generator=gen, dtype=torch.float64)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
    out = sdpa_attention(q, k, v, t, o, t, o, layout=got)
    torch.testing.assert_close(out, ref)
    for a, c in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, c)


@pytest.mark.parametrize("block", [1, 2, 3, 8])
def test_two_stream_clean_stream_is_causal_and_noisy_blocks_see_earlier_blocks(block):
    n = 7
    ids = (torch.arange(n) // block)[None]
    t, o = two_stream_layout(ids, torch.full((1, n), 0.5))
    mask = visibility_mask(t, o, t, o)[0]
    assert torch.equal(mask[:n, :n], torch.ones(n, n, dtype=torch.bool).tril())
    assert not bool(mask[:n, n:].any())  # clean queries never see noisy keys
    same_block = ids[0][:, None] == ids[0][None, :]
    earlier = ids[0][:, None] > ids[0][None, :]
    assert torch.equal(mask[n:, :n], earlier)
    assert torch.equal(mask[n:, n:], same_block)


# ------------------------------------------------------------------ plans reused across layers


def _run(net, kind):
    """Outputs and parameter gradients of one forward + backward of ``net`` on layout ``kind``."""
    gen = torch.Generator().manual_seed(1)
    b, n = 2, 8
    z = torch.randn(b, n, 8, generator=gen, dtype=torch.float64)
    net.zero_grad(set_to_none=True)
    if kind == "cached":
        cache = net.commit(
            net.new_cache(b), z[:, :3], torch.arange(3).expand(b, 3), torch.arange(3)
        )
        t = torch.rand(b, n - 3, generator=gen, dtype=torch.float64)
        out = net(z[:, 3:], t, torch.full((b, n - 3), LIVE), torch.arange(3, n), cache)
    elif kind == "two-stream":
        t, o = two_stream_layout((torch.arange(n) // 3).expand(b, n), torch.full((b, n), 0.5))
        out = net(torch.cat([z, z], 1), t.double(), o, torch.arange(n).repeat(2))
    else:  # causal (a clean stream), dense (diffusion) or mixed (Evo-like)
        t = {"causal": 0.0, "dense": 0.5}.get(kind)
        t = (
            torch.rand(b, n, generator=gen, dtype=torch.float64)
            if t is None
            else torch.full((b, n), t)
        )
        t[:, :2] = 0.0 if kind == "mixed" else t[:, :2]
        o = torch.where(t == 0, torch.arange(n), LIVE)
        out = net(z, t, o)
    (out.logits.square().mean() + out.hidden.mean()).backward()
    return out.logits.detach(), [p.grad.clone() for p in net.parameters() if p.grad is not None]


@pytest.mark.parametrize("kind", ["dense", "causal", "mixed", "two-stream", "cached"])
def test_one_plan_per_forward_gives_the_per_layer_results(monkeypatch, kind):
    """The model builds its SDPA layout once per forward; per-layer building gives equal bits."""
    import flowtext.attention as A
    import flowtext.attention.reference as R
    import flowtext.nn.transformer as T
    from tests._nets import perturbed_net

    net = perturbed_net(n_layers=3)
    builds = []
    original = R.sdpa_layout
    for module in (A, R):  # the plan's build, and the per-call build of sdpa_attention
        monkeypatch.setattr(module, "sdpa_layout", lambda *a: builds.append(1) or original(*a))
    shared = _run(net, kind)
    forwards = 2 if kind == "cached" else 1  # commit + forward
    assert len(builds) == forwards
    monkeypatch.setattr(T, "plan_attention", lambda *a, **k: None)  # every layer builds its own
    builds.clear()
    per_layer = _run(net, kind)
    assert len(builds) == 3 * forwards
    assert torch.equal(shared[0], per_layer[0])
    assert len(shared[1]) == len(per_layer[1]) > 0
    assert all(torch.equal(a, b) for a, b in zip(shared[1], per_layer[1]))


def test_sdpa_layout_kinds_and_reuse_match_the_mask():
    """``sdpa_layout`` picks dense / causal / split / mask as the mask says; reuse is exact."""
    from flowtext.attention import plan_attention, sdpa_layout

    n = 6
    cases = {
        "causal": (torch.zeros(2, n), torch.arange(n).expand(2, n)),
        "dense": (torch.full((2, n), 0.5), torch.zeros(2, n, dtype=torch.long)),
        "mask": layout(3, 2, n, 0.3, 0.2, 3),
        "split": two_stream_layout((torch.arange(n) // 2).expand(2, n), torch.full((2, n), 0.5)),
    }
    for kind, (t, o) in cases.items():
        got = sdpa_layout(t, o, t, o)
        mask = visibility_mask(t, o, t, o)
        m = t.shape[1]
        assert got.kind == kind
        assert bool(mask.all()) == (kind == "dense")
        assert torch.equal(mask, torch.ones(m, m).tril().bool().expand_as(mask)) == (
            kind == "causal"
        )
        rows = {"mask": mask, "split": mask[:, m // 2 :]}.get(kind)
        assert got.mask is None if rows is None else torch.equal(got.mask[:, 0], rows)
        q, k, v = torch.randn(3, 2, 2, m, 4).unbind(0)
        plan = plan_attention(t, o, t, o, backend="sdpa")
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
        torch.testing.assert_close(attention(q, k, v, t, o, t, o, backend="sdpa", plan=plan), ref)


def test_plans_are_refused_for_other_vectors_or_backends():
    from flowtext.attention import plan_attention
    from flowtext.errors import ConfigError

    t, o = layout(0, 1, 5, 0.3, 0.2, 2)
    q = torch.randn(1, 1, 5, 4)
    plan = plan_attention(t, o, t, o, backend="sdpa")
    assert attention(q, q, q, t, o, t, o, backend="sdpa", plan=plan).shape == q.shape
    with pytest.raises(ConfigError, match="plan_attention"):
        attention(q, q, q, t, o, t, o.clone(), backend="sdpa", plan=plan)
    o.add_(0)  # an in-place change: the plan is stale
    with pytest.raises(ConfigError, match="plan_attention"):
        attention(q, q, q, t, o, t, o, backend="sdpa", plan=plan)
    with pytest.raises(ConfigError, match="AttentionPlan"):
        attention(q, q, q, t, o, t, o, backend="sdpa", plan="yes")
    fresh = plan_attention(t, o, t, o, backend="auto")  # CPU tensors: resolves to SDPA
    assert fresh.backend == "sdpa"
    with pytest.raises(ConfigError, match="backend"):
        attention(q, q, q, t, o, t, o, backend="triton", plan=fresh)
    with pytest.raises(ConfigError, match="unknown attention backend"):
        plan_attention(t, o, t, o, backend="flash")


def test_two_stream_benchmark_runs_and_restores_the_fast_paths(capsys):
    import importlib.util
    import pathlib

    import flowtext.attention.reference as reference
    import flowtext.nn.layers as layers

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "two_stream.py"
    spec = importlib.util.spec_from_file_location("two_stream_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    before = (layers.widening_linear, reference._split_flag)
    bench.main(["--quick"])
    lines = capsys.readouterr().out.strip().splitlines()
    names = ["both on", "widening_linear off", "split off", "both off"]
    assert [line.split(":")[0] for line in lines] == names
    assert float(lines[0].rsplit(" ", 1)[1]) == 1.0
    assert (layers.widening_linear, reference._split_flag) == before
