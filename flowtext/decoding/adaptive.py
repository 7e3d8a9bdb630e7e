"""The adaptive (Evo) progression-time policy of theory §3.

Unlike a static policy, :class:`Adaptive` chooses the next times from the current state: at every
global step the decoder evaluates the *awake* live tokens (the leftmost ``window`` live tokens of
each row), the policy turns the network's output into a per-token confidence
``c_i in [0, 1]`` and moves each awake token by ``rate * c_i``:

* ``signal="entropy"``: ``c_i = 1 - H(p_theta(x_i | z, t)) / log V`` (readout entropy);
* ``signal="difficulty"``: ``c_i = 1 - g_theta(z, t)_i / log V``, the progression-time head's
  predicted commit loss (meaningful for models trained with ``difficulty_weight > 0``, e.g.
  :class:`~flowtext.lm.Evo`).

Both are 0 for a uniform readout (the token does not move at all) and 1 for a certain one. A token
**commits** (its time jumps to 0) when ``c_i >= threshold`` or when its advanced time falls to
``t_min`` or below; otherwise it waits at ``max(t_i - rate c_i, t_min)``. Confident tokens thus
commit at once, AR-like, while uncertain ones stay near ``t = 1`` and keep planning.

Guards:

* monotone: times never increase, and only awake tokens move;
* at least ``ceil(n_live / steps_left)`` (so at least one) commits per step, taking the most
  confident awake tokens (ties: leftmost) — so every token is committed within the step budget
  ``steps`` and the last step commits everything left;
* optional ``max_commits`` per step (the budget guard wins over it).

With one-hot confidence left to right (the leftmost live token certain, every other uniform) the
policy commits exactly the leftmost live token at each step and nothing else moves: the time
curves of ``autoregressive``.

Knobs and their effect (speed = tokens per network evaluation; quality = sample likelihood):

* ``threshold`` (default 0.9): lower commits more tokens per step in parallel (faster) but commits
  mutually dependent tokens independently (worse samples); ``1`` disables confident commits.
* ``rate`` (default 0.5): how far a confident-but-not-certain token advances per step. Higher
  reaches ``t_min`` sooner (faster); ``0`` keeps every uncommitted token at ``t = 1`` (pure
  confidence-ordered parallel AR, no planning).
* ``window`` (default 16): awake tokens per row, i.e. tokens evaluated per step. Larger allows
  more parallel commits but makes each evaluation dearer.
* ``t_min`` (default 0.1): smallest time a waiting token reaches before it is forced to commit.
* ``max_commits``: caps parallel commits (quality guard).
* the decoder's ``steps``: the budget; fewer steps force more commits per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from flowtext.errors import ConfigError
from flowtext.policies import ProgressionPolicy, register

__all__ = ["Adaptive"]

_SIGNALS = ("entropy", "difficulty")


@register("adaptive")
@dataclass(frozen=True)
class Adaptive(ProgressionPolicy):
    """Confidence-driven progression times (Evo decoding); see the module docstring.

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

    # ------------------------------------------------------------------------------ decisions
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
            live: Live (uncommitted, still decoding) tokens ``[B, L]`` bool.
            step: Index ``k`` of the step being taken (``0 <= k < steps``).
            steps: The step budget ``K``.

        Returns:
            ``[B]`` long; all live tokens on the last step, 0 for rows with none.
        """
        n = live.sum(1)
        left = max(1, steps - step)
        return torch.div(n + left - 1, left, rounding_mode="floor")

    def awake(self, live: Tensor, step: int, steps: int) -> Tensor:
        """The tokens evaluated (and allowed to move) at this step.

        Args:
            live: ``[B, L]`` bool.
            step: Step index ``k``.
            steps: Step budget ``K``.

        Returns:
            ``[B, L]`` bool: the leftmost ``max(window, required)`` live tokens of each row.
        """
        rank = torch.cumsum(live.long(), dim=1) - 1
        cap = self.required(live, step, steps).clamp_min(self.window)
        return live & (rank < cap[:, None])

    def next_times(
        self, t: Tensor, confidence: Tensor, awake: Tensor, live: Tensor, step: int, steps: int
    ) -> Tensor:
        """Next times of every token.

        Args:
            t: Current times ``[B, L]``.
            confidence: ``[B, L]`` in ``[0, 1]`` (read on awake tokens only).
            awake: ``[B, L]`` bool, from :meth:`awake`.
            live: ``[B, L]`` bool.
            step: Step index ``k``.
            steps: Step budget ``K``.

        Returns:
            ``[B, L]``: ``<= t``; committing tokens at 0; tokens that are not awake unchanged.
        """
        conf = torch.where(awake, confidence.to(t.dtype), 0.0)
        advanced = t - self.rate * conf
        want = awake & ((conf >= self.threshold) | (advanced <= self.t_min))
        # priority: confidence first, then maturity, ties to the left (stable sort). Rounded to
        # 1e-6 so that round-off (cached vs uncached, batched vs single) cannot reorder near-ties.
        score = torch.where(awake, torch.round((conf + 1e-3 * (1 - t)) * 1e6), -1.0)
        order = torch.sort(score, dim=1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(
            1, order, torch.arange(t.shape[1], device=t.device).expand_as(order)
        )
        n_want = want.sum(1)
        if self.max_commits is not None:
            n_want = n_want.clamp_max(self.max_commits)
        n_commit = torch.maximum(n_want, self.required(live, step, steps))
        # commit the n_commit best-ranked wanted tokens, then fill up with the best awake ones
        want_rank = torch.where(want, rank, rank + t.shape[1])
        order2 = torch.sort(want_rank, dim=1, stable=True).indices
        rank2 = torch.empty_like(order2).scatter_(
            1, order2, torch.arange(t.shape[1], device=t.device).expand_as(order2)
        )
        commit = awake & (rank2 < n_commit[:, None])
        waiting = torch.maximum(advanced, torch.minimum(t, torch.full_like(t, self.t_min)))
        return torch.where(commit, 0.0, torch.where(awake, waiting, t))
