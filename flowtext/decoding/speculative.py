"""Self-speculative decoding: the noisy stream drafts, the clean stream's AR readout verifies.

One network plays both parts of speculative decoding (Leviathan et al. 2023; Stern et al. 2018
for the blockwise greedy form). Each pass runs one stream: the committed tokens (``t = 0``, in
position order, so each one's logits are the AR conditional of the next token, theory §3d; with
the exact KV cache only those committed since the last pass), the pending drafts committed
after them in the same order, and one group of live slots at ``t = 1`` per possible outcome:
group ``a`` has order ``n + a`` and slots at positions ``n + a + 1 ..`` (up to ``draft - 1`` of
them), so it sees the prefix and the first ``a`` drafts and reads out the marginals
``q(x_j | x_{<n+a})`` that a ``block`` bound trains at a block's first step. The pass then

1. verifies the drafts in order against the AR conditionals ``p`` read at the drafts
   themselves: draft ``d ~ q`` is kept with probability ``min(1, p(d) / q(d))`` (greedy: kept
   iff it is ``argmax p``); the first one refused is replaced by a draw from
   ``(p - q)^+ / |p - q|^+`` (greedy: ``argmax p``) and the rest are dropped; when every draft
   was kept, one more token is drawn from the AR conditional after the last one;
2. draws the next pass's drafts from the slots of the group that saw exactly the kept drafts,
   after the one token drawn from ``p`` (``q`` is kept for the next pass's test).

So every pass commits at least one token, and the committed text is distributed exactly as the
model's own AR decoder would draw it (``autoregressive``, same temperature and top-p): the drafts
only decide how many tokens one evaluation commits. docs/theory.md §3i has the argument;
``tests/test_speculative.py`` checks it on a small vocabulary.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from flowtext import schedules as _schedules
from flowtext.decoding.inputs import check_number, check_rows, check_sampling
from flowtext.decoding.result import DecodeStats, GenerationResult
from flowtext.decoding.sampling import token_probs
from flowtext.errors import ConfigError
from flowtext.nn.latents import bind_prior_schedule
from flowtext.visibility import LIVE

__all__ = ["speculative_generate"]


@dataclass
class _Row:
    """One row's decoding state: committed ids (prompt included) and pending drafts."""

    ids: list[int]
    end: int  # total length when done (prompt + length)
    drafts: list[int] = field(default_factory=list)
    q: Tensor | None = None  # draft distributions [k, V] (sampling) or None (greedy)
    passes: int = 0
    when: list[int] = field(default_factory=list)  # global step of each generated token
    cached: int = 0  # ids already in the KV cache
    eos: bool = False
    gen: torch.Generator | None = None  # the row's draws (noise, drafts, tests)

    @property
    def done(self) -> bool:
        return self.eos or len(self.ids) >= self.end


def _check(draft: Any, draft_temperature: Any) -> None:
    if not isinstance(draft, int) or isinstance(draft, bool) or draft < 1:
        raise ConfigError(f"speculative draft must be a positive int, got {draft!r}")
    if draft_temperature is not None:
        check_number("draft_temperature", draft_temperature, 0, math.inf, True, "Or None.")


def _groups(row: _Row, draft: int) -> list[tuple[int, int, int]]:
    """``(order, first slot position, slots)`` of the row's slot groups, one per outcome.

    Group ``a`` (``a = 0..k``) is the block from position ``n + a`` with order ``n + a``: it
    sees the committed prefix and the first ``a`` drafts, so when a pass keeps exactly ``a``
    drafts, its slots after ``n + a`` draft the next pass's tokens. Position ``n + a`` itself
    gets its token from the AR readout, so it has no slot, except with nothing committed
    (``n = 0``), where the slot at position 0 is the null query of token 0.
    """
    n = len(row.ids)
    if row.done:
        return []
    if n == 0:
        return [(0, 0, min(draft, row.end))]
    return [
        (n + a, n + a + 1, max(0, min(draft, row.end - n - a) - 1))
        for a in range(len(row.drafts) + 1)
    ]


