"""The decoding loop: every policy, ODE or ancestral steps, commits, exact KV cache, infilling."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from flowtext import policies as _policies
from flowtext import schedules as _schedules
from flowtext import solvers as _solvers
from flowtext.visibility import LIVE
from flowtext.errors import ConfigError, DataError, ShapeError
from flowtext.flow import Field
from flowtext.solvers import posterior

__all__ = ["DecodeStats", "GenerationResult", "generate", "sample_tokens"]

Generators = torch.Generator | Sequence[torch.Generator] | None


@dataclass(frozen=True)
class DecodeStats:
    """Cost and speed of one :func:`generate` call.

    Attributes:
        nfe: Network evaluations of live tokens (one forward pass each, whatever its width).
        passes: All forward passes, ``nfe`` plus commit-only passes (0 for a
            :class:`~flowtext.nn.FlowTransformer`, whose commits are fused into evaluations).
        steps: Global steps taken.
        committed: Tokens committed by the decoder (fixed and prompt tokens excluded).
        tokens: Tokens returned (after EOS truncation; fixed tokens excluded).
        wall_time: Seconds.
        tokens_per_eval: Tokens committed per evaluation and row, ``committed / (nfe B)``.
        tokens_per_second: ``tokens / wall_time``.
    """

    nfe: int
    passes: int
    steps: int
    committed: int
    tokens: int
    wall_time: float
    tokens_per_eval: float
    tokens_per_second: float

    def as_dict(self) -> dict[str, float]:
        """The statistics as a plain dict."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class GenerationResult:
    """Output of :func:`generate`.

    Attributes:
        tokens: Generated ids per row (the prompt excluded, fixed tokens included), cut before
            the first EOS; after an interrupt, the committed prefix of each row.
        prompt_lengths: Prompt length of each row.
        stats: :class:`DecodeStats`.
        text: ``tokenizer.decode(tokens[b])`` per row when a tokenizer was given, else ``None``.
        canvas: Ids ``[B, L]`` of the generated region, ``-1`` where nothing was committed.
        commit_order: Global step at which each token committed ``[B, L]`` (long): 0 for fixed
            tokens, ``-1`` for tokens never committed (row stopped at EOS, or interrupted).
        times: Times of the generated region after every step, ``[S + 1, B, L]`` (``record``).
        eos: Whether each row stopped at an EOS.
        interrupted: ``True`` when a ``KeyboardInterrupt`` stopped decoding early.
    """

    tokens: list[list[int]]
    prompt_lengths: list[int]
    stats: DecodeStats
    text: list[str] | None = None
    canvas: Tensor | None = None
    commit_order: Tensor | None = None
    times: Tensor | None = None
    eos: list[bool] = field(default_factory=list)
    interrupted: bool = False

    def padded(self, pad_id: int = 0) -> tuple[Tensor, Tensor]:
        """The tokens as a right-padded tensor.

        Args:
            pad_id: Fill value.

        Returns:
            ``(ids [B, max_len], lengths [B])``.
        """
        lengths = torch.tensor([len(r) for r in self.tokens], dtype=torch.long)
        out = torch.full(
            (len(self.tokens), max((len(r) for r in self.tokens), default=0)),
            pad_id,
            dtype=torch.long,
        )
        for b, row in enumerate(self.tokens):
            out[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        return out, lengths


# ------------------------------------------------------------------------------------ randomness
class _Rng:
    """Random draws from one generator (batch-wide) or one generator per row (batch-invariant)."""

    def __init__(self, generator: Generators, batch: int, device: torch.device) -> None:
        if generator is None or isinstance(generator, torch.Generator):
            self.per_row = None
            self.gen = generator
        else:
            gens = list(generator)
            if len(gens) != batch or not all(isinstance(g, torch.Generator) for g in gens):
                raise ConfigError(
                    f"generator must be a torch.Generator or a list of {batch} generators (one "
                    f"per row); got {type(generator).__name__} of length {len(gens)}"
                )
            self.per_row = gens
        self.device = device

    def _dev(self, g: torch.Generator | None) -> torch.device:
        return g.device if g is not None else self.device

    def randn(self, rows: Tensor, d: int, dtype: torch.dtype) -> Tensor:
        """Standard normal ``[n, d]`` for ``n`` items owned by ``rows [n]`` (row-major order)."""
        if self.per_row is None:
            g = self.gen
            return torch.randn(rows.numel(), d, generator=g, dtype=dtype, device=self._dev(g)).to(
                self.device
            )
        parts = []
        for b, g in enumerate(self.per_row):
            n = int((rows == b).sum())
            if n:
                parts.append(torch.randn(n, d, generator=g, dtype=dtype, device=g.device))
        if not parts:
            return torch.zeros(0, d, dtype=dtype, device=self.device)
        return torch.cat([p.to(self.device) for p in parts])

    def multinomial(self, probs: Tensor, rows: Tensor) -> Tensor:
        """One draw per row of ``probs [n, V]`` (items of batch row ``rows [n]``), ``[n]``."""
        if self.per_row is None:
            g = self.gen
            p = probs if g is None else probs.to(g.device)
            return torch.multinomial(p, 1, generator=g).squeeze(1).to(self.device)
        out = torch.empty(probs.shape[0], dtype=torch.long, device=self.device)
        for b, g in enumerate(self.per_row):
            sel = (rows == b).nonzero().squeeze(1)
            if sel.numel():
                out[sel] = (
                    torch.multinomial(probs[sel].to(g.device), 1, generator=g)
                    .squeeze(1)
                    .to(self.device)
                )
        return out


def sample_tokens(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw one token per row of ``logits`` (the commit rule of :func:`generate`).

    Greedy (or ``temperature == 0``) takes the argmax; otherwise ``torch.multinomial`` samples
    ``softmax(logits / temperature)`` restricted to the smallest top-p nucleus.

    Args:
        logits: ``[n, V]``.
        temperature: ``>= 0``.
        top_p: Nucleus mass in ``(0, 1]``.
        greedy: Take the argmax.
        generator: Random generator.

    Returns:
        Ids ``[n]`` (long).
    """
    if greedy or temperature == 0:
        return logits.argmax(-1)
    rng = _Rng(generator, 1, logits.device)
    return rng.multinomial(_probs(logits, temperature, top_p), torch.zeros(len(logits)))


def _probs(logits: Tensor, temperature: float, top_p: float) -> Tensor:
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = torch.sort(probs, dim=-1, descending=True)
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass strictly before each entry
        keep_sorted = before < top_p
        keep = torch.zeros_like(keep_sorted).scatter(-1, idx, keep_sorted)
        probs = torch.where(keep, probs, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


# ------------------------------------------------------------------------------------ input checks
def _check_number(name: str, value: Any, lo: float, hi: float, lo_open: bool, fix: str) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        raise ConfigError(
            f"{name} must lie in {'(' if lo_open else '['}{lo}, {hi}]; got {value!r}. {fix}"
        )
    return float(value)


def _prompt_rows(prompt: Any, prompt_lengths: Any, batch_size: int | None) -> list[list[int]]:
    if prompt is None:
        return [[] for _ in range(1 if batch_size is None else batch_size)]
    if isinstance(prompt, Tensor):
        if prompt.is_floating_point() or prompt.dtype == torch.bool:
            raise ShapeError(f"prompt must hold integer token ids, got dtype {prompt.dtype}")
        if prompt.ndim == 1:
            prompt = prompt[None]
        if prompt.ndim != 2:
            raise ShapeError(f"prompt must be [B, P] or [P], got shape {tuple(prompt.shape)}")
        if prompt_lengths is None:
            lengths = [prompt.shape[1]] * prompt.shape[0]
        else:
            lengths = [int(n) for n in torch.as_tensor(prompt_lengths).reshape(-1).tolist()]
            if len(lengths) != prompt.shape[0] or any(
                not 0 <= n <= prompt.shape[1] for n in lengths
            ):
                raise ShapeError(
                    f"prompt_lengths must give one length in [0, {prompt.shape[1]}] per row of "
                    f"the prompt ({prompt.shape[0]} rows); got {lengths}"
                )
        return [prompt[b, :n].tolist() for b, n in enumerate(lengths)]
    if prompt_lengths is not None:
        raise ConfigError("prompt_lengths goes with a padded prompt tensor; drop it for lists")
    bad = ShapeError("prompt must be a list of token-id lists, a list of ids, or a tensor")
    if isinstance(prompt, (str, bytes)) or not hasattr(prompt, "__iter__"):
        raise ShapeError(
            f"prompt must be token ids (a list of ids, a list of lists, or a tensor), got "
            f"{type(prompt).__name__}; encode text with the tokenizer first"
        )
    rows = list(prompt)
    if rows and all(isinstance(x, int) and not isinstance(x, bool) for x in rows):
        return [rows]
    out = []
    for r in rows:
        if isinstance(r, (str, bytes)) or not hasattr(r, "__iter__"):
            raise bad
        r = r.tolist() if isinstance(r, Tensor) else list(r)
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in r):
            raise bad
        out.append(r)
    if not out:
        raise ShapeError("prompt is an empty list; pass None for unconditional generation")
    return out


def _fixed_rows(fixed: Any, batch: int, length: int) -> Tensor:
    """Fixed ids ``[B, L]`` (``-1`` = free) from a tensor, a dict, or a list of dicts."""
    out = torch.full((batch, length), -1, dtype=torch.long)
    if fixed is None:
        return out
    if isinstance(fixed, Tensor):
        f = fixed.long()
        if f.ndim == 1:
            f = f[None].expand(batch, -1)
        if f.shape != (batch, length):
            raise ShapeError(
                f"fixed must be [B, L] = {(batch, length)} or [L] with -1 for free positions; got "
                f"{tuple(fixed.shape)}"
            )
        return f.clone()
    maps = [fixed] * batch if isinstance(fixed, Mapping) else list(fixed)
    if len(maps) != batch or not all(isinstance(m, Mapping) for m in maps):
        raise ShapeError(f"fixed must be a dict {{position: id}} or a list of {batch} dicts")
    for b, m in enumerate(maps):
        for pos, tok in m.items():
            if not isinstance(pos, int) or not -length <= pos < length:
                raise ConfigError(
                    f"fixed position {pos!r} lies outside the generated region [0, {length}); "
                    "positions count from the first generated token"
                )
            out[b, pos] = int(tok)
    return out


def _check_ids(ids: Sequence[int] | Tensor, vocab: int, what: str) -> None:
    t = torch.as_tensor(ids, dtype=torch.long)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab):
        raise DataError(
            f"{what} holds token ids outside the model vocabulary [0, {vocab}): range "
            f"[{int(t.min())}, {int(t.max())}]; encode with the checkpoint's tokenizer"
        )


# ------------------------------------------------------------------------------------ the network
def _fused_forward(net, cache, pending, z, t, o, pos):
    """Evaluate live queries against ``cache`` and commit ``pending`` tokens in the same pass.

    Returns ``(logits [B, n, V], difficulty [B, n], new cache, passes)``.
    """
    from flowtext.nn import FlowTransformer

    if pending is None:
        out = net(z, t, o, positions=pos, cache=cache)
        return out.logits, out.difficulty, cache, 1
    pz, po, ppos = pending
    if isinstance(net, FlowTransformer):
        n_p = pz.shape[1]
        t_all = torch.cat([torch.zeros_like(po, dtype=t.dtype), t], 1)
        h, kv = net._trunk(
            torch.cat([pz, z], 1), t_all, torch.cat([po, o], 1), torch.cat([ppos, pos], 1), cache
        )
        h = h[:, n_p:]
        feats = h.detach() if net.config.difficulty_detach else h
        difficulty = F.softplus(net.difficulty_head(feats)).squeeze(-1)
        cache = cache.append([(k[:, :, :n_p], v[:, :, :n_p]) for k, v in kv], po, ppos)
        return net.readout(h), difficulty, cache, 1
    cache = net.commit(cache, pz, po, ppos)
    out = net(z, t, o, positions=pos, cache=cache)
    return out.logits, out.difficulty, cache, 2


def _pack(mask: Tensor, *values: Tensor, fill: Sequence[Any]) -> tuple[Tensor, ...]:
    """Gather the masked entries of each row to the front: ``[B, n_max, ...]`` plus validity."""
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


# ------------------------------------------------------------------------------------ generate
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
    evaluated, so ``autoregressive`` with the cache evaluates one token per step.

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
            via ``policy.grid``, or ``adaptive``).
        policy_kwargs: Constructor arguments when ``policy`` is a name.
        steps: Global steps (``None`` = ``length``): the grid of a static policy, the budget of
            ``adaptive``.
        solver: ``euler``, ``heun``, ``midpoint``, ``rk4`` or ``ancestral`` (name or instance).
        temperature: Commit temperature ``>= 0`` (0 = greedy).
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
        A :class:`GenerationResult`. A ``KeyboardInterrupt`` during decoding returns what was
        committed so far, with ``interrupted=True``.

    Raises:
        ConfigError: Bad length, steps, temperature, top-p, policy, solver, or a prompt plus
            length beyond the model's context.
        ShapeError: Malformed prompt or constraints.
        DataError: Token ids outside the vocabulary.
    """
    cfg = net.config
    vocab, max_len, d = cfg.vocab_size, cfg.max_len, cfg.d_embed
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        raise ConfigError(f"length must be a positive int (tokens to generate), got {length!r}")
    steps = length if steps is None else steps
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ConfigError(f"steps must be an int >= 1, got {steps!r}")
    temperature = _check_number(
        "temperature", temperature, 0, math.inf, False, "Use 0 or greedy=True for argmax."
    )
    top_p = _check_number("top_p", top_p, 0, 1, True, "Use 1.0 to disable nucleus sampling.")
    greedy = bool(greedy) or temperature == 0
    if fixed_order not in ("causal", "joint"):
        raise ConfigError(f"fixed_order must be 'causal' or 'joint', got {fixed_order!r}")
    if isinstance(policy, str):
        policy = _policies.get(policy, **dict(policy_kwargs or {}))
    elif policy_kwargs:
        raise ConfigError("policy_kwargs only applies when policy is given by name")
    if not isinstance(policy, _policies.ProgressionPolicy):
        raise ConfigError(f"policy must be a ProgressionPolicy or one of {_policies.names()}")
    solver = _solvers.resolve(solver)
    if not isinstance(solver, (_solvers.RungeKutta, _solvers.Ancestral)):
        raise ConfigError(
            f"decoding supports the Runge–Kutta solvers and ancestral, not {solver.name!r}"
        )
    schedule = _schedules.resolve(schedule)
    if eos_id is not None and not (isinstance(eos_id, int) and 0 <= eos_id < vocab):
        raise ConfigError(f"eos_id must be an id in [0, {vocab}), got {eos_id!r}")

    rows = _prompt_rows(prompt, prompt_lengths, batch_size)
    B = len(rows)
    for b, r in enumerate(rows):
        _check_ids(r, vocab, f"prompt row {b}")
        if len(r) + length > max_len:
            raise ConfigError(
                f"prompt row {b} has {len(r)} tokens; with length={length} that is "
                f"{len(r) + length} positions, beyond the model context max_len={max_len}. "
                f"Shorten the prompt or use length <= {max(0, max_len - len(r))}."
            )
    fixed_ids = _fixed_rows(fixed, B, length)
    _check_ids(fixed_ids[fixed_ids >= 0], vocab, "fixed")
    if bool((fixed_ids < -1).any()):
        raise DataError("fixed may only hold token ids or -1 (free position)")

    grid = None
    if policy.static:
        grid = policy.grid(length, steps, dtype=torch.float64)

    param = next(net.parameters())
    dev, dtype = param.device, param.dtype
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            return _decode(
                net,
                schedule,
                policy,
                grid,
                solver,
                rows,
                fixed_ids.to(dev),
                length,
                steps,
                temperature,
                top_p,
                greedy,
                _Rng(generator, B, dev),
                eos_id,
                fixed_order,
                use_cache,
                record,
                tokenizer,
                dev,
                dtype,
                vocab,
                d,
            )
    finally:
        net.train(was_training)


def _decode(
    net,
    schedule,
    policy,
    grid,
    solver,
    rows,
    fixed_ids,
    L,
    steps,
    temperature,
    top_p,
    greedy,
    rng,
    eos_id,
    fixed_order,
    use_cache,
    record,
    tokenizer,
    dev,
    dtype,
    vocab,
    d,
):
    start = time.perf_counter()
    B = len(rows)
    P = max((len(r) for r in rows), default=0)
    plen = torch.tensor([len(r) for r in rows], dtype=torch.long, device=dev)
    ar = torch.arange(L, device=dev)
    # ---- generated region state [B, L]
    pos = plen[:, None] + ar[None]
    is_fixed = fixed_ids >= 0
    ids = torch.where(is_fixed, fixed_ids, -1)
    t = torch.where(is_fixed, 0.0, torch.ones(B, L, dtype=dtype, device=dev)).to(dtype)
    z = torch.zeros(B, L, d, dtype=dtype, device=dev)
    if bool(is_fixed.any()):
        z = torch.where(is_fixed[..., None], net.embed(ids.clamp_min(0)).to(dtype), z)
    joint = fixed_order == "joint"
    order = torch.where(is_fixed, torch.zeros_like(pos) if joint else pos, LIVE)
    commit_step = torch.where(is_fixed, 0, -1)
    base = P + L  # generated commits at step k get order base + k (after every fixed order)
    # ---- prompt region [B, P]
    p_ids = torch.zeros(B, P, dtype=torch.long, device=dev)
    for b, r in enumerate(rows):
        if r:
            p_ids[b, : len(r)] = torch.tensor(r, dtype=torch.long, device=dev)
    p_valid = torch.arange(P, device=dev)[None] < plen[:, None]
    p_pos = torch.arange(P, device=dev)[None].expand(B, P)
    p_order = torch.where(p_valid, 0 if joint else p_pos, LIVE)
    p_t = torch.where(p_valid, 0.0, 1.0).to(dtype)
    p_z = net.embed(p_ids).to(dtype) if P else torch.zeros(B, 0, d, dtype=dtype, device=dev)

    counters = {"nfe": 0, "passes": 0}
    state: dict[str, Any] = {"cache": None, "pending": None}
    if use_cache:
        state["cache"] = net.new_cache(B)
        all_fixed = torch.cat([p_valid, is_fixed], 1)
        if bool(all_fixed.any()):
            _, _, fz, fo, fpos = _pack(
                all_fixed,
                torch.cat([p_z, z], 1),
                torch.cat([p_order, order], 1),
                torch.cat([p_pos, pos], 1),
                fill=(0.0, LIVE, 0),
            )
            state["pending"] = (fz, fo, fpos)

    def evaluate(view_z: Tensor, view_t: Tensor, idx: Tensor, valid: Tensor):
        """Logits ``[B, n, V]`` and difficulty ``[B, n]`` of the live view tokens."""
        counters["nfe"] += 1
        vpos = torch.gather(pos, 1, idx)
        if use_cache:
            o = torch.full_like(idx, LIVE)
            logits, diff, state["cache"], n_pass = _fused_forward(
                net, state["cache"], state["pending"], view_z, view_t, o, vpos
            )
            state["pending"] = None
            counters["passes"] += n_pass
            return logits, diff
        counters["passes"] += 1
        bi = torch.arange(B, device=dev)[:, None].expand_as(idx)
        gz, gt = z.clone(), t.clone()
        gz[bi[valid], idx[valid]] = view_z[valid]
        gt[bi[valid], idx[valid]] = view_t[valid]
        full_o = torch.cat([p_order, order], 1)
        out = net(
            torch.cat([p_z, gz], 1),
            torch.cat([p_t, gt], 1),
            full_o,
            positions=torch.cat([p_pos, pos], 1),
        )
        gidx = idx + P
        logits = torch.gather(out.logits, 1, gidx[..., None].expand(-1, -1, out.logits.shape[-1]))
        return logits, torch.gather(out.difficulty, 1, gidx)

    done = torch.zeros(B, dtype=torch.bool, device=dev)
    eos_hit = torch.zeros(B, dtype=torch.bool, device=dev)
    traj = [t.clone()] if record else None
    interrupted = False
    k_taken = 0
    try:
        for k in range(steps):
            live = (t > 0) & ~done[:, None]
            if not bool(live.any()):
                break
            if policy.static:
                target = torch.where(live, grid[k + 1].to(dev, dtype)[None].expand(B, L), t)
                target = torch.minimum(target, t)
                active = live & ((t < 1) | (target < t))
            else:
                active = policy.awake(live, k, steps)
            k_taken = k + 1
            if bool(active.any()):
                idx, valid, view_z, view_t = _pack(active, z, t, fill=(0.0, 1.0))
                logits, diff = evaluate(view_z, view_t, idx, valid)
                bi = torch.arange(B, device=dev)[:, None].expand_as(idx)
                if not policy.static:
                    conf_v = policy.confidence(logits, diff)
                    conf = torch.zeros(B, L, dtype=dtype, device=dev)
                    conf[bi[valid], idx[valid]] = conf_v[valid].to(dtype)
                    target = policy.next_times(t, conf, active, live, k, steps)
                commit = active & (target == 0)
                moving = active & (target > 0) & (target < t)
                # fresh noise for tokens leaving t = 1 (their z was never read before)
                start_mask = moving & (t == 1)
                if bool(start_mask.any()):
                    rows_ = start_mask.nonzero()[:, 0]
                    z[start_mask] = rng.randn(rows_, d, dtype)
                    view_z = torch.gather(z, 1, idx[..., None].expand(-1, -1, d))
                # commits, from the readout at the state before the step
                c_view = torch.gather(commit, 1, idx) & valid
                if bool(c_view.any()):
                    c_logits = logits[c_view]
                    if greedy:
                        new = c_logits.argmax(-1)
                    else:
                        new = rng.multinomial(
                            _probs(c_logits.to(torch.float64), temperature, top_p),
                            bi[c_view],
                        )
                    ci, cj = bi[c_view], idx[c_view]
                    ids[ci, cj] = new
                # one solver step for the moving tokens
                m_view = torch.gather(moving, 1, idx) & valid
                if bool(m_view.any()):
                    v_next = torch.where(m_view, torch.gather(target, 1, idx), view_t)
                    x0_first = net.x0_hat(logits).to(dtype)
                    if isinstance(solver, _solvers.Ancestral):
                        mean, std = posterior(view_z, x0_first, view_t, v_next, schedule)
                        noise = torch.zeros_like(view_z)
                        noise[m_view] = rng.randn(bi[m_view], d, dtype)
                        z_new = torch.where(
                            m_view[..., None], mean + solver.eta * std * noise, view_z
                        )
                    else:
                        calls = [0]

                        def denoiser(zz, tt, _x0=x0_first, _calls=calls, _idx=idx, _valid=valid):
                            _calls[0] += 1
                            if _calls[0] == 1:  # stage 1 is the evaluation already made
                                return _x0
                            lg, _ = evaluate(zz, tt, _idx, _valid)
                            return net.x0_hat(lg).to(dtype)

                        z_new = solver.step(Field(denoiser, schedule), view_z, view_t, v_next)
                    z[bi[m_view], idx[m_view]] = z_new[m_view]
                    t = torch.where(moving, target, t)
                if bool(c_view.any()):
                    z[commit] = net.embed(ids[commit]).to(dtype)
                    t = torch.where(commit, 0.0, t).to(dtype)
                    order = torch.where(commit, base + k + 1, order)
                    commit_step = torch.where(commit, k + 1, commit_step)
                    if use_cache:
                        _, _, pz, po, ppos = _pack(commit, z, order, pos, fill=(0.0, LIVE, 0))
                        state["pending"] = (pz, po, ppos)
            if record:
                traj.append(t.clone())
            if eos_id is not None:
                committed = t == 0
                is_eos = committed & (ids == eos_id)
                first = torch.where(is_eos, ar[None], L).amin(1)
                before_done = (committed | (ar[None] >= first[:, None])).all(1)
                newly = (first < L) & before_done & ~done
                eos_hit |= newly
                done |= newly
    except KeyboardInterrupt:
        interrupted = True
    if record and len(traj) > k_taken + 1:
        traj = traj[: k_taken + 1]

    tokens, ends = [], []
    committed = t == 0
    for b in range(B):
        if eos_hit[b]:
            end = int(torch.where((ids[b] == eos_id) & committed[b], ar, L).min())
        elif not bool(committed[b].all()):
            end = int(torch.where(~committed[b], ar, L).min())
        else:
            end = L
        ends.append(end)
        tokens.append(ids[b, :end].tolist())
    wall = time.perf_counter() - start
    n_committed = int((commit_step > 0).sum())
    n_tokens = sum(int((~is_fixed[b, :e]).sum()) for b, e in enumerate(ends))
    stats = DecodeStats(
        nfe=counters["nfe"],
        passes=counters["passes"],
        steps=k_taken,
        committed=n_committed,
        tokens=n_tokens,
        wall_time=wall,
        tokens_per_eval=n_committed / max(1, counters["nfe"]) / B,
        tokens_per_second=n_tokens / wall if wall > 0 else float("inf"),
    )
    text = None
    if tokenizer is not None:
        text = [tokenizer.decode(r) for r in tokens]
    return GenerationResult(
        tokens=tokens,
        prompt_lengths=[len(r) for r in rows],
        stats=stats,
        text=text,
        canvas=torch.where(committed, ids, -1).cpu(),
        commit_order=commit_step.cpu(),
        times=torch.stack(traj).cpu() if record else None,
        eos=[bool(x) for x in eos_hit.tolist()],
        interrupted=interrupted,
    )
