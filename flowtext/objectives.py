"""The unified ELBO of theory §4: exact K-step bound, Monte Carlo estimators, continuous form.

For a static policy discretized into ``K`` steps, token ``i`` passes times
``1 = tau_{i,0} >= ... >= tau_{i,K} = 0`` and commits at step ``k_i``. The bound is

``-log p(x) <= L_prior + sum_i sum_{k < k_i, moving} 1/2 (SNR(tau_{i,k}) - SNR(tau_{i,k-1}))
E|e(x_i) - e_hat_i(z^{k-1})|^2 + sum_i E[-log p(x_i | z^{k_i - 1})]``.

One network pass at the state ``z^{k-1}`` (every token at its own time ``tau_{., k-1}``) gives
every term of step ``k``: a Gaussian term for each token that moves to a positive time and the
commit (cross-entropy) term for each token that reaches ``0``.

* :func:`discrete_elbo`: the exact K-step bound, ``K`` passes (evaluation and tests).
* :func:`single_stream_loss`: the unbiased one-pass estimator, one step ``k`` per row drawn by
  stratified (low-discrepancy) sampling and weighted by ``K``; works for any static grid.
* :func:`two_stream_loss`: the vectorized estimator of block policies (AR is block size 1,
  diffusion is one block): a clean and a noisy copy of the sequence in one pass, one sub-step per
  block, every block's term at once.
* :func:`autoregressive_loss`: the AR bound (``block(1)``, one jump per token) from ONE causal
  stream of ``L`` committed tokens plus the null query of position 0: a plain GPT's
  teacher-forced cross-entropy.
* :func:`continuous_elbo`: the synchronous bound as ``K -> inf`` on ``[t_min, 1]``.

**The next-token readout** (theory §3d). Committed tokens are ordered by ``(step, position)``
(order ``step * L + position``), so tokens committed in one step see each other causally. A
*one-jump commit* of token ``j > 0`` (from ``t = 1`` straight to 0) whose predecessors ``0..j-1``
are all committed in position order reads its commit distribution from the committed token
``j - 1``'s logits (:func:`next_token_readout`); every other transition reads the token's own
output. Both are functions of the visible state, so every bound here stays an exact bound, and
under ``autoregressive`` the bound is a causal LM's cross-entropy.

The network is any module with ``embed(tokens) -> [B, L, d]``,
``forward(z, t, o, positions) -> out`` (``out.logits [B, L, V]``, ``out.difficulty [B, L]``) and
``x0_hat(logits) -> [B, L, d]`` — :class:`flowtext.nn.FlowTransformer` is one.

**Self-conditioning** (``config.self_condition``, docs/theory.md §3g). A network call with no
keyword is the two-pass denoiser ``f(z, sg(x_hat(f(z, 0))))``, a deterministic function of the
state, so every bound here is a bound of that denoiser. Only the training estimators, with the
network in training mode, draw one coin per batch from ``generator``: heads run the two-pass
denoiser, tails one pass with a zero estimate (``self_cond=False``); the loss is the last pass's.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from flowtext.attention import two_stream_layout
from flowtext.errors import ConfigError, ShapeError
from flowtext.mixture import mixture_kl, snr_gap
from flowtext.nn.latents import bind_prior_schedule
from flowtext.schedules import NoiseSchedule
from flowtext.visibility import LIVE

__all__ = [
    "LossTerms",
    "autoregressive_loss",
    "block_grid",
    "commit_steps",
    "continuous_elbo",
    "covering_copies",
    "discrete_elbo",
    "gaussian_kl_weight",
    "next_token_readout",
    "prior_kl",
    "sample_steps",
    "single_stream_loss",
    "stratified_uniform",
    "two_stream_loss",
    "with_t_min",
]

LN2 = math.log(2.0)


class LossTerms:
    """Per-token output of an ELBO estimator.

    Attributes:
        nats: Unbiased per-token estimate of the token's ELBO contribution, ``[B, L]``; its sum
            over tokens estimates ``-log p(x)`` (upper bound) in nats. An estimator asked for
            ``draws > 1`` returns ``[draws * B, L]`` (copy-major: draw ``c`` of row ``r`` is
            row ``c * B + r``), as are ``ce``, ``scored``, ``t`` and ``difficulty``.
        ce: Cross-entropy of committing each scored token at the evaluated state, ``[B, L]``,
            with its gradient (a regime's ``ce_weight`` trains it; detach it where it is a
            target, as the progression-time (difficulty) head's loss does).
        scored: Which tokens were evaluated at a non-committed state, ``[B, L]`` bool.
        ar_nats: The exact AR bound of the batch per token ``[B, L]`` (prior included; one
            row per sequence, whatever the draws), when the estimator was asked for it
            (``ar=True``), else ``None``.
        t: The time of each token's evaluated state ``[B, L]`` (what a fitted schedule pairs
            with ``ce``), or ``None`` (the one-stream AR estimator).
    """

    def __init__(
        self,
        nats: Tensor,
        ce: Tensor,
        difficulty: Tensor | Callable[[], Tensor] | None,
        scored: Tensor,
        ar_nats: Tensor | None = None,
        t: Tensor | None = None,
    ) -> None:
        self.nats, self.ce, self.scored, self.ar_nats = nats, ce, scored, ar_nats
        self.t = t
        self._difficulty = difficulty

    @property
    def difficulty(self) -> Tensor:
        """The difficulty head's prediction at the evaluated state, ``[B, L]``.

        Computed on first access (the head costs nothing when no one reads it).

        Raises:
            ConfigError: The estimator evaluated no state the head reads (the one-stream AR
                estimator; ask the two-stream one with ``difficulty=True``).
        """
        if self._difficulty is None:
            raise ConfigError(
                "this estimate has no difficulty predictions (the one-stream AR estimator): "
                "call two_stream_loss(..., difficulty=True) to score the noisy stream"
            )
        if callable(self._difficulty):
            self._difficulty = self._difficulty()
        return self._difficulty

    def scored_mean(self, values: Tensor) -> Tensor:
        """Mean of per-token ``values [B, L]`` over the scored tokens (scalar; 0 if none)."""
        m = self.scored.to(values.dtype)
        return (values * m).sum() / m.sum().clamp_min(1.0)

    def difficulty_loss(self) -> Tensor:
        """Mean squared error of the difficulty head on the scored tokens (scalar)."""
        return self.scored_mean((self.difficulty - self.ce.detach()) ** 2)


def stratified_uniform(n: int, *, generator: torch.Generator | None = None, device=None) -> Tensor:
    """``n`` low-discrepancy uniforms: one draw in each of ``n`` equal strata, shuffled.

    Args:
        n: Number of samples.
        generator: Random generator.
        device: Device of the result.

    Returns:
        ``[n]`` in ``[0, 1)``.
    """
    u = (
        torch.arange(n, dtype=torch.float64)
        + torch.rand(n, generator=generator, dtype=torch.float64)
    ) / n
    return u[torch.randperm(n, generator=generator)].to(device)


STEP_SAMPLINGS = ("stratified", "independent")
"""How an estimator draws each row's (or block's) step: see :func:`sample_steps`."""


def sample_steps(
    n: int,
    n_steps: int,
    *,
    sampling: str = "stratified",
    generator: torch.Generator | None = None,
) -> Tensor:
    """``n`` step indices, each uniform on ``1..n_steps``.

    Args:
        n: Number of draws (rows, or rows times blocks).
        n_steps: Number of steps ``K``.
        sampling: ``stratified``: :func:`stratified_uniform` (one draw per stratum, shuffled;
            lower variance over the ``n`` draws); ``independent``: i.i.d. uniforms.
        generator: Random generator.

    Returns:
        ``[n]`` long, in ``1..n_steps`` (on the CPU).

    Raises:
        ConfigError: Unknown ``sampling``.
    """
    if sampling == "stratified":
        u = stratified_uniform(n, generator=generator)
    elif sampling == "independent":
        u = torch.rand(n, generator=generator, dtype=torch.float64)
    else:
        raise ConfigError(f"unknown step sampling {sampling!r}; valid: {', '.join(STEP_SAMPLINGS)}")
    return (u * n_steps).long().clamp_max(n_steps - 1) + 1


def covering_copies(draws: int, n_steps: int) -> int:
    """Copies of a batch that give every step of a ``n_steps``-step grid at least one draw.

    An estimator that draws ``draws`` steps per copy of the batch (rows, or rows times blocks)
    needs ``ceil(n_steps / draws)`` copies; one when ``draws >= n_steps``.
    """
    return max(1, -(-n_steps // max(1, draws)))


def _copied(tokens: Tensor, draws: int, per_copy: int, n_steps: int, cover: bool) -> Tensor:
    """The rows an estimator evaluates: ``draws`` copies of the batch, then covering copies.

    Args:
        tokens: ``[B, L]``.
        draws: Independent draws kept per row (``>= 1``).
        per_copy: Step draws per row of the drawn batch (1, or the number of blocks).
        n_steps: Steps of the grid (of a block).
        cover: Add :func:`covering_copies` of the ``draws * B`` rows (folded back later).

    Returns:
        ``[copies * draws * B, L]``, copy-major.

    Raises:
        ConfigError: ``draws < 1``.
    """
    if not isinstance(draws, int) or draws < 1:
        raise ConfigError(f"draws must be a positive integer, got {draws!r}")
    drawn = tokens.repeat(draws, 1) if draws > 1 else tokens
    if not cover:
        return drawn
    return drawn.repeat(covering_copies(drawn.shape[0] * per_copy, n_steps), 1)


def _draw_steps(
    n: int, n_steps: int, sampling: str, generator: torch.Generator | None, cover: bool
) -> Tensor:
    """Steps of :func:`sample_steps`, or with ``cover`` a balanced draw (needs ``n >= n_steps``).

    The balanced draw holds every step ``n // n_steps`` times plus ``n % n_steps`` distinct
    steps chosen at random, shuffled: each draw is still uniform on ``1..n_steps`` (the law is
    symmetric in the steps), and every step of the grid is drawn at least once.
    """
    if not cover:
        return sample_steps(n, n_steps, sampling=sampling, generator=generator)
    assert n >= n_steps, "a covering draw needs at least one draw per step"
    every = torch.arange(n_steps).repeat(n // n_steps)
    extra = torch.randperm(n_steps, generator=generator)[: n % n_steps]
    return torch.cat([every, extra])[torch.randperm(n, generator=generator)] + 1


def _fold_copies(terms: LossTerms, rows: int, sequences: int | None = None) -> LossTerms:
    """An estimate over stacked copies of a ``rows``-row batch, averaged back to ``rows`` rows.

    ``nats`` is the copies' mean (each copy is unbiased, so is the mean); ``ce``, ``t``,
    ``scored`` and ``difficulty`` are the first copy's (one evaluated state per token, as
    without copies). ``ar_nats`` is averaged to ``sequences`` rows (default ``rows``): the
    batch's own sequences, of which ``rows`` may hold several draws.
    """
    copies = terms.nats.shape[0] // rows
    ar = terms.ar_nats
    sequences = rows if sequences is None else sequences
    if ar is not None and ar.shape[0] != sequences:  # copies of the sequences, in order
        ar = ar.reshape(-1, sequences, *ar.shape[1:]).mean(0)
    if copies == 1:
        terms.ar_nats = ar
        return terms
    has_difficulty = terms._difficulty is not None
    return LossTerms(
        nats=terms.nats.reshape(copies, rows, -1).mean(0),
        ce=terms.ce[:rows],
        difficulty=(lambda: terms.difficulty[:rows]) if has_difficulty else None,
        scored=terms.scored[:rows],
        ar_nats=ar,
        t=None if terms.t is None else terms.t[:rows],
    )


def commit_steps(grid: Tensor) -> Tensor:
    """Step ``k_i`` at which each token first reaches ``t = 0``.

    Args:
        grid: Times ``[K + 1, L]`` ending in zeros.

    Returns:
        ``[L]`` long, in ``1..K``.
    """
    zero = grid == 0
    if not bool(zero[-1].all()):
        raise ConfigError("an ELBO grid must end with every token committed (last row all zeros)")
    return zero.float().argmax(0)


def with_t_min(grid: Tensor, t_min: float) -> Tensor:
    """Move each token's smallest positive time to ``t_min`` by an affine map of ``(0, 1]``.

    Per column, positive times in ``[m_i, 1]`` (``m_i`` the column's smallest positive time) map
    affinely onto ``[t_min, 1]``; zeros and columns that jump straight from 1 to 0 are unchanged.
    ``block`` grids with ``m`` steps per block already have ``t_min = 1/m``.

    Args:
        grid: ``[K + 1, L]``.
        t_min: Smallest positive time, in ``(0, 1)``.

    Returns:
        ``[K + 1, L]``.
    """
    if not 0 < t_min < 1:
        raise ConfigError(f"t_min must lie in (0, 1), got {t_min}")
    pos = grid > 0
    m = torch.where(pos, grid, torch.ones_like(grid)).amin(0, keepdim=True)
    span = (1 - m).clamp_min(1e-30)
    mapped = t_min + (1 - t_min) * (grid - m) / span
    return torch.where(pos & (m < 1), mapped, grid)


def block_grid(
    length: int, block_size: int, steps_per_block: int, t_min: float | None = None
) -> Tensor:
    """The ``block(block_size)`` grid with ``steps_per_block`` steps per block, in float64.

    Args:
        length: ``L``.
        block_size: Tokens per block (1 = AR, ``>= L`` = synchronous).
        steps_per_block: ``m >= 1``; ``m = 1`` commits each block in one jump from ``t = 1``.
        t_min: If given (and ``m >= 2``), the last positive time of each block.

    Returns:
        ``[n_blocks * m + 1, L]``.
    """
    from flowtext.policies import Block

    pol = Block(size=block_size)
    grid = pol.grid(length, pol.n_blocks(length) * steps_per_block, dtype=torch.float64)
    return with_t_min(grid, t_min) if t_min is not None and steps_per_block > 1 else grid


def prior_kl(x_emb: Tensor, schedule: NoiseSchedule) -> Tensor:
    """``KL(q(z_i | x) at t = 1 || N(0, I))`` per token, ``[B, L]`` (zero when ``alpha(1) = 0``).

    Args:
        x_emb: Clean embeddings ``[B, L, d]``.
        schedule: The noise schedule.
    """
    one = torch.ones((), dtype=x_emb.dtype, device=x_emb.device)
    a, s = schedule.alpha(one), schedule.sigma(one)
    d = x_emb.shape[-1]
    return 0.5 * (a**2 * (x_emb**2).sum(-1) + d * (s**2 - 1 - torch.log(s**2)))


def gaussian_kl_weight(t: Tensor, s: Tensor, schedule: NoiseSchedule) -> Tensor:
    """``1/2 (SNR(s) - SNR(t))`` for ``s < t``: the KL per unit squared error (theory §4).

    ``KL(q(z_s | z_t, x) || q(z_s | z_t, x_hat)) = w |x - x_hat|^2`` with this ``w``.
    """
    return 0.5 * (schedule.snr(s) - schedule.snr(t))


def _ce(logits: Tensor, tokens: Tensor) -> Tensor:
    """Per-token cross-entropy ``[B, L]``, computed in at least float32."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    flat = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1), reduction="none"
    )
    return flat.view(tokens.shape)


