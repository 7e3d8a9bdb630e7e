"""The decoding loop: :func:`generate` checks its inputs, then steps a state to the end."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch

from flowtext.decoding.inputs import check_rows, check_settings
from flowtext.decoding.result import DecodeStats, GenerationResult
from flowtext.decoding.sampling import Generators, RowNoise
from flowtext.decoding.speculative import speculative_generate
from flowtext.decoding.state import Decoder, DecodeState, initial_state, live, step
from flowtext.errors import ConfigError
from flowtext.nn.latents import bind_prior_schedule

__all__ = ["decode", "generate"]


def generate(
    net,
    schedule,
    *,
    prompt: Any = None,
    prompt_lengths: Any = None,
    length: int,
    policy: Any = "autoregressive",
    policy_kwargs: Mapping[str, Any] | None = None,
    steps: int | None = None,
    solver: Any = "euler",
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    generator: Generators = None,
    eos_id: int | None = None,
    fixed: Any = None,
    fixed_order: str = "causal",
    use_cache: bool = True,
    record: bool = False,
    tokenizer: Any = None,
    batch_size: int | None = None,
) -> GenerationResult:
    """Decode text by following a progression-time policy through the shared flow (theory §1–2).

    At every global step the tokens whose time reaches 0 **commit**: ``x_i`` is drawn from
    ``p_theta(x_i | z, t)`` at the state before the step (temperature / top-p / greedy), then
    ``z_i := e(x_i)`` and the token never changes again. Every other moving token takes one
    ``solver`` step of the shared field (``x0_hat`` from the readout). Prompt and ``fixed`` tokens
    are committed from the start. Tokens at ``t = 1`` that do not move are invisible and are not
    evaluated, so ``autoregressive`` with the cache evaluates one token per step. The step itself
    is :func:`flowtext.decoding.state.step`.

    With ``use_cache`` the committed tokens' keys and values are computed once (fused into the
    next evaluation) and reused: exact by theory §2. Without it every evaluation runs the whole
    sequence (the cache-less floor); both give the same tokens.

    Args:
        net: A :class:`~flowtext.nn.FlowTransformer` (or any object with its ``forward``,
            ``commit``, ``new_cache``, ``embed``, ``x0_hat`` and ``config``).
        schedule: Noise schedule instance or name (the one the model was trained with).
        prompt: ``None``; a list of token-id lists (rows of any lengths); one list of ids; or an
            integer tensor ``[B, P]`` (``[P]``) padded on the right, with ``prompt_lengths``.
        prompt_lengths: Lengths ``[B]`` of a padded prompt tensor.
        length: Tokens to generate per row (the most, when ``eos_id`` stops rows early).
        policy: A :class:`~flowtext.policies.ProgressionPolicy` or registry name (static ones
            via their grid, or ``adaptive``), or ``"speculative"``: the model's own AR
            distribution, several tokens per evaluation where the noisy stream's drafts hold
            (:func:`~flowtext.decoding.speculative_generate`; ``policy_kwargs`` may give its
            ``draft``; no ``steps`` or ``fixed``, and ``solver`` is not read).
        policy_kwargs: Constructor arguments when ``policy`` is a name.
        steps: Global steps (``None`` = ``length``): the grid of a static policy, the budget of
            ``adaptive``.
        solver: ``euler``, ``heun``, ``midpoint``, ``rk4``, ``ancestral`` or
            ``ancestral-mixture`` (name or instance).
        temperature: Temperature ``>= 0`` (0 = greedy) of the commits and, for a solver given
            by name that draws tokens (``ancestral-mixture``), of its draws at every step (an
            instance keeps its own). The deterministic solvers' paths do not read it: with
            them it acts at the commit only, where the state has mostly decided the token.
        top_p: Nucleus mass in ``(0, 1]``.
        greedy: Commit the argmax.
        generator: A ``torch.Generator``, or one per row (then each row's draws do not depend
            on the rest of the batch).
        eos_id: End-of-sequence id: a row stops once an EOS is committed with everything
            before it committed; the EOS and what follows are dropped.
        fixed: Constraints in the generated region: ids ``[B, L]``/``[L]`` with ``-1`` = free, a
            dict ``{position: id}`` for every row, or a list of such dicts.
        fixed_order: Commit order of prompt and fixed tokens: ``"causal"`` (each its own order,
            left to right, as AR training sees clean tokens) or ``"joint"`` (all order 0: they
            see each other).
        use_cache: Use the exact KV cache.
        record: Keep every step's times in ``result.times``.
        tokenizer: Object with ``decode(ids) -> str``; fills ``result.text``.
        batch_size: Rows to generate when ``prompt`` is ``None`` (default 1).

    Returns:
        A :class:`~flowtext.decoding.GenerationResult`. A ``KeyboardInterrupt`` during decoding
        returns what was committed so far, with ``interrupted=True``.

    Raises:
        ConfigError: Bad length, steps, temperature, top-p, policy, solver, or a prompt plus
            length beyond the model's context.
        ShapeError: Malformed prompt or constraints.
        DataError: Token ids outside the vocabulary.
    """
    if isinstance(policy, str) and policy == "speculative":
        return _speculative(net, schedule, locals())
    cfg = net.config
    settings = check_settings(
        cfg.vocab_size, schedule, length=length, policy=policy, policy_kwargs=policy_kwargs,
        steps=steps, solver=solver, temperature=temperature, top_p=top_p, greedy=greedy,
        eos_id=eos_id, fixed_order=fixed_order, use_cache=use_cache, record=record,
    )  # fmt: skip
    rows, fixed_ids = check_rows(cfg, prompt, prompt_lengths, batch_size, fixed, length)
    bind_prior_schedule(net, settings.schedule)  # an output prior reads this schedule's states
    param = next(net.parameters())
    dev, dtype = param.device, param.dtype
    plan = settings.policy.plan(length, settings.steps, dtype=dtype, device=dev)
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            start = time.perf_counter()
            noise = RowNoise(generator, len(rows), dev)
            ctx, state = initial_state(net, rows, fixed_ids.to(dev), settings, dtype)
            table = net.embedding_table() if hasattr(net, "embedding_table") else None
            dec = Decoder(net, settings, noise, ctx, plan, table, dtype)
            state, interrupted = decode(dec, state)
            return _result(dec, state, rows, tokenizer, interrupted, time.perf_counter() - start)
    finally:
        net.train(was_training)


def _speculative(net, schedule, args: dict[str, Any]) -> GenerationResult:
    """``generate(policy="speculative")``: :func:`~flowtext.decoding.speculative_generate`."""
    bad = [k for k in ("steps", "fixed") if args[k] is not None]
    if bad:
        raise ConfigError(f"policy 'speculative' does not take {', '.join(bad)}")
    return speculative_generate(
        net, schedule, **{k: args[k] for k in _SPECULATIVE_ARGS}, **(args["policy_kwargs"] or {})
    )


_SPECULATIVE_ARGS = (
    "prompt", "prompt_lengths", "length", "temperature", "top_p", "greedy", "generator",
    "eos_id", "use_cache", "record", "tokenizer", "batch_size",
)  # fmt: skip


def decode(dec: Decoder, state: DecodeState) -> tuple[DecodeState, bool]:
    """Step ``state`` until every token is committed (or every row stopped) or steps run out.

    Returns:
        ``(last complete state, interrupted)``; a ``KeyboardInterrupt`` ends the loop early with
        the state before the interrupted step.
    """
    try:
        while state.k < dec.settings.steps and bool(live(state).any()):
            state = step(dec, state)
    except KeyboardInterrupt:
        return state, True
    return state, False


def _result(
    dec: Decoder, s: DecodeState, rows, tokenizer, interrupted: bool, wall: float
) -> GenerationResult:
    """Cut each row at its EOS (or its first uncommitted token) and gather the statistics."""
    L = s.t.shape[1]
    ar = torch.arange(L, device=s.t.device)
    committed = s.t == 0
    tokens, ends = [], []
    for b in range(len(rows)):
        if s.eos[b]:
            end = int(torch.where((s.ids[b] == dec.settings.eos_id) & committed[b], ar, L).min())
        else:
            end = int(torch.where(~committed[b], ar, L).min())
        ends.append(end)
        tokens.append(s.ids[b, :end].tolist())
    n_committed = int((s.commit_step > 0).sum())
    fixed = dec.context.fixed
    n_tokens = sum(int((~fixed[b, :e]).sum()) for b, e in enumerate(ends))
    stats = DecodeStats(
        nfe=s.nfe,
        passes=s.passes,
        steps=s.k + int(interrupted),  # an interrupted step counts as taken
        committed=n_committed,
        tokens=n_tokens,
        wall_time=wall,
        tokens_per_eval=n_committed / max(1, s.nfe) / len(rows),
        tokens_per_second=n_tokens / wall if wall > 0 else float("inf"),
    )
    return GenerationResult(
        tokens=tokens,
        prompt_lengths=[len(r) for r in rows],
        stats=stats,
        text=None if tokenizer is None else [tokenizer.decode(r) for r in tokens],
        canvas=torch.where(committed, s.ids, -1).cpu(),
        commit_order=s.commit_step.cpu(),
        times=torch.stack(s.times).cpu() if dec.settings.record else None,
        eos=[bool(x) for x in s.eos.tolist()],
        interrupted=interrupted,
    )