def _queries(rows: list[_Row], draft: int, skip: list[int], d: int, dtype) -> tuple[Tensor, ...]:
    """``(ids, t, o, pos, eps)`` of one pass's tokens, each row from its token ``skip[b]`` on.

    A row's tokens are its committed ids and drafts at ``t = 0`` (order = position), then its
    slot groups at ``t = 1``; the first ``skip[b]`` are left out (they are in the cache).
    Padding is more tokens at ``t = 1``, which no other token sees.
    """
    seqs = [(r.ids + r.drafts)[k:] for r, k in zip(rows, skip)]
    groups = [_groups(r, draft) for r in rows]
    width = max(len(s) + sum(c for *_, c in g) for s, g in zip(seqs, groups))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    t = torch.ones(len(rows), width, dtype=dtype)
    o = torch.zeros(len(rows), width, dtype=torch.long)
    pos = torch.zeros(len(rows), width, dtype=torch.long)
    eps = torch.zeros(len(rows), width, d, dtype=dtype)
    for i, (seq, g, k) in enumerate(zip(seqs, groups, skip)):
        n = len(seq)
        ids[i, :n], t[i, :n] = torch.tensor(seq, dtype=torch.long), 0.0
        o[i, :n] = pos[i, :n] = torch.arange(k, k + n)
        for order, first, count in g:
            o[i, n : n + count] = order  # the group sees committed orders < order
            pos[i, n : n + count] = torch.arange(first, first + count)
            n += count
        # each row draws only its own slots' noise: its tokens do not depend on the rest of the
        # batch, nor on whether the committed tokens are cached
        slots = n - len(seq)
        eps[i, len(seq) : n] = torch.randn(slots, d, generator=rows[i].gen, dtype=dtype)
    return ids, t, o, pos, eps


def _inputs(net, schedule, rows: list[_Row], draft: int, skip: list[int]) -> tuple[Tensor, ...]:
    """``(z, t, o, pos)`` of :func:`_queries` on the network's device (slots: ``sigma(1) eps``)."""
    param = next(net.parameters())
    q = _queries(rows, draft, skip, net.config.d_embed, param.dtype)
    ids, t, o, pos, eps = (v.to(param.device) for v in q)
    z = torch.where((t == 0)[..., None], net.embed(ids), schedule.sigma(t)[..., None] * eps)
    return z, t, o, pos


def _full_pass(net, schedule, rows: list[_Row], draft: int) -> list[tuple[Tensor, Tensor]]:
    """One pass over each row's whole sequence: per row ``(reads [k+1, V], groups' logits)``."""
    z, t, o, pos = _inputs(net, schedule, rows, draft, [0] * len(rows))
    logits = net(z, t, o, pos).logits
    out = []
    for b, r in enumerate(rows):
        n, k = len(r.ids), len(r.drafts)
        groups = logits[b, n + k :]
        # committed token j's logits are the AR conditional of token j + 1; with nothing
        # committed the one slot group (order 0, sees nothing) starts with the null query
        out.append((logits[b, n - 1 : n + k] if n > 0 else groups[:1], groups))
    return out


