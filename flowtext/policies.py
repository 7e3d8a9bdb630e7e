"""Progression-time policies: how the per-token times ``t_i`` move over a global clock ``s``.

A policy is a curve ``s -> t(s) in [0, 1]^L`` with ``t(0) = 1``, ``t(1) = 0`` and every ``t_i``
non-increasing (theory §3). A *static* policy is a fixed curve, used through a discretization
``policy.grid(length, steps)`` of shape ``[steps + 1, length]`` taken at ``s_k = k / steps``.

* ``synchronous``: ``t_i(s) = 1 - s`` (pure diffusion / flow matching).
* ``block(size)``: blocks of ``size`` tokens in order, synchronous inside the active block.
* ``autoregressive``: ``block(1)``; one token at a time, left to right (pure AR).
* ``diagonal(width)``: a linear ramp of ``width`` (fraction of the sequence) sweeping left to
  right; tends to ``autoregressive`` as ``width -> 0`` and to ``synchronous`` as it grows.
* ``adaptive``: :class:`Adaptive`, the Evo policy of theory §3, which moves times from the
  network's confidence at the current state.

Every policy answers the decoder through one interface, at each global step ``k``:

1. :meth:`~ProgressionPolicy.awake` on a :class:`PolicyView` (times, live tokens, ``k``, ``K``,
   the precomputed :meth:`~ProgressionPolicy.plan`): the tokens to evaluate, the only ones that
   may move;
2. :meth:`~ProgressionPolicy.next_times` on the same view plus the network's
   :class:`Evaluation` of the awake tokens: the times after the step (0 = commit).

A static policy reads both from its grid (and ignores the evaluation); :class:`Adaptive` reads
the evaluation.

Example:
    >>> from flowtext import policies
    >>> policies.get("block", size=2).grid(length=4, steps=4)
    tensor([[1., 1., 1., 1.],
            [0.5000, 0.5000, 1.0000, 1.0000],
            [0., 0., 1., 1.],
            [0.0000, 0.0000, 0.5000, 0.5000],
            [0., 0., 0., 0.]])
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from flowtext._registry import Registry
from flowtext.errors import ConfigError

__all__ = [
    "Adaptive",
    "Autoregressive",
    "Block",
    "Diagonal",
    "Evaluation",
    "PolicyView",
    "ProgressionPolicy",
    "StaticPolicy",
    "Synchronous",
    "get",
    "names",
    "register",
]


@dataclass(frozen=True)
class Evaluation:
    """The network's output on the awake tokens, packed to the front of each row.

    Attributes:
        logits: ``[B, n, V]``.
        difficulty: Progression-time head ``[B, n]`` (predicted commit loss, nats).
        index: Position in the sequence of each entry ``[B, n]`` (long).
        valid: ``[B, n]`` bool; ``False`` marks padding of rows with fewer awake tokens.
    """

    logits: Tensor
    difficulty: Tensor
    index: Tensor
    valid: Tensor


@dataclass(frozen=True)
class PolicyView:
    """What a policy sees at one global step (read-only).

    Attributes:
        t: Current times ``[B, L]``.
        live: Tokens still to decode ``[B, L]`` bool (uncommitted, in rows not stopped).
        step: Index ``k`` of the step being taken, ``0 <= k < steps``.
        steps: The number (static) or budget (adaptive) of global steps ``K``.
        plan: What :meth:`ProgressionPolicy.plan` returned (a static grid ``[K + 1, L]`` on the
            device and dtype of ``t``), or ``None``.
        evaluation: The network's output on the awake tokens; ``None`` before evaluating.
    """

    t: Tensor
    live: Tensor
    step: int
    steps: int
    plan: Tensor | None = None
    evaluation: Evaluation | None = None

    def spread(self, values: Tensor, fill: float = 0.0) -> Tensor:
        """Scatter per-entry ``values [B, n]`` of :attr:`evaluation` back to ``[B, L]``.

        Positions without an entry get ``fill``.
        """
        ev = self.evaluation
        if ev is None:
            raise ConfigError("this view holds no evaluation yet")
        out = torch.full(self.t.shape, fill, dtype=values.dtype, device=values.device)
        rows = torch.arange(ev.index.shape[0], device=ev.index.device)[:, None]
        out[rows.expand_as(ev.index)[ev.valid], ev.index[ev.valid]] = values[ev.valid]
        return out


class ProgressionPolicy(ABC):
    """Base class of every progression-time policy: which tokens move and to which times.

    ``static`` tells fixed curves (:class:`StaticPolicy`) from state-driven ones
    (:class:`Adaptive`).
    """

    name: ClassVar[str]
    static: ClassVar[bool] = False

    def plan(
        self, length: int, steps: int, *, dtype: torch.dtype, device: torch.device | str | None
    ) -> Tensor | None:
        """Whatever the policy precomputes once per decoding (``None`` by default).

        Args:
            length: Tokens to decode ``L``.
            steps: Global steps ``K``.
            dtype: Floating dtype of the times.
            device: Device of the times.

        Raises:
            ConfigError: ``steps`` cannot drive this policy.
        """
        return None

    @abstractmethod
    def awake(self, view: PolicyView) -> Tensor:
        """The tokens to evaluate at this step, the only ones allowed to move: ``[B, L]`` bool."""

    @abstractmethod
    def next_times(self, view: PolicyView) -> Tensor:
        """Times after this step ``[B, L]``: ``<= view.t``, committing tokens at 0.

        Args:
            view: The step's view, with :attr:`PolicyView.evaluation` of the :meth:`awake`
                tokens.
        """


class StaticPolicy(ProgressionPolicy):
    """A fixed curve ``t(s)``; subclasses implement :meth:`curve` and may restrict ``steps``."""

    static: ClassVar[bool] = True

    @abstractmethod
    def curve(self, s: Tensor, length: int) -> Tensor:
        """Times at global clock values ``s``.

        Args:
            s: Clock values ``[N]`` in ``[0, 1]``.
            length: Sequence length ``L``.

        Returns:
            Times ``[N, L]``.
        """

    def check_steps(self, length: int, steps: int) -> None:
        """Raise :class:`ConfigError` when ``steps`` cannot discretize this policy exactly."""

    def grid(
        self,
        length: int,
        steps: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """The discretized curve at ``s_k = k / steps``.

        Args:
            length: Sequence length ``L >= 1``.
            steps: Number of global steps ``K >= 1``.
            dtype: Floating dtype of the result.
            device: Device of the result.

        Returns:
            Times ``[K + 1, L]``: row 0 all ones, row ``K`` all zeros, columns non-increasing.

        Raises:
            ConfigError: ``length < 1``, ``steps < 1`` or a step count this policy cannot use.
        """
        if not isinstance(length, int) or length < 1:
            raise ConfigError(f"length must be a positive int, got {length!r}")
        if not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"steps must be a positive int, got {steps!r}")
        self.check_steps(length, steps)
        s = torch.arange(steps + 1, dtype=torch.float64) / steps
        times = self.curve(s, length).clamp(0.0, 1.0)
        times[0] = 1.0
        times[-1] = 0.0
        return times.to(dtype=dtype, device=device)

    def plan(self, length, steps, *, dtype, device):  # noqa: D102
        return self.grid(length, steps, dtype=dtype, device=device)

    def next_times(self, view: PolicyView) -> Tensor:
        """The grid's next row for live tokens (never above the current time); others stay."""
        grid = view.plan
        if grid is None:
            grid = self.plan(view.t.shape[1], view.steps, dtype=view.t.dtype, device=view.t.device)
        target = torch.where(view.live, grid[view.step + 1].expand_as(view.t), view.t)
        return torch.minimum(target, view.t)

    def awake(self, view: PolicyView) -> Tensor:
        """Live tokens that have left ``t = 1`` or leave it now (a token at 1 is not read)."""
        return view.live & ((view.t < 1) | (self.next_times(view) < view.t))