def _self_conditioned(net) -> bool:
    return bool(getattr(getattr(net, "config", None), "self_condition", False))


def _self_cond(net, generator: torch.Generator | None) -> dict[str, bool]:
    """The keyword of a training estimator's network call (empty unless self-conditioned).

    In training mode one draw from ``generator`` per batch: the two-pass denoiser with
    probability 1/2, else one pass with a zero estimate. In evaluation mode always the two-pass
    denoiser, and nothing is drawn (the other draws are those of a plain network).
    """
    if not _self_conditioned(net) or not getattr(net, "training", False):
        return {}
    return {"self_cond": bool(torch.rand((), generator=generator) < 0.5)}


def _state(net, x_emb: Tensor, t: Tensor, eps: Tensor, schedule: NoiseSchedule) -> Tensor:
    a = schedule.alpha(t)[..., None]
    s = schedule.sigma(t)[..., None]
    return torch.where((t == 0)[..., None], x_emb, a * x_emb + s * eps)


def _terms_at_state(
    logits: Tensor,
    x_hat: Tensor,
    tokens: Tensor,
    x_emb: Tensor,
    t_prev: Tensor,
    t_next: Tensor,
    schedule: NoiseSchedule,
    reverse: str = "gaussian",
    table: Tensor | None = None,
    xi: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-token terms of one transition ``t_prev -> t_next`` read at the state ``t_prev``.

    ``reverse="gaussian"``: the Gaussian-mean KL for moves to ``t_next > 0`` and the commit
    cross-entropy for moves to 0 (theory §4). ``reverse="mixture"``: the one-draw mixture KL of
    :func:`flowtext.mixture.mixture_kl` for every move (its move to 0 is the commit
    cross-entropy exactly, theory §4b); needs the embedding ``table [V, d]`` and ``xi [B, L, d]``.
    """
    ce = _ce(logits, tokens)
    live = t_prev > 0
    if reverse == "mixture":
        assert table is not None and xi is not None, "the mixture step needs table and xi"
        kl = mixture_kl(logits, table, tokens, snr_gap(t_prev, t_next, schedule), xi)
        return torch.where(live & (t_next < t_prev), kl, 0.0), ce
    commit = live & (t_next == 0)
    gauss = live & (t_next > 0) & (t_next < t_prev)
    w = torch.where(
        gauss, gaussian_kl_weight(t_prev, torch.where(gauss, t_next, t_prev), schedule), 0.0
    )
    sq = ((x_emb - x_hat) ** 2).sum(-1)
    nats = torch.where(commit, ce, 0.0) + torch.where(gauss, w * sq, 0.0)
    return nats, ce


def _orders(t: Tensor, commit_k: Tensor) -> Tensor:
    """Committed tokens: ``commit_step * L + position`` ((step, position) order); live: ``LIVE``."""
    length = t.shape[-1]
    if (int(commit_k.max()) + 1) * length >= LIVE:
        raise ConfigError(f"too many steps for L = {length}: commit orders would reach LIVE")
    pos = torch.arange(length, device=t.device)
    committed = (commit_k.to(t.device) * length + pos).expand_as(t)
    return torch.where(t == 0, committed, LIVE)


def next_token_readout(t_prev: Tensor, t_next: Tensor, orders: Tensor) -> Tensor:
    """Which commits read their committed predecessor's logits (the next-token readout).

    Token ``j`` qualifies iff ``j > 0``, it jumps from ``t = 1`` straight to 0 in this step, and
    tokens ``0..j-1`` are all committed with non-decreasing orders (a committed prefix in
    position order). Its commit distribution is then ``softmax`` of the logits of committed token
    ``j - 1``, whose features see exactly ``x_{<j}`` (theory §3d); any other transition reads the
    token's own output.

    Args:
        t_prev: Times at the state before the step ``[B, L]`` (or broadcastable).
        t_next: Times after the step, broadcastable to ``[B, L]``.
        orders: Orders at the state before the step (commit orders where ``t_prev == 0``).

    Returns:
        ``[B, L]`` bool.
    """
    t_prev, t_next, orders = torch.broadcast_tensors(t_prev, t_next, orders)
    committed = t_prev == 0
    in_order = torch.ones_like(committed)
    in_order[..., 1:] = orders[..., 1:] >= orders[..., :-1]
    prefix = (committed & in_order).long().cumprod(-1).bool()  # 0..i committed, in order
    out = torch.zeros_like(committed)
    out[..., 1:] = prefix[..., :-1] & (t_prev[..., 1:] == 1) & (t_next[..., 1:] == 0)
    return out


def _read_next(logits: Tensor, eligible: Tensor, source: Tensor | None = None) -> Tensor:
    """``logits`` with each eligible token's replaced by its predecessor's in ``source``."""
    if not bool(eligible.any()):
        return logits
    prev = _predecessors(logits if source is None else source)
    return torch.where(eligible[..., None], prev, logits)


def _predecessors(logits: Tensor) -> Tensor:
    """Token ``j``'s row is token ``j - 1``'s ``[B, L, V]`` (token 0 keeps its own)."""
    return torch.cat([logits[:, :1], logits[:, :-1]], 1)


def _null_logits(net, x_emb: Tensor) -> Tensor:
    """Logits ``[1, 1, V]`` of the null query at position 0 (``t = 1``, sees only itself).

    The commit distribution of token 0 under every one-jump policy: it reads nothing of the
    data, so one token of batch 1 computes it for every row (through the network's lean
    ``null_logits`` where it has one: the same values without positions, mask or checks).
    """
    lean = getattr(net, "null_logits", None)
    if lean is not None:
        return lean()[None, None]
    zero = torch.zeros(1, 1, dtype=torch.long, device=x_emb.device)
    z = x_emb.new_zeros(1, 1, x_emb.shape[-1])
    return net(z, x_emb.new_ones(1, 1), zero, zero).logits


def _ar_terms(
    net, tokens: Tensor, x_emb: Tensor, clean_logits: Tensor, schedule: NoiseSchedule
) -> tuple[Tensor, Tensor]:
    """``(ce, nats)`` ``[B, L]`` of the AR bound from the causal clean stream's logits."""
    null = _null_logits(net, x_emb).to(clean_logits.dtype).expand(tokens.shape[0], 1, -1)
    ce = _ce(torch.cat([null, clean_logits[:, :-1]], 1), tokens)
    return ce, ce + prior_kl(x_emb, schedule)


def autoregressive_loss(net, tokens: Tensor, schedule: NoiseSchedule) -> LossTerms:
    """The exact AR bound (``block(1)``, one jump per token) from one causal stream.

    Every token is committed in position order (``t = 0``, order = position), so committed token
    ``j - 1`` sees ``x_{<j}`` and its logits are the commit distribution of token ``j`` (the
    next-token readout); token 0 reads the null query. The cost is a plain causal LM's: ``L``
    tokens (SDPA takes its causal fast path) plus one null token. Equal to
    :func:`discrete_elbo` under ``autoregressive`` (no noise is read) and to
    :func:`two_stream_loss` with ``block_size = steps_per_block = 1``.

    Args:
        net: The flow network.
        tokens: ``[B, L]``.
        schedule: The noise schedule (its prior term at ``t = 1``).

    Returns:
        :class:`LossTerms` with ``nats = ar_nats`` (prior included) and no difficulty.
    """
    _check_tokens(tokens)
    bind_prior_schedule(net, schedule)  # an output prior reads this schedule's states
    b, length = tokens.shape
    x_emb = net.embed(tokens)
    pos = torch.arange(length, device=tokens.device).expand(b, length)
    no_estimate = {"self_cond": False} if _self_conditioned(net) else {}
    out = net(x_emb, x_emb.new_zeros(b, length), pos, pos, **no_estimate)  # no live token
    ce, nats = _ar_terms(net, tokens, x_emb, out.logits, schedule)
    scored = torch.ones_like(tokens, dtype=torch.bool)
    return LossTerms(nats=nats, ce=ce, difficulty=None, scored=scored, ar_nats=nats)


def _check_tokens(tokens: Tensor) -> None:
    if tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
        raise ShapeError(
            f"tokens must be an integer tensor [B, L], got {tuple(tokens.shape)} {tokens.dtype}"
        )


REVERSE_STEPS = ("gaussian", "mixture")
"""Reverse-step families of the bound: Gaussian-mean (theory §4) or mixture (theory §4b)."""


def _mixture_inputs(
    net, x_emb: Tensor, reverse: str, generator
) -> tuple[Tensor | None, Tensor | None]:
    """The embedding table and a ``xi`` draw for ``reverse="mixture"`` (``None`` otherwise)."""
    if reverse not in REVERSE_STEPS:
        raise ConfigError(f"unknown reverse step {reverse!r}; valid: {', '.join(REVERSE_STEPS)}")
    if reverse == "gaussian":
        return None, None
    xi = torch.randn(x_emb.shape, generator=generator, dtype=x_emb.dtype).to(x_emb.device)
    return net.embedding_table(), xi


def _step_nats(
    net, own: Tensor, logits: Tensor, tokens: Tensor, x_emb: Tensor,
    step: tuple[Tensor, Tensor], schedule: NoiseSchedule, reverse: str, generator,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Per-token nats and commit cross-entropy of the reverse step ``t_prev -> t_next``.

    ``own [B, L, V]`` are the tokens' own logits (their mean latent ``x_hat``); ``logits`` are
    the commit logits (the predecessor's for next-token readouts); ``step = (t_prev, t_next)``,
    each ``[B, L]``. Returns ``(nats, ce)``, each ``[B, L]``.
    """
    table, xi = _mixture_inputs(net, x_emb, reverse, generator)
    t_prev, t_next = step
    return _terms_at_state(
        logits, net.x0_hat(own), tokens, x_emb, t_prev, t_next, schedule, reverse, table, xi
    )


def discrete_elbo(
    net,
    tokens: Tensor,
    grid: Tensor,
    schedule: NoiseSchedule,
    *,
    generator: torch.Generator | None = None,
    eps: Tensor | None = None,
    reverse: str = "gaussian",
) -> Tensor:
    """The exact K-step bound of a static grid, one network pass per step.

    Args:
        net: The flow network.
        tokens: ``[B, L]``.
        grid: ``[K + 1, L]`` from 1 to 0.
        schedule: The noise schedule.
        generator: Random generator for the noise.
        eps: Optional fixed noise ``[B, L, d]`` reused at every step (common random numbers).
        reverse: ``"gaussian"`` (Gaussian-mean step) or ``"mixture"`` (theory §4b; the net must
            also have ``embedding_table() -> [V, d]``; ``xi`` is drawn from ``generator`` at every
            step). With ``"mixture"`` a grid needs no ``t_min``: the move to 0 is the last
            mixture step, whose KL is the commit cross-entropy.

    Returns:
        Per-token bound in nats ``[B, L]`` (prior term included); sum over ``L`` for the
        sequence. One-jump commits after a committed in-order prefix read the predecessor's
        logits (:func:`next_token_readout`).
    """
    _check_tokens(tokens)
    bind_prior_schedule(net, schedule)  # an output prior reads this schedule's states
    grid = grid.to(device=tokens.device)
    x_emb = net.embed(tokens)
    ks = commit_steps(grid)
    total = prior_kl(x_emb, schedule)
    for k in range(1, grid.shape[0]):
        t_prev, t_next = (
            grid[k - 1].expand_as(tokens).to(x_emb.dtype),
            grid[k].expand_as(tokens).to(x_emb.dtype),
        )
        if not bool((t_next < t_prev).any()):
            continue
        noise = (
            eps
            if eps is not None
            else torch.randn(x_emb.shape, generator=generator, dtype=x_emb.dtype).to(x_emb.device)
        )
        z = _state(net, x_emb, t_prev, noise, schedule)
        o = _orders(t_prev, ks[None, :])
        out = net(z, t_prev, o, None)
        logits = _read_next(out.logits, next_token_readout(t_prev, t_next, o))
        step = (t_prev, t_next)
        nats, _ = _step_nats(
            net, out.logits, logits, tokens, x_emb, step, schedule, reverse, generator
        )
        total = total + nats
    return total


def single_stream_loss(
    net,
    tokens: Tensor,
    grid: Tensor,
    schedule: NoiseSchedule,
    *,
    generator: torch.Generator | None = None,
    sampling: str = "stratified",
    reverse: str = "gaussian",
    ar: bool = False,
    cover: bool = False,
    draws: int = 1,
) -> LossTerms:
    """One-pass unbiased estimator of :func:`discrete_elbo` for any static grid.

    Each row draws one step ``k`` (by ``sampling`` over the batch), is evaluated at ``z^{k-1}``
    and weighted by ``K``. With fewer rows than steps most draws miss a step that carries much
    of the bound (under a fitted info-uniform warp read on a finer grid than it was trained on,
    the commit step carries nearly all of it): ``cover`` then evaluates enough copies of the
    batch that every step is drawn (see ``cover``), so a reported estimate holds every term.

    Args:
        net: The flow network.
        tokens: ``[B, L]``.
        grid: ``[K + 1, L]``.
        schedule: The noise schedule.
        generator: Random generator.
        sampling: How the rows' steps are drawn (:func:`sample_steps`).
        reverse: ``"gaussian"`` or ``"mixture"`` reverse step (as in :func:`discrete_elbo`).
        ar: Also return the AR bound of the batch (``ar_nats``), from one extra causal stream
            of ``L`` tokens (:func:`autoregressive_loss`).
        cover: Evaluate :func:`covering_copies` copies of the batch with a balanced draw that
            gives every step at least one row (each row's step still uniform), and average the
            copies per row (evaluation; costs ``ceil(K / B)`` rows per row).
        draws: Independent noise and step draws per sequence, all returned (``nats`` and the
            side outputs ``[draws * B, L]``, one stratified draw over the ``draws * B`` rows):
            what repeating the batch ``draws`` times gives, but the AR bound (which reads no
            noise) is computed once per sequence.

    Returns:
        :class:`LossTerms` (``nats`` includes the prior term).
    """
    _check_tokens(tokens)
    bind_prior_schedule(net, schedule)  # an output prior reads this schedule's states
    n_steps = grid.shape[0] - 1
    sequences = tokens
    tokens = _copied(sequences, draws, 1, n_steps, cover)
    seqs, rows = sequences.shape[0], sequences.shape[0] * draws
    b = tokens.shape[0]
    grid = grid.to(device=tokens.device)
    x_emb = net.embed(tokens)
    k = _draw_steps(b, n_steps, sampling, generator, cover).to(tokens.device)
    t_prev = grid[k - 1].to(x_emb.dtype)
    t_next = grid[k].to(x_emb.dtype)
    eps = torch.randn(x_emb.shape, generator=generator, dtype=x_emb.dtype).to(x_emb.device)
    z = _state(net, x_emb, t_prev, eps, schedule)
    o = _orders(t_prev, commit_steps(grid)[None, :])
    out = net(z, t_prev, o, None, **_self_cond(net, generator))
    logits = _read_next(out.logits, next_token_readout(t_prev, t_next, o))
    step = (t_prev, t_next)
    nats, ce = _step_nats(
        net, out.logits, logits, tokens, x_emb, step, schedule, reverse, generator
    )
    ar_nats = autoregressive_loss(net, sequences, schedule).nats if ar else None
    prior = prior_kl(x_emb, schedule)
    terms = LossTerms(nats=n_steps * nats + prior, ce=ce, scored=t_prev > 0,
                      difficulty=lambda: out.difficulty, ar_nats=ar_nats, t=t_prev)  # fmt: skip
    return _fold_copies(terms, rows, seqs)


def two_stream_loss(
    net,
    tokens: Tensor,
    schedule: NoiseSchedule,
    *,
    block_size: int,
    steps_per_block: int = 1,
    t_min: float | None = None,
    generator: torch.Generator | None = None,
    sampling: str = "stratified",
    reverse: str = "gaussian",
    ar: bool = False,
    difficulty: bool = True,
    cover: bool = False,
    draws: int = 1,
    window: int | None = None,
) -> LossTerms:
    """Vectorized estimator of the ``block(block_size)`` bound in one ``2L`` pass.

    The clean stream holds every token committed (order = position: token-causal); the noisy
    stream holds block ``b`` at the state before its ``j_b``-th transition, ``j_b`` uniform in
    ``1..steps_per_block`` (drawn by ``sampling``). A block's first token, when it jumps from 1
    to 0, reads the clean logits of its predecessor (:func:`next_token_readout`). With
    ``block_size = steps_per_block = 1`` this is the AR bound, computed as one causal stream
    (:func:`autoregressive_loss`) unless ``difficulty`` asks for the noisy stream; with one
    block it is diffusion training, and the clean stream (invisible to the noisy one) is skipped
    unless ``ar`` asks for it.

    Args:
        net: The flow network.
        tokens: ``[B, L]``.
        schedule: The noise schedule.
        block_size: Tokens per block.
        steps_per_block: ``m``, steps per block of the discretized policy.
        t_min: Smallest positive time inside a block (default ``1/m``).
        generator: Random generator.
        sampling: How the blocks' sub-steps are drawn (:func:`sample_steps`).
        reverse: ``"gaussian"`` or ``"mixture"`` reverse step (as in :func:`discrete_elbo`).
        ar: Also return the AR bound of the batch (``ar_nats``): free from the clean stream
            when there are several blocks, one extra causal stream of ``L`` tokens otherwise.
        difficulty: Whether the caller reads ``difficulty`` (the noisy stream's predictions).
        cover: Evaluate :func:`covering_copies` copies of the batch with a balanced draw that
            gives every sub-step at least one block (each block's sub-step still uniform), and
            average the copies per row: with fewer blocks in the batch than ``m`` (e.g. 8 rows,
            one block, 64 steps) a one-draw estimate misses the sub-step that carries most of
            the bound in most draws (the commit under a steep fitted warp). For evaluation.
        draws: Independent noise and sub-step draws per sequence, all returned (``nats`` and
            the side outputs ``[draws * B, L]``): what repeating the batch ``draws`` times
            gives, but with one block the extra causal stream of the AR bound is computed once
            per sequence (with several blocks it is read from each copy's clean stream, which
            the noisy stream needs anyway, and averaged). The AR bound itself reads no noise:
            with ``block_size = steps_per_block = 1`` and no ``difficulty`` it is one draw.
        window: With several blocks, the noisy stream holds only one window of ``window``
            tokens per row (a multiple of ``block_size`` dividing ``L``; each row draws one of
            the ``L / window`` windows uniformly), a ``L + window`` pass. The bound decomposes
            over blocks, each conditioned on the clean stream alone, so the window's per-token
            mean is unbiased for the sequence's; the AR term still reads all ``L`` clean
            tokens (theory §3e). ``None``: the whole sequence.

    Returns:
        :class:`LossTerms` over the noisy stream (``nats`` includes the prior term), ``[B, L]``
        or ``[B, window]``.
    """
    _check_tokens(tokens)
    bind_prior_schedule(net, schedule)  # an output prior reads this schedule's states
    if block_size < 1 or steps_per_block < 1:
        raise ConfigError(
            f"need block_size >= 1 and steps_per_block >= 1, got {block_size}, {steps_per_block}"
        )
    if block_size == 1 and steps_per_block == 1 and not difficulty:
        return autoregressive_loss(net, tokens, schedule)
    sequences, (seqs, length) = tokens, tokens.shape
    m, rows = steps_per_block, seqs * draws
    tokens = _copied(sequences, draws, -(-length // block_size), m, cover)
    b, dev = tokens.shape[0], tokens.device
    x_emb = net.embed(tokens)
    # times of one block: tau_0 = 1 > tau_1 > ... > tau_{m-1} = t_min > tau_m = 0
    tau = block_grid(1, 1, m, t_min)[:, 0]  # [m + 1], float64
    block_ids = (torch.arange(length, device=dev) // block_size)[None, :].expand(b, -1)
    n_blocks = int(block_ids.max()) + 1
    j = _draw_steps(b * n_blocks, m, sampling, generator, cover).view(b, n_blocks).to(dev)
    j_tok = torch.gather(j, 1, block_ids)
    tau = tau.to(device=dev, dtype=x_emb.dtype)
    t_prev, t_next = tau[j_tok - 1], tau[j_tok]
    eps = torch.randn(x_emb.shape, generator=generator, dtype=x_emb.dtype).to(dev)
    z_noisy = _state(net, x_emb, t_prev, eps, schedule)
    ar_nats, sc = None, _self_cond(net, generator)
    if n_blocks == 1:  # no clean key is visible to the noisy stream: one stream suffices
        out = net(z_noisy, t_prev, torch.full_like(block_ids, LIVE), None, **sc)
        own, noisy = out.logits, slice(None)
        logits = own
        if ar:
            ar_nats = autoregressive_loss(net, sequences, schedule).nats
    else:
        idx = _window_positions(b, length, block_size, window, generator, cover, dev)
        out = net(*_two_stream_inputs(x_emb, z_noisy, block_ids, t_prev, idx), **sc)
        clean, own, noisy = out.logits[:, :length], out.logits[:, length:], slice(length, None)
        if ar:
            ar_nats = _ar_terms(net, tokens, x_emb, clean, schedule)[1]
        at = torch.arange(length, device=dev).expand(b, -1) if idx is None else idx
        prev = _predecessors(clean)
        tokens, x_emb, t_prev, t_next, prev = _at(idx, tokens, x_emb, t_prev, t_next, prev)
        first = (at % block_size == 0) & (at > 0)
        logits = torch.where((first & (t_prev == 1) & (t_next == 0))[..., None], prev, own)
    step = (t_prev, t_next)
    nats, ce = _step_nats(net, own, logits, tokens, x_emb, step, schedule, reverse, generator)
    everyone = torch.ones_like(tokens, dtype=torch.bool)
    prior = prior_kl(x_emb, schedule)
    terms = LossTerms(nats=m * nats + prior, ce=ce, scored=everyone, t=t_prev,
                      difficulty=lambda: out.difficulty[:, noisy], ar_nats=ar_nats)  # fmt: skip
    return _fold_copies(terms, rows, seqs)


def _two_stream_inputs(
    x_emb: Tensor, z_noisy: Tensor, block_ids: Tensor, t_noisy: Tensor, idx: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(z, t, o, positions)``: the clean stream, then the noisy tokens at ``idx`` ``[B, W]``.

    ``idx = None``: every noisy token (the ``2L`` layout of :func:`two_stream_layout`).
    """
    b, length = block_ids.shape
    t2, o2 = two_stream_layout(block_ids, t_noisy)
    clean = torch.arange(length, device=x_emb.device).expand(b, -1)
    if idx is None:
        return torch.cat([x_emb, z_noisy], 1), t2, o2, clean.repeat(1, 2)
    z = torch.cat([x_emb, *_at(idx, z_noisy)], 1)
    t = torch.cat([t2[:, :length], *_at(idx, t2[:, length:])], 1)
    o = torch.cat([o2[:, :length], *_at(idx, o2[:, length:])], 1)
    return z, t, o, torch.cat([clean, idx], 1)


def _window_positions(
    b: int, length: int, block: int, window: int | None, generator, cover: bool, dev
) -> Tensor | None:
    """Positions ``[b, W]`` of each row's noisy window, ``None`` for every position.

    A window is drawn only in training (``cover`` off), uniformly among the ``L / window``
    block-aligned ones.
    """
    if window is None or window >= length or cover:
        return None
    if window < 1 or window % block or length % window:
        raise ConfigError(
            f"window must be a positive multiple of the block size {block} dividing the length "
            f"{length}, got {window}"
        )
    start = torch.randint(length // window, (b, 1), generator=generator).to(dev) * window
    return start + torch.arange(window, device=dev)


def _at(idx: Tensor | None, *values: Tensor) -> tuple[Tensor, ...]:
    """Each ``[B, L, ...]`` value at the positions ``idx`` ``[B, W]`` (``None``: as it is)."""
    if idx is None:
        return values
    out = []
    for v in values:
        i = idx.view(*idx.shape, *([1] * (v.ndim - 2))).expand(-1, -1, *v.shape[2:])
        out.append(v.gather(1, i))
    return tuple(out)


def continuous_elbo(
    net,
    tokens: Tensor,
    schedule: NoiseSchedule,
    *,
    t_min: float,
    eps: Tensor,
    n_points: int = 2048,
) -> Tensor:
    """The synchronous bound as ``K -> inf``, by composite Simpson quadrature in ``t``.

    ``sum_i [ int_{t_min}^1 1/2 (-SNR'(t)) |e(x_i) - e_hat_i(z_t)|^2 dt
    - log p(x_i | z_{t_min}) ] + L_prior`` with ``z_t = alpha(t) e(x) + sigma(t) eps`` for the
    given (fixed) noise.

    Args:
        net: The flow network.
        tokens: ``[B, L]``.
        schedule: The noise schedule.
        t_min: Smallest time, ``(0, 1)``.
        eps: Noise ``[B, L, d]``.
        n_points: Even number of quadrature intervals.

    Returns:
        Per-token nats ``[B, L]``.
    """
    _check_tokens(tokens)
    bind_prior_schedule(net, schedule)  # an output prior reads this schedule's states
    n_points += n_points % 2
    x_emb = net.embed(tokens)
    ts = torch.linspace(t_min, 1.0, n_points + 1, dtype=torch.float64)
    w = torch.ones(n_points + 1, dtype=torch.float64)
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    w = w * (1 - t_min) / (3 * n_points)
    no = torch.full_like(tokens, LIVE)
    total = prior_kl(x_emb, schedule)
    for ti, wi in zip(ts.tolist(), w.tolist()):
        t = torch.full(tokens.shape, ti, dtype=x_emb.dtype, device=tokens.device)
        out = net(_state(net, x_emb, t, eps, schedule), t, no, None)
        sq = ((x_emb - net.x0_hat(out.logits)) ** 2).sum(-1)
        snr = schedule.snr(t)
        snr_rate = torch.where(snr > 0, -schedule.d_log_snr(t) * snr, 0.0)  # -SNR'(t)
        total = total + wi * 0.5 * snr_rate * sq
        if ti == t_min:
            total = total + _ce(out.logits, tokens)
    return total