def _cached_pass(net, schedule, rows: list[_Row], draft: int, cache) -> tuple[list, Any]:
    """:func:`_full_pass` against the exact KV cache; returns the extended cache too.

    The tokens committed since the last pass (``row.ids[row.cached:]``) are committed into the
    cache in the same trunk pass (``commit_forward``); the last one's readout is the AR
    conditional of the first draft. Then drafts and slot groups are the queries.
    """
    dev = next(net.parameters()).device
    pending = [r.ids[r.cached :] for r in rows]
    width = max(len(p) for p in pending)
    ids_c = torch.zeros(len(rows), width, dtype=torch.long)
    o_c = torch.full((len(rows), width), LIVE, dtype=torch.long)  # padding: seen by nobody
    pos_c = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (r, p) in enumerate(zip(rows, pending)):
        ids_c[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        o_c[i, : len(p)] = pos_c[i, : len(p)] = torch.arange(r.cached, r.cached + len(p))
    z, t, o, pos = _inputs(net, schedule, rows, draft, [len(r.ids) for r in rows])  # queries
    readout = torch.tensor([len(p) - 1 for p in pending], device=dev) if width else None
    committed = (net.embed(ids_c.to(dev)), o_c.to(dev), pos_c.to(dev))
    res, cache = net.commit_forward(cache, committed, z, t, o, pos, readout=readout)
    out = []
    for b, r in enumerate(rows):
        k = len(r.drafts)
        groups = res.logits[b, k:]
        if r.ids:
            out.append((torch.cat([res.next_logits[b : b + 1], res.logits[b, :k]]), groups))
        else:
            out.append((groups[:1], groups))
        r.cached = len(r.ids)
    return out, cache


def _draw(p: Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(p, 1, generator=generator))


def _verify(row: _Row, p: Tensor, generator) -> list[int]:
    """The tokens this pass commits for ``row``: kept drafts, then one exact token.

    ``p`` ``[k + 1, V]``: the AR conditionals at the ``k`` drafts and after them.
    """
    out: list[int] = []
    for i, d in enumerate(row.drafts):
        q = row.q[i] if row.q is not None else None
        if q is None:  # greedy: p and q are one-hot
            if int(p[i].argmax()) != d:
                return out + [int(p[i].argmax())]
        else:
            ratio = float(p[i, d] / q[d]) if float(q[d]) > 0 else 0.0
            if ratio < 1 and float(torch.rand((), generator=generator)) >= ratio:
                rest = (p[i] - q).clamp_min(0.0)  # the residual law of the refused draft
                mass = float(rest.sum())
                return out + [_draw(rest / mass if mass > 0 else p[i], generator)]
        out.append(d)
    return out + [_draw(p[len(row.drafts)], generator)]


def _advance(
    row: _Row, reads: Tensor, groups: Tensor, draft: int, draw: _Sampler, eos_id: int | None
) -> int:
    """Verify ``row``'s drafts, commit, and draw the next drafts from the right slot group.

    Args:
        row: The row (changed in place).
        reads: ``[k + 1, V]``: the AR conditionals at the ``k`` drafts and after them.
        groups: The slot groups' logits, one after the other (``_groups`` order).
        draft: Slots per group.
        draw: The commit rule.
        eos_id: End-of-sequence id or ``None``.

    Returns:
        The number of tokens committed.
    """
    n = len(row.ids)
    layout = _groups(row, draft)
    new = _verify(row, draw.probs(reads), row.gen)
    kept = len(new) - 1  # drafts kept: group `kept` saw exactly them
    if eos_id is not None and eos_id in new:
        new, row.eos = new[: new.index(eos_id) + 1], True
    new = new[: row.end - n]
    row.ids += new
    row.drafts, row.q = [], None
    offset = sum(c for *_, c in layout[:kept])  # where group `kept` lies
    _, first, slots = layout[kept]
    start = len(row.ids) - first  # its slots from the first uncommitted position (0 or 1)
    count = min(slots - start, row.end - len(row.ids))
    if not row.done and count > 0:
        q = draw.probs(groups[offset + start : offset + start + count], draft=True)
        row.drafts = [int(v) for v in q.argmax(-1)] if draw.greedy else draw.tokens(q, row.gen)
        row.q = None if draw.greedy else q
    return len(new)


@dataclass(frozen=True)
class _Sampler:
    """The decoding's commit rule: probabilities of logits, and draws from them."""

    temperature: float
    top_p: float
    greedy: bool
    draft_temperature: float

    def probs(self, logits: Tensor, draft: bool = False) -> Tensor:
        """``[n, V]`` probabilities (one-hot argmax when greedy); ``draft``: the drafts' law."""
        logits = logits.float().cpu()  # small; the draws use a CPU generator
        if self.greedy:
            return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
        return token_probs(
            logits, self.draft_temperature if draft else self.temperature, self.top_p
        )

    def tokens(self, probs: Tensor, generator: torch.Generator | None) -> list[int]:
        """One draw per row of ``probs`` ``[n, V]``."""
        return [int(v) for v in torch.multinomial(probs, 1, generator=generator)[:, 0]]


def speculative_generate(
    net,
    schedule,
    *,
    prompt: Any = None,
    prompt_lengths: Any = None,
    length: int,
    draft: int = 4,
    draft_temperature: float | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    record: bool = False,
    tokenizer: Any = None,
    batch_size: int | None = None,
) -> GenerationResult:
    """Decode with the model's own AR distribution, several tokens per evaluation when drafts hold.

    See the module docstring. Rows advance together, one batched pass per evaluation, each at
    its own length. With the cache a pass runs the tokens committed since the last pass, the
    drafts and the slot groups; without it, the whole sequence.

    Args:
        net: A flow network (``embed``, ``config.d_embed``, forward ``(z, t, o, positions)``).
        schedule: Its noise schedule (instance; ``sigma(1)`` scales the slots' noise).
        prompt: Token-id rows (list of lists, one list, or a padded ``[B, P]`` tensor with
            ``prompt_lengths``), or ``None`` (start from nothing; the first token comes from
            the null query).
        prompt_lengths: Lengths ``[B]`` of a padded prompt tensor.
        length: Tokens to generate per row (the most, with ``eos_id``).
        draft: Live slots per group, ``>= 1``: up to ``draft - 1`` drafts per pass, and up to
            ``draft`` groups of ``draft`` slots on top of the sequence. A block size the model
            trained on; beyond 4 few drafts are kept (docs/results.md §2d) while every pass
            costs more.
        draft_temperature: Temperature ``> 0`` of the drafts' law (``None``: ``temperature``).
            Any law keeps the output exact; a sharper one than the AR conditionals' is kept
            more often (docs/results.md §2d). Not read when greedy.
        temperature: Of the AR conditionals (``0``: greedy), and of the drafts by default.
        top_p: Nucleus mass in ``(0, 1]`` (of both).
        greedy: Commit the argmax (drafts are the slots' argmax, kept iff they equal it).
        generator: Random generator of every draw, or one per row (then each row's tokens do not
            depend on the rest of the batch).
        eos_id: A row stops after committing it (the EOS is dropped from the result).
        use_cache: Keep the committed tokens' keys and values (exact, theory §2) in the
            network's cache (``commit_forward``; a network without it runs every pass over the
            whole sequence, as ``use_cache=False`` does).
        record: Fill ``result.times`` ``[S + 1, B, L]`` (each token at 1 until the global step
            that commits it, then 0: the maturity heatmap of :mod:`~flowtext.decoding.plots`).
        tokenizer: Object with ``decode(ids) -> str``; fills ``result.text``.
        batch_size: Rows when ``prompt`` is ``None`` (default 1).

    Returns:
        A :class:`~flowtext.decoding.GenerationResult` (after a ``KeyboardInterrupt``: what was
        committed so far, ``interrupted=True``); ``commit_order`` is the global step
        (batched pass, from 1) that committed each token. ``stats.nfe`` counts network passes
        (two per step for a self-conditioned network) and ``tokens_per_eval`` the committed
        tokens per pass of a row (rows that are done no longer pass).

    Raises:
        ConfigError: Bad ``draft``, ``length``, temperature or top-p, or a prompt plus length
            beyond the model's context.
        ShapeError: Malformed prompt.
        DataError: Ids outside the vocabulary.
    """
    _check(draft, draft_temperature)
    temperature, top_p = check_sampling(
        net.config.vocab_size, length=length, temperature=temperature, top_p=top_p, eos_id=eos_id
    )
    prompts, _ = check_rows(net.config, prompt, prompt_lengths, batch_size, None, length)
    schedule = _schedules.resolve(schedule)
    bind_prior_schedule(net, schedule)  # an output prior reads this schedule's states
    greedy = greedy or temperature == 0
    draft_t = temperature if draft_temperature is None else draft_temperature
    draw = _Sampler(temperature, top_p, greedy, draft_t)
    per_pass = 2 if getattr(net.config, "self_condition", False) else 1  # two-pass denoiser
    gens = _row_generators(generator, len(prompts))
    rows = [_Row(ids=list(p), end=len(p) + length, gen=g) for p, g in zip(prompts, gens)]
    was_training = net.training
    net.eval()
    cache = net.new_cache(len(rows)) if use_cache and hasattr(net, "commit_forward") else None
    start, steps, committed, interrupted = time.perf_counter(), 0, 0, False
    try:
        with torch.no_grad():
            while any(not r.done for r in rows):
                if cache is None:  # done rows leave the batch
                    active = [r for r in rows if not r.done]
                    reads = _full_pass(net, schedule, active, draft)
                else:  # the cache keeps every row: done ones pass as padding
                    active = rows
                    reads, cache = _cached_pass(net, schedule, rows, draft, cache)
                steps += 1
                for r, (ar, groups) in zip(active, reads):
                    if r.done:
                        continue
                    r.passes += per_pass
                    new = _advance(r, ar, groups, draft, draw, eos_id)
                    r.when += [steps] * new
                    committed += new
    except KeyboardInterrupt:  # keep what was committed, as generate does
        interrupted = True
    finally:
        net.train(was_training)
    stats = (committed, steps, per_pass, time.perf_counter() - start)
    result = _result(rows, prompts, length, stats, eos_id, record, tokenizer)
    result.interrupted = interrupted
    return result


def _row_generators(generator: Any, n: int) -> list[torch.Generator | None]:
    if generator is None or isinstance(generator, torch.Generator):
        return [generator] * n
    gens = list(generator)
    if len(gens) != n or not all(isinstance(g, torch.Generator) for g in gens):
        raise ConfigError(f"generator must be one torch.Generator or {n} of them (one per row)")
    return gens


def _result(rows, prompts, length, stats, eos_id, record, tokenizer) -> GenerationResult:
    """Tokens cut at EOS, the canvas and commit steps of the generated region, the statistics."""
    committed, steps, per_pass, wall = stats
    tokens = []
    canvas = torch.full((len(rows), length), -1, dtype=torch.long)
    order = torch.full((len(rows), length), -1, dtype=torch.long)
    for b, (r, p) in enumerate(zip(rows, prompts)):
        gen = r.ids[len(p) : len(p) + len(r.when)]  # an interrupt may fall between the two
        canvas[b, : len(gen)] = torch.tensor(gen, dtype=torch.long)
        order[b, : len(gen)] = torch.tensor(r.when, dtype=torch.long)
        tokens.append(gen[:-1] if r.eos and gen and gen[-1] == eos_id else gen)
    n_tokens = sum(len(x) for x in tokens)
    passes = max(1, sum(r.passes for r in rows))
    decode = DecodeStats(
        nfe=steps * per_pass, passes=steps * per_pass, steps=steps, committed=committed,
        tokens=n_tokens, wall_time=wall, tokens_per_eval=committed / passes,
        tokens_per_second=n_tokens / max(wall, 1e-9),
    )  # fmt: skip
    times = None
    if record:  # a token is at t = 1 until the step that commits it, then at 0
        at = torch.arange(steps + 1)[:, None, None]
        times = ((order[None] < 0) | (order[None] > at)).float()
    return GenerationResult(
        tokens=tokens, prompt_lengths=[len(p) for p in prompts], stats=decode,
        text=[tokenizer.decode(x) for x in tokens] if tokenizer is not None else None,
        canvas=canvas, commit_order=order, times=times, eos=[r.eos for r in rows],
    )  # fmt: skip
