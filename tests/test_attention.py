"""The SDPA backend's no-mask fast path (``all_visible``) is exact and never fires wrongly."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from flowtext.attention import (
    LIVE,
    all_visible,
    sdpa_attention,
    two_stream_layout,
    visibility_mask,
)
from flowtext.attention.reference import is_causal
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
    fast = all_visible(t_q, o_q, t, o)
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
    assert all_visible(t, o, t, o)
    for i, (dt, do) in enumerate([(0.0, None), (1.0, None), (None, 3)]):
        t2, o2 = t.clone(), o.clone()
        if dt is not None:
            t2[0, i] = dt
        if do is not None:
            o2[0, i] = do
        assert not all_visible(t2, o2, t2, o2)
        assert not bool(visibility_mask(t2, o2, t2, o2).all())


def test_fast_path_keeps_shape_errors():
    t = torch.full((1, 4), 0.5)
    o = torch.full((1, 4), LIVE)
    with pytest.raises(ShapeError):
        all_visible(t, o[:, :3], t, o)
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
    """``is_causal`` holds iff committed orders strictly increase; then the mask is ``tril``."""
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
    fast = is_causal(t, o, t, o)
    if fast:
        assert torch.equal(mask, tril)
    if kind == "increasing":
        assert fast
    elif n > 1 and not (kind == "shuffled" and bool((o[:, 1:] > o[:, :-1]).all())):
        assert not fast
    q, k, v = (torch.randn(b, 2, n, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
    torch.testing.assert_close(sdpa_attention(q, k, v, t, o, t, o), ref)


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