registry: Registry[ProgressionPolicy] = Registry("policy")
register = registry.register
names = registry.names
resolve = registry.resolve


def get(name: str, **kwargs: Any) -> ProgressionPolicy:
    """Build a policy by registry name.

    Args:
        name: One of :func:`names`.
        **kwargs: Constructor arguments (``size`` for ``block``, ``width`` for ``diagonal``).

    Raises:
        ConfigError: Unknown name (the message lists the valid ones) or bad arguments.
    """
    return registry.get(name, **kwargs)


@register("synchronous")
@dataclass(frozen=True)
class Synchronous(StaticPolicy):
    """All tokens share one clock: ``t_i(s) = 1 - s``."""

    def curve(self, s: Tensor, length: int) -> Tensor:  # noqa: D102
        return (1 - s)[:, None].expand(-1, length).clone()


@register("block")
@dataclass(frozen=True)
class Block(StaticPolicy):
    """Blocks of ``size`` tokens, one after another, synchronous inside the active block.

    With ``n = ceil(L / size)`` blocks, token ``i`` in block ``j = i // size`` follows
    ``t_i(s) = clip(j + 1 - n s, 0, 1)``. ``steps`` must be a multiple of ``n`` so that every
    block boundary lies on the grid. ``block(1)`` is ``autoregressive``, ``block(L)`` is
    ``synchronous``.

    Args:
        size: Tokens per block, ``>= 1`` (a size above ``L`` acts as ``L``).
    """

    size: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 1:
            raise ConfigError(f"block size must be a positive int, got {self.size!r}")

    def n_blocks(self, length: int) -> int:
        """Number of blocks ``ceil(length / size)``."""
        return -(-length // self.size)

    def block_ids(self, length: int, device: torch.device | str | None = None) -> Tensor:
        """Block index of each position, ``[L]`` long."""
        return torch.arange(length, device=device) // self.size

    def check_steps(self, length: int, steps: int) -> None:  # noqa: D102
        n = self.n_blocks(length)
        if steps % n:
            raise ConfigError(
                f"{self.name} policy with {n} blocks (length {length}, block size "
                f"{min(self.size, length)}) needs steps to be a multiple of {n}; got {steps}. "
                f"Use steps={n * max(1, round(steps / n))}."
            )

    def curve(self, s: Tensor, length: int) -> Tensor:  # noqa: D102
        j = self.block_ids(length).to(s.dtype)
        return (j[None, :] + 1 - self.n_blocks(length) * s[:, None]).clamp(0.0, 1.0)


@register("autoregressive")
@dataclass(frozen=True)
class Autoregressive(Block):
    """Pure AR: ``block(size=1)``. ``steps`` must be a multiple of the length.

    With ``steps == L`` token ``k`` jumps from 1 to 0 at step ``k``; with ``m L`` steps it moves
    linearly over ``m`` steps while every other token is frozen.
    """

    size: int = 1

    def __post_init__(self) -> None:
        if self.size != 1:
            raise ConfigError("autoregressive has block size 1; use the 'block' policy instead")


@register("diagonal")
@dataclass(frozen=True)
class Diagonal(StaticPolicy):
    """A linear ramp of ``width`` (fraction of the sequence) sweeping left to right.

    Token ``i`` at relative position ``p_i = (i + 1/2) / L`` follows
    ``t_i(s) = clip((p_i - a(s)) / width, 0, 1)`` with front ``a(s) = s (1 + width) - width``:
    tokens left of the front are committed, tokens more than ``width`` right of it are noise.
    With ``steps = L`` and ``width < 1 / (2 L)`` the grid is exactly ``autoregressive``'s.

    Args:
        width: Ramp width, ``> 0``.
    """

    width: float = 0.25

    def __post_init__(self) -> None:
        if not (
            isinstance(self.width, (int, float)) and math.isfinite(self.width) and self.width > 0
        ):
            raise ConfigError(f"diagonal width must be a finite number > 0, got {self.width!r}")

    def curve(self, s: Tensor, length: int) -> Tensor:  # noqa: D102
        p = (torch.arange(length, dtype=s.dtype) + 0.5) / length
        front = s * (1 + self.width) - self.width
        return ((p[None, :] - front[:, None]) / self.width).clamp(0.0, 1.0)


_SIGNALS = ("entropy", "difficulty")


@register("adaptive")
@dataclass(frozen=True)
class Adaptive(ProgressionPolicy):
    """Confidence-driven progression times: the adaptive (Evo) policy of theory §3.

    Unlike a static policy it chooses the next times from the current state. At every global step
    the *awake* tokens (the leftmost ``window`` live tokens of each row) are evaluated, the
    network's output becomes a per-token confidence ``c_i in [0, 1]``, and each awake token moves
    by ``rate * c_i``:

    * ``signal="entropy"``: ``c_i = 1 - H(p_theta(x_i | z, t)) / log V`` (readout entropy);
    * ``signal="difficulty"``: ``c_i = 1 - g_theta(z, t)_i / log V``, the progression-time head's
      predicted commit loss (meaningful for models trained with ``difficulty_weight > 0``).

    Both are 0 for a uniform readout (the token does not move) and 1 for a certain one. A token
    **commits** (its time jumps to 0) when ``c_i >= threshold`` or when its advanced time falls to
    ``t_min`` or below; otherwise it waits at ``max(t_i - rate c_i, t_min)``. Confident tokens
    commit at once, AR-like, while uncertain ones stay near ``t = 1`` and keep planning.

    Guards: times never increase and only awake tokens move; at least
    ``ceil(n_live / steps_left)`` (so at least one) tokens commit per step, the most confident
    awake ones (ties: leftmost), so every token commits within the budget ``steps``; an optional
    ``max_commits`` per step (the budget guard wins over it). With one-hot confidence left to
    right the policy commits exactly the leftmost live token at each step: ``autoregressive``.

    Knobs (speed = tokens per network evaluation; quality = sample likelihood): a lower
    ``threshold`` commits more tokens per step (faster, but mutually dependent tokens are drawn
    independently); a higher ``rate`` reaches ``t_min`` sooner (``0`` keeps every uncommitted
    token at ``t = 1``: confidence-ordered parallel AR); a larger ``window`` allows more parallel
    commits but makes each evaluation dearer; ``max_commits`` caps parallel commits; the
    decoder's ``steps`` is the budget.

    Args:
        signal: ``"entropy"`` (readout entropy) or ``"difficulty"`` (progression-time head).
        threshold: Confidence in ``(0, 1]`` at or above which an awake token commits at once.
        rate: Time advance per step of a token of confidence 1, ``>= 0``.
        window: Number of awake (evaluated, movable) live tokens per row, ``>= 1``.
        t_min: Time in ``(0, 1)`` at or below which a moving token commits.
        max_commits: Optional cap on commits per row and step (``None`` = no cap).
    """

    signal: str = "entropy"
    threshold: float = 0.9
    rate: float = 0.5
    window: int = 16
    t_min: float = 0.1
    max_commits: int | None = None
    static: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.signal not in _SIGNALS:
            raise ConfigError(
                f"adaptive signal must be one of {', '.join(_SIGNALS)}, got {self.signal!r}"
            )
        if not (isinstance(self.threshold, (int, float)) and 0 < self.threshold <= 1):
            raise ConfigError(f"adaptive threshold must lie in (0, 1], got {self.threshold!r}")
        if not (
            isinstance(self.rate, (int, float)) and math.isfinite(self.rate) and self.rate >= 0
        ):
            raise ConfigError(f"adaptive rate must be a finite number >= 0, got {self.rate!r}")
        if not isinstance(self.window, int) or self.window < 1:
            raise ConfigError(f"adaptive window must be a positive int, got {self.window!r}")
        if not (isinstance(self.t_min, (int, float)) and 0 < self.t_min < 1):
            raise ConfigError(f"adaptive t_min must lie in (0, 1), got {self.t_min!r}")
        if self.max_commits is not None and (
            not isinstance(self.max_commits, int) or self.max_commits < 1
        ):
            raise ConfigError(
                f"adaptive max_commits must be None or a positive int, got {self.max_commits!r}"
            )

    def confidence(self, logits: Tensor, difficulty: Tensor) -> Tensor:
        """Per-token confidence in ``[0, 1]`` from the network output.

        Args:
            logits: ``[B, n, V]``.
            difficulty: Progression-time head ``[B, n]`` (predicted commit loss, nats).

        Returns:
            ``[B, n]``: ``1 - signal / log V`` clipped to ``[0, 1]``.
        """
        scale = math.log(max(2, logits.shape[-1]))
        if self.signal == "entropy":
            logp = torch.log_softmax(logits, dim=-1)
            signal = -(logp.exp() * logp).sum(-1)
        else:
            signal = difficulty
        return (1 - signal / scale).clamp(0.0, 1.0)

    @staticmethod
    def required(live: Tensor, step: int, steps: int) -> Tensor:
        """Minimum commits per row at this step: ``ceil(n_live / steps_left)``.

        Args:
            live: Live tokens ``[B, L]`` bool.
            step: Index ``k`` of the step being taken (``0 <= k < steps``).
            steps: The step budget ``K``.

        Returns:
            ``[B]`` long; all live tokens on the last step, 0 for rows with none.
        """
        n = live.sum(1)
        left = max(1, steps - step)
        return torch.div(n + left - 1, left, rounding_mode="floor")

    def awake(self, view: PolicyView) -> Tensor:
        """The leftmost ``max(window, required)`` live tokens of each row, ``[B, L]`` bool."""
        rank = torch.cumsum(view.live.long(), dim=1) - 1
        cap = self.required(view.live, view.step, view.steps).clamp_min(self.window)
        return view.live & (rank < cap[:, None])

    def next_times(self, view: PolicyView) -> Tensor:
        """Commit the confident awake tokens (and the budget's due), advance the others.

        Args:
            view: The step's view with the :class:`Evaluation` of the :meth:`awake` tokens.

        Returns:
            ``[B, L]``: ``<= t``; committing tokens at 0; tokens that are not awake unchanged.
        """
        ev = view.evaluation
        if ev is None:
            raise ConfigError("the adaptive policy needs the evaluation of the awake tokens")
        t, awake = view.t, self.awake(view)
        conf = view.spread(self.confidence(ev.logits, ev.difficulty).to(t.dtype))
        conf = torch.where(awake, conf, 0.0)
        advanced = t - self.rate * conf
        want = awake & ((conf >= self.threshold) | (advanced <= self.t_min))
        n_want = want.sum(1)
        if self.max_commits is not None:
            n_want = n_want.clamp_max(self.max_commits)
        n_commit = torch.maximum(n_want, self.required(view.live, view.step, view.steps))
        commit = awake & (self._rank(t, conf, awake, want) < n_commit[:, None])
        waiting = torch.maximum(advanced, torch.minimum(t, torch.full_like(t, self.t_min)))
        return torch.where(commit, 0.0, torch.where(awake, waiting, t))

    @staticmethod
    def _rank(t: Tensor, conf: Tensor, awake: Tensor, want: Tensor) -> Tensor:
        """Commit priority of each token ``[B, L]`` (0 first).

        Wanted tokens come first, then the rest; within each, confidence first, then maturity,
        ties to the left (stable sorts).
        """
        # rounded to 1e-6 so that round-off (cached vs uncached, batched vs single) cannot
        # reorder near-ties
        score = torch.where(awake, torch.round((conf + 1e-3 * (1 - t)) * 1e6), -1.0)
        rank = _ranks(torch.sort(score, dim=1, descending=True, stable=True).indices)
        want_rank = torch.where(want, rank, rank + t.shape[1])
        return _ranks(torch.sort(want_rank, dim=1, stable=True).indices)


def _ranks(order: Tensor) -> Tensor:
    """Inverse permutation of each row of ``order [B, L]``: the rank of every position."""
    ar = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, ar)
