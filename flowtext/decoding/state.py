"""Decoding as a state and a step: :class:`DecodeState` and :func:`step`.

One global step ``k`` of :func:`step`:

1. the policy names the *awake* tokens (:meth:`~flowtext.policies.ProgressionPolicy.awake`);
2. :func:`evaluate` runs the network on them (fusing the previous step's commits into the same
   pass when the KV cache is on, which also hands back the logits of the committed token just
   before the first uncommitted one: the next-token readout, theory §3d);
3. the policy gives the next times (:meth:`~flowtext.policies.ProgressionPolicy.next_times`):
   tokens whose time reaches 0 commit, the others with a smaller time move;
4. :func:`draw` samples the committing tokens from the readout at the state before the step (a
   one-jump commit of the first uncommitted token after a committed prefix in position order
   reads its committed predecessor's logits, as in training);
5. :func:`move` takes one solver step for the moving tokens (the solver reuses the evaluation
   of step 2 as its first stage);
6. :func:`commit` writes the drawn tokens: ``z_i := e(x_i)``, ``t_i := 0``, order
   ``(k + 1) * base + position`` (ordered by step, then position: tokens committed together see
   each other causally);
7. :func:`end_step` records the times and stops rows that committed an EOS.

What does not change during decoding (network, components, prompt region) is a
:class:`Decoder`; what does (times, latents, canvas, cache, counters) is a :class:`DecodeState`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from flowtext.decoding.inputs import Settings
from flowtext.decoding.sampling import RowNoise, token_probs
from flowtext.errors import ConfigError
from flowtext.flow import Field, Prediction
from flowtext.nn import KVCache
from flowtext.policies import Evaluation, PolicyView
from flowtext.visibility import LIVE

__all__ = [
    "Context",
    "DecodeState",
    "Decoder",
    "commit",
    "draw",
    "end_step",
    "evaluate",
    "initial_state",
    "live",
    "move",
    "next_token_evaluation",
    "step",
]

Commits = tuple[Tensor, Tensor, Tensor]
"""Committed tokens awaiting their pass: ``(z [B, n, d], orders [B, n], positions [B, n])``."""


@dataclass(frozen=True, eq=False)
class Context:
    """The fixed layout: prompt region ``[B, P]`` and positions of the generated region ``[B, L]``.

    Attributes:
        z: Prompt embeddings ``[B, P, d]`` (padding rows hold ``e(0)``).
        t: Prompt times ``[B, P]``: 0, or 1 for padding.
        order: Prompt orders ``[B, P]``: ``LIVE`` for padding.
        positions: Prompt positions ``[B, P]``.
        gen_positions: Positions of the generated region ``[B, L]``.
        fixed: Fixed (infilling) tokens of the generated region ``[B, L]`` bool.
        base: Generated commits at step ``k`` get order ``(k + 1) * base + position`` (after
            every prompt and fixed one; ``base = P + L`` exceeds every position).
    """

    z: Tensor
    t: Tensor
    order: Tensor
    positions: Tensor
    gen_positions: Tensor
    fixed: Tensor
    base: int


@dataclass(frozen=True, eq=False)
class Decoder:
    """What stays fixed while decoding.

    Attributes:
        net: The network (a :class:`~flowtext.nn.FlowTransformer` or any object with its
            ``forward``, ``commit``, ``new_cache``, ``embed``, ``x0_hat`` and ``config``; a
            ``commit_forward`` method, when present, fuses commits into evaluations).
        settings: The checked :class:`~flowtext.decoding.inputs.Settings`.
        noise: Randomness (one generator, or one per row).
        context: The prompt region and positions.
        plan: What the policy precomputed (a static grid ``[K + 1, L]``), or ``None``.
        table: Embedding table ``[V, d]`` of the network, or ``None`` when it has none.
        dtype: Floating dtype of latents and times.
    """

    net: Any
    settings: Settings
    noise: RowNoise
    context: Context
    plan: Tensor | None
    table: Tensor | None
    dtype: torch.dtype


@dataclass(frozen=True, eq=False)
class DecodeState:
    """What changes while decoding (generated region ``[B, L]``).

    Attributes:
        t: Times ``[B, L]`` (0 = committed).
        z: Latents ``[B, L, d]`` (``e(x_i)`` once committed; not read while ``t_i = 1``).
        ids: Canvas ``[B, L]``: committed ids, ``-1`` elsewhere.
        order: Commit orders ``[B, L]``, ``LIVE`` while live.
        commit_step: Step at which each token committed ``[B, L]``: 0 fixed, ``-1`` not yet.
        done: Rows stopped at an EOS ``[B]`` bool.
        eos: Rows whose EOS stopped them ``[B]`` bool.
        k: Global steps taken.
        nfe: Network evaluations so far.
        passes: Forward passes so far.
        cache: KV cache of committed tokens, or ``None`` without the cache.
        pending: Commits not yet in the cache (fused into the next evaluation), or ``None``.
        times: ``t`` after every step so far (``record``), else empty.
        next_logits: Logits ``[B, V]`` of a committed token (the next-token readout), or
            ``None`` before the first one is known.
        next_pos: Absolute position ``[B]`` whose logits ``next_logits`` holds (``-1``: none).
    """

    t: Tensor
    z: Tensor
    ids: Tensor
    order: Tensor
    commit_step: Tensor
    done: Tensor
    eos: Tensor
    k: int = 0
    nfe: int = 0
    passes: int = 0
    cache: KVCache | None = None
    pending: Commits | None = None
    times: tuple[Tensor, ...] = ()
    next_logits: Tensor | None = None
    next_pos: Tensor | None = None


# ------------------------------------------------------------------------------------ the start
def initial_state(
    net: Any, rows: Sequence[Sequence[int]], fixed_ids: Tensor, settings: Settings, dtype
) -> tuple[Context, DecodeState]:
    """The layout and the state before the first step: prompt and fixed tokens committed.

    Args:
        net: The network.
        rows: Prompt ids per row.
        fixed_ids: ``[B, L]``, ``-1`` = free, on the network's device.
        settings: Checked settings.
        dtype: Floating dtype of latents and times.

    Returns:
        ``(context, state)``; with the cache, the state's ``pending`` holds the prompt and
        fixed tokens, which the first evaluation commits.

    Raises:
        ConfigError: So many steps that commit orders would reach ``LIVE``.
    """
    ctx = _context(net, rows, fixed_ids, settings.fixed_order == "joint", dtype)
    if (settings.steps + 1) * ctx.base >= LIVE:
        raise ConfigError(
            f"{settings.steps} steps over {ctx.base} positions exceed the commit orders "
            f"((step, position) below LIVE = {LIVE}); use fewer steps"
        )
    B, L = fixed_ids.shape
    is_fixed = ctx.fixed
    ids = torch.where(is_fixed, fixed_ids, -1)
    t = torch.where(is_fixed, 0.0, torch.ones(B, L, dtype=dtype, device=ids.device)).to(dtype)
    z = torch.zeros(B, L, net.config.d_embed, dtype=dtype, device=ids.device)
    if bool(is_fixed.any()):
        z = torch.where(is_fixed[..., None], net.embed(ids.clamp_min(0)).to(dtype), z)
    pos = ctx.gen_positions
    joint = settings.fixed_order == "joint"
    order = torch.where(is_fixed, torch.zeros_like(pos) if joint else pos, LIVE)
    no = torch.zeros(B, dtype=torch.bool, device=ids.device)
    state = DecodeState(t, z, ids, order, torch.where(is_fixed, 0, -1), no, no.clone())
    if settings.record:
        state = replace(state, times=(t.clone(),))
    if settings.use_cache:
        state = replace(state, cache=net.new_cache(B), pending=_fixed_commits(ctx, state))
    return ctx, state


def _context(net, rows, fixed_ids: Tensor, joint: bool, dtype) -> Context:
    B, L = fixed_ids.shape
    dev = fixed_ids.device
    P = max((len(r) for r in rows), default=0)
    plen = torch.tensor([len(r) for r in rows], dtype=torch.long, device=dev)
    p_ids = torch.zeros(B, P, dtype=torch.long, device=dev)
    for b, r in enumerate(rows):
        if r:
            p_ids[b, : len(r)] = torch.tensor(r, dtype=torch.long, device=dev)
    p_valid = torch.arange(P, device=dev)[None] < plen[:, None]
    p_pos = torch.arange(P, device=dev)[None].expand(B, P)
    d = net.config.d_embed
    return Context(
        z=net.embed(p_ids).to(dtype) if P else torch.zeros(B, 0, d, dtype=dtype, device=dev),
        t=torch.where(p_valid, 0.0, 1.0).to(dtype),
        order=torch.where(p_valid, 0 if joint else p_pos, LIVE),
        positions=p_pos,
        gen_positions=plen[:, None] + torch.arange(L, device=dev)[None],
        fixed=fixed_ids >= 0,
        base=P + L,
    )


def _fixed_commits(ctx: Context, s: DecodeState) -> Commits | None:
    committed = torch.cat([ctx.t == 0, ctx.fixed], 1)
    if not bool(committed.any()):
        return None
    _, _, z, o, pos = _pack(
        committed,
        torch.cat([ctx.z, s.z], 1),
        torch.cat([ctx.order, s.order], 1),
        torch.cat([ctx.positions, ctx.gen_positions], 1),
        fill=(0.0, LIVE, 0),
    )
    return z, o, pos


# ------------------------------------------------------------------------------------ the step
def live(s: DecodeState) -> Tensor:
    """Tokens still to decode ``[B, L]`` bool: uncommitted, in rows not stopped."""
    return (s.t > 0) & ~s.done[:, None]


def step(dec: Decoder, s: DecodeState) -> DecodeState:
    """One global step (see the module docstring); returns the new state."""
    view = PolicyView(s.t, live(s), s.k, dec.settings.steps, dec.plan)
    awake = dec.settings.policy.awake(view)
    if bool(awake.any()):
        idx, valid, view_z, view_t = _pack(awake, s.z, s.t, fill=(0.0, 1.0))
        logits, difficulty, s = evaluate(dec, s, view_z, view_t, idx, valid)
        own = Evaluation(logits, difficulty, idx, valid)
        ev = next_token_evaluation(dec, s, own)
        view = replace(view, evaluation=ev)
        target = dec.settings.policy.next_times(view)
        committing = awake & (target == 0)
        moving = awake & (target > 0) & (target < s.t)
        start = moving & (s.t == 1)  # leaving t = 1: their z was never read; draw it now
        if bool(start.any()):
            s = replace(s, z=torch.where(start[..., None], dec.noise.normal(s.z, start), s.z))
        ids = draw(dec, s, ev, committing)
        s = move(dec, s, own, moving, target)
        if ids is not None:
            s = commit(dec, s, committing, ids)
    return end_step(dec, s)


def evaluate(
    dec: Decoder, s: DecodeState, z: Tensor, t: Tensor, idx: Tensor, valid: Tensor
) -> tuple[Tensor, Tensor, DecodeState]:
    """Run the network on a packed view of the generated region.

    The pass also keeps the next-token readout: the logits of the committed token just before
    the first uncommitted one (from the fused commits, or from the whole sequence without the
    cache) in ``next_logits`` / ``next_pos``.

    Args:
        dec: The decoder.
        s: The state (its pending commits are fused into this pass).
        z: View latents ``[B, n, d]``.
        t: View times ``[B, n]``.
        idx: Position in the region of each view entry ``[B, n]``.
        valid: ``[B, n]`` bool (``False`` = padding).

    Returns:
        ``(logits [B, n, V], difficulty [B, n], new state)``.
    """
    n_eval = _evaluations(dec.net)
    if not dec.settings.use_cache:
        logits, difficulty, nxt, nxt_pos = _full_forward(dec, s, z, t, idx, valid)
        s = _keep_next(s, nxt, nxt_pos)
        return logits, difficulty, replace(s, nfe=s.nfe + n_eval, passes=s.passes + n_eval)
    pos = torch.gather(dec.context.gen_positions, 1, idx)
    o = torch.full_like(idx, LIVE)
    net = dec.net
    if s.pending is None:
        out = net(z, t, o, positions=pos, cache=s.cache)
        s = replace(s, nfe=s.nfe + n_eval, passes=s.passes + n_eval)
        return out.logits, out.difficulty, s
    target = _predecessor(dec, s)
    _, po, ppos = s.pending
    hit = (ppos == target[:, None]) & (po < LIVE)
    found = hit.any(1)
    readout = torch.where(found, hit.to(torch.int8).argmax(1), -1)
    if hasattr(net, "commit_forward"):
        out, cache = net.commit_forward(s.cache, s.pending, z, t, o, pos, readout=readout)
        logits, difficulty, nxt, n_pass = out.logits, out.difficulty, out.next_logits, 1
    else:  # committed tokens and queries in one forward (exact: the former never see the
        # latter), then the cache
        logits, difficulty, nxt = _forward_with_commits(net, s, z, t, o, pos, readout)
        cache, n_pass = net.commit(s.cache, *s.pending), 2
    s = _keep_next(s, nxt, torch.where(found, target, -1))
    n_pass += n_eval - 1  # a self-conditioned evaluation's second pass
    s = replace(s, cache=cache, pending=None, nfe=s.nfe + n_eval, passes=s.passes + n_pass)
    return logits, difficulty, s


def _evaluations(net) -> int:
    """Network passes per evaluation of live tokens: 2 for a self-conditioned network.

    Its denoiser is the two-pass ``f(z, sg(x_hat(f(z, 0))))`` that its bounds score
    (docs/theory.md §3g), so the decoder samples what is scored and counts both passes.
    """
    return 2 if getattr(getattr(net, "config", None), "self_condition", False) else 1


def _forward_with_commits(net, s: DecodeState, z, t, o, pos, readout) -> tuple[Tensor, ...]:
    """Queries' logits and difficulty, and the pending token ``readout``'s logits ``[B, V]``."""
    assert s.pending is not None, "called only with pending commits"
    pz, po, ppos = s.pending
    n = pz.shape[1]
    zeros = torch.zeros(po.shape, dtype=t.dtype, device=t.device)
    out = net(
        torch.cat([pz.to(z.dtype), z], 1),
        torch.cat([zeros, t], 1),
        torch.cat([po, o], 1),
        positions=torch.cat([ppos, pos], 1),
        cache=s.cache,
    )
    gather = readout.clamp_min(0)[:, None, None].expand(-1, 1, out.logits.shape[-1])
    nxt = torch.gather(out.logits[:, :n], 1, gather)[:, 0]
    return out.logits[:, n:], out.difficulty[:, n:], nxt


def _frontier(s: DecodeState) -> Tensor:
    """First uncommitted index of the generated region ``[B]`` (``L`` when none)."""
    L = s.t.shape[1]
    ar = torch.arange(L, device=s.t.device)
    return torch.where(s.t > 0, ar[None], L).amin(1)


def _predecessor(dec: Decoder, s: DecodeState) -> Tensor:
    """Absolute position ``[B]`` of the token before the frontier (``-1``: none)."""
    f = _frontier(s)
    target = dec.context.gen_positions[:, 0] + f - 1  # gen_positions[:, 0] = prompt length
    return torch.where((target >= 0) & (f < s.t.shape[1]), target, -1)


def _in_order(dec: Decoder, s: DecodeState, f: Tensor) -> Tensor:
    """Whether prompt and generated tokens before ``f`` have non-decreasing orders ``[B]``."""
    ctx, o = dec.context, s.order
    ok = torch.ones_like(s.t, dtype=torch.bool)
    ok[:, 1:] = o[:, 1:] >= o[:, :-1]
    plen = ctx.gen_positions[:, 0]
    if ctx.order.shape[1]:
        last = torch.gather(ctx.order, 1, (plen - 1).clamp_min(0)[:, None])[:, 0]
        ok[:, 0] = (plen == 0) | (o[:, 0] >= last)
    ar = torch.arange(s.t.shape[1], device=s.t.device)
    return (ok | (ar[None] >= f[:, None])).all(1)


def _keep_next(s: DecodeState, logits: Tensor, pos: Tensor) -> DecodeState:
    """Store the readout ``logits [B, V]`` of rows whose ``pos [B]`` is ``>= 0``."""
    found = pos >= 0
    if s.next_logits is not None and s.next_pos is not None:  # always set together
        logits = torch.where(found[:, None], logits, s.next_logits)
        pos = torch.where(found, pos, s.next_pos)
    return replace(s, next_logits=logits, next_pos=pos)


def next_token_evaluation(dec: Decoder, s: DecodeState, ev: Evaluation) -> Evaluation:
    """``ev`` with the next-token readout where it applies (theory §3d).

    Per row, the first uncommitted token, when awake at ``t = 1`` after a prompt and committed
    prefix in position order, gets the logits of its committed predecessor: its distribution if
    it commits in one jump (what :func:`draw` samples and the policy sees). Moves keep the
    token's own output.

    Args:
        dec: The decoder.
        s: The state the evaluation was made at.
        ev: The network's own evaluation of the awake tokens.

    Returns:
        The evaluation to commit from.
    """
    if s.next_logits is None or s.next_pos is None:
        return ev
    f = _frontier(s)
    ok = (s.next_pos >= 0) & (s.next_pos == _predecessor(dec, s)) & _in_order(dec, s, f)
    at = (ev.index == f[:, None]) & ev.valid & ok[:, None]
    at = at & (torch.gather(s.t, 1, ev.index) == 1)
    if not bool(at.any()):
        return ev
    logits = torch.where(at[..., None], s.next_logits[:, None].to(ev.logits.dtype), ev.logits)
    return replace(ev, logits=logits)


def _full_forward(dec: Decoder, s: DecodeState, z, t, idx, valid) -> tuple[Tensor, ...]:
    """Cache-less evaluation: the whole sequence with the view written in, read at the view.

    Returns:
        ``(logits [B, n, V], difficulty [B, n], next_logits [B, V], next_pos [B])``: the view's
        outputs and the logits of the token before the frontier (``next_pos = -1``: none).
    """
    ctx = dec.context
    rows = torch.arange(idx.shape[0], device=idx.device)[:, None].expand_as(idx)
    gz, gt = s.z.clone(), s.t.clone()
    gz[rows[valid], idx[valid]] = z[valid]
    gt[rows[valid], idx[valid]] = t[valid]
    out = dec.net(
        torch.cat([ctx.z, gz], 1),
        torch.cat([ctx.t, gt], 1),
        torch.cat([ctx.order, s.order], 1),
        positions=torch.cat([ctx.positions, ctx.gen_positions], 1),
    )
    P, V = ctx.z.shape[1], out.logits.shape[-1]
    gidx = idx + P
    logits = torch.gather(out.logits, 1, gidx[..., None].expand(-1, -1, V))
    f = _frontier(s)
    at = torch.where(f > 0, P + f - 1, ctx.gen_positions[:, 0] - 1).clamp_min(0)
    nxt = torch.gather(out.logits, 1, at[:, None, None].expand(-1, 1, V))[:, 0]
    return logits, torch.gather(out.difficulty, 1, gidx), nxt, _predecessor(dec, s)


def draw(dec: Decoder, s: DecodeState, ev: Evaluation, committing: Tensor) -> Tensor | None:
    """The canvas with the committing tokens drawn from the step's readout, or ``None``.

    Greedy takes the argmax; otherwise the tokens are sampled (per row's generator) from the
    temperature / top-p distribution of the logits, in float64.
    """
    c_view = torch.gather(committing, 1, ev.index) & ev.valid
    if not bool(c_view.any()):
        return None
    rows = c_view.nonzero()[:, 0]
    logits = ev.logits[c_view]
    cfg = dec.settings
    if cfg.greedy:
        new = logits.argmax(-1)
    else:
        probs = token_probs(logits.to(torch.float64), cfg.temperature, cfg.top_p)
        new = dec.noise.multinomial(probs, rows)
    return s.ids.index_put((rows, ev.index[c_view]), new)


def move(
    dec: Decoder, s: DecodeState, ev: Evaluation, moving: Tensor, target: Tensor
) -> DecodeState:
    """One solver step of the moving tokens to their ``target`` times.

    The solver gets the step's evaluation as its first stage (``start``); any further stage is
    a new evaluation of the same view.
    """
    idx, valid = ev.index, ev.valid
    m_view = torch.gather(moving, 1, idx) & valid
    if not bool(m_view.any()):
        return s
    d = s.z.shape[-1]
    view_z = torch.gather(s.z, 1, idx[..., None].expand(-1, -1, d))
    view_t = torch.gather(s.t, 1, idx)
    t_next = torch.where(m_view, torch.gather(target, 1, idx), view_t)
    stages = _Stages(dec, s, idx, valid)
    z_new = dec.settings.solver.step(
        Field.categorical(stages.predict, dec.settings.schedule),
        view_z,
        view_t,
        t_next,
        noise=dec.noise,
        start=stages.prediction(ev.logits),
    )
    rows = m_view.nonzero()[:, 0]
    z = s.z.index_put((rows, idx[m_view]), z_new[m_view])
    return replace(stages.state, z=z, t=torch.where(moving, target, s.t))


class _Stages:
    """The view's predictor for a solver's later stages; keeps the state's counters."""

    def __init__(self, dec: Decoder, s: DecodeState, idx: Tensor, valid: Tensor) -> None:
        self.dec, self.state, self.idx, self.valid = dec, s, idx, valid

    def prediction(self, logits: Tensor) -> Prediction:
        x0 = self.dec.net.x0_hat(logits).to(self.dec.dtype)
        return Prediction(x0_hat=x0, logits=logits, table=self.dec.table)

    def predict(self, z: Tensor, t: Tensor) -> Prediction:
        logits, _, self.state = evaluate(self.dec, self.state, z, t, self.idx, self.valid)
        return self.prediction(logits)


def commit(dec: Decoder, s: DecodeState, committing: Tensor, ids: Tensor) -> DecodeState:
    """Commit tokens: ``z_i := e(x_i)``, ``t_i := 0``, order ``(k + 1) * base + position``.

    Args:
        dec: The decoder.
        s: The state (before commits).
        committing: ``[B, L]`` bool.
        ids: The canvas with the committing tokens drawn (from :func:`draw`).

    Returns:
        The new state; with the cache, ``pending`` holds the commits for the next pass.
    """
    dtype = dec.dtype
    z = s.z.index_put(committing.nonzero(as_tuple=True), dec.net.embed(ids[committing]).to(dtype))
    order = torch.where(
        committing, (s.k + 1) * dec.context.base + dec.context.gen_positions, s.order
    )
    pending = s.pending
    if dec.settings.use_cache:
        pos = dec.context.gen_positions
        _, _, pz, po, ppos = _pack(committing, z, order, pos, fill=(0.0, LIVE, 0))
        pending = (pz, po, ppos)
    return replace(
        s,
        z=z,
        ids=ids,
        t=torch.where(committing, 0.0, s.t).to(dtype),
        order=order,
        commit_step=torch.where(committing, s.k + 1, s.commit_step),
        pending=pending,
    )


def end_step(dec: Decoder, s: DecodeState) -> DecodeState:
    """Count the step, record the times, and stop rows that committed an EOS.

    A row stops once an EOS is committed with every token before it committed.
    """
    s = replace(s, k=s.k + 1, times=s.times + (s.t,) if dec.settings.record else s.times)
    eos_id = dec.settings.eos_id
    if eos_id is None:
        return s
    L = s.t.shape[1]
    ar = torch.arange(L, device=s.t.device)
    committed = s.t == 0
    first = torch.where(committed & (s.ids == eos_id), ar[None], L).amin(1)
    before_done = (committed | (ar[None] >= first[:, None])).all(1)
    newly = (first < L) & before_done & ~s.done
    return replace(s, eos=s.eos | newly, done=s.done | newly)


def _pack(mask: Tensor, *values: Tensor, fill: Sequence[Any]) -> tuple[Tensor, ...]:
    """Gather the masked entries of each row to the front: ``(idx, valid, *values)``.

    Each output is ``[B, n_max, ...]`` with ``n_max`` the largest count of a row; padding entries
    hold the matching ``fill``.
    """
    n = int(mask.sum(1).max()) if mask.numel() else 0
    idx = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :n]
    valid = torch.gather(mask, 1, idx)
    out = []
    for v, f in zip(values, fill, strict=True):
        g = idx.view(*idx.shape, *([1] * (v.ndim - 2))).expand(*idx.shape, *v.shape[2:])
        got = torch.gather(v, 1, g)
        vmask = valid.view(*valid.shape, *([1] * (v.ndim - 2)))
        out.append(torch.where(vmask, got, torch.as_tensor(f, dtype=v.dtype, device=v.device)))
    return (idx, valid, *out)
