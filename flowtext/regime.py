"""Training regimes: which static policies' ELBOs a flow LM trains on, and how.

A :class:`TrainingRegime` is plain, validated data. Each training batch draws one bound from it:

* with probability ``1 - single_stream_fraction`` a ``block(B)`` policy, ``B`` drawn uniformly
  from ``block_sizes`` (``1`` = AR with one jump per token, ``0`` = one block over the whole
  sequence, i.e. diffusion), with ``steps_per_block`` steps per block (or a number drawn
  from ``step_choices``), estimated two-stream;
* otherwise a ``diagonal(w)`` policy, ``w`` drawn uniformly from ``diagonal_widths``, with
  ``diagonal_steps`` steps per token, estimated single-stream. Its states mix committed,
  partially denoised and pure-noise tokens at different times: those an adaptive decoder visits.

The loss is the drawn bound's ELBO (nats per token), plus ``ar_weight`` times the exact AR bound
of the same batch (on *every* batch: free from the token-causal clean stream of two-stream
batches, one extra causal stream of ``L`` tokens for single-stream and one-block batches), plus
``difficulty_weight`` times the progression-time head's regression loss. AR, diffusion and Evo
are the presets :meth:`TrainingRegime.autoregressive`, :meth:`TrainingRegime.diffusion` and
:meth:`TrainingRegime.evo`.

Example:
    >>> from flowtext.regime import TrainingRegime, block_bound
    >>> TrainingRegime.evo().probabilities()["block1"]
    0.25
    >>> TrainingRegime.diffusion().block_bound(0, length=128)
    DrawnBound(policy=Synchronous(), steps=64, label='block0')
    >>> block_bound(8, steps_per_block=16, length=128).steps
    256
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from flowtext.errors import ConfigError
from flowtext.objectives import REVERSE_STEPS, STEP_SAMPLINGS
from flowtext.policies import Block, Diagonal, StaticPolicy, Synchronous

__all__ = ["DrawnBound", "TrainingRegime", "block_bound"]


EVO_BOUND_WEIGHTS = {"block2": 0.5, "block4": 0.5, "block8": 0.5, "block0": 0.5, "diagonal": 0.025}
"""Weights of :meth:`TrainingRegime.evo`'s drawn non-AR bounds (AR itself weighs 1)."""


@dataclass(frozen=True)
class DrawnBound:
    """A static policy discretized into ``steps`` global steps: the bound one batch trains.

    Attributes:
        policy: The static policy (``Block``, ``Synchronous`` or ``Diagonal``).
        steps: Global steps ``K`` of its grid (``policy.grid(L, K)``).
        label: Name in the training logs (``block1``, ``block0`` = whole sequence, ``diagonal``).
    """

    policy: StaticPolicy
    steps: int
    label: str


@dataclass(frozen=True)
class TrainingRegime:
    """Which static policies' ELBOs a model trains on, with which probabilities and weights.

    Every field has a docstring so ``jsonargparse`` shows it in ``flowtext fit --help``
    (``--model.init_args.regime.*``). Lists are stored as tuples; invalid combinations raise
    :class:`~flowtext.errors.ConfigError` at construction.
    """

    block_sizes: tuple[int, ...] = (1,)
    """Block sizes of the two-stream bounds, one drawn uniformly per batch (repeat a size to
    draw it more often); 1 = AR (one jump per token), 0 = one block over the whole sequence."""
    steps_per_block: int = 1
    """Steps m per block of more than one token (single tokens always jump 1 -> 0 in one step)."""
    step_choices: tuple[int, ...] = ()
    """If given, each two-stream batch draws its steps per block uniformly from these instead of
    ``steps_per_block`` (each with its own ``t_min = 1/m`` when ``t_min`` is null), so the
    network trains on the times of several grids, not of one (validation keeps its own m)."""
    t_min: float | None = None
    """Smallest positive time inside a block; null = 1 / steps_per_block. Diagonal grids use
    t_min, or 1 / max(2, steps_per_block) when null."""
    single_stream_fraction: float = 0.0
    """Probability that a batch trains single-stream on a diagonal(w) policy instead."""
    diagonal_widths: tuple[float, ...] = (0.1, 0.25, 0.5)
    """Widths w of the diagonal policies, one drawn uniformly per single-stream batch."""
    diagonal_steps: int = 4
    """Steps per token of the diagonal grids (K = diagonal_steps * sequence length)."""
    step_sampling: Literal["stratified", "independent"] = "stratified"
    """How the estimators draw each row's (single-stream) or block's (two-stream) step:
    stratified over the batch (lower variance) or independent uniforms."""
    difficulty_weight: float = 0.0
    """Weight of the progression-time head's regression loss added to the ELBO (0 = untrained)."""
    difficulty_on_ar: bool = True
    """Whether a drawn AR bound (``block1``) also scores its noisy stream, all tokens at
    ``t = 1`` after a clean prefix, to train the progression-time head: two streams of ``L``
    tokens, twice the cost of the AR bound alone. False: AR draws run one causal stream and the
    head trains on the other draws only."""
    ar_weight: float = 0.0
    """Weight of the exact AR bound added on every batch, whatever bound is drawn (read from
    the clean stream of two-stream batches; 0 = only when AR itself is drawn)."""
    ce_weight: float = 0.0
    """Weight of the drawn bound's denoiser cross-entropy added to the loss: the mean commit
    cross-entropy ``-log p(x | z_t)`` of the tokens at their evaluated states (not added when
    the AR bound is drawn, which is one already). A proper scoring rule at every ``t``, with the
    same minimizer as the bound and far less gradient noise than its ``K``-weighted one-step
    KL; with the bound's own weight at 0 (``bound_weights``) the bound trains by cross-entropy
    alone (theory §3h). Never reported as bits."""
    bound_row_fraction: float = 1.0
    """Fraction of each batch's rows (at least one) on which a drawn bound other than AR is
    estimated; the AR term (``ar_weight > 0``) still covers every row, the others as one causal
    stream of ``L`` tokens. Below 1 a batch costs less than two streams per row, so at equal
    wall time the AR term sees more data and the other bounds less: a wall-clock setting (0.25
    came within 5.4-8.0% of the AR model in 8-10 minutes, but scored worse on every bound at
    equal steps; theory §3e)."""
    bound_window: float = 1.0
    """Fraction of each row's positions that carry the noisy stream of a drawn block bound with
    several blocks: one block-aligned window of ``bound_window * L`` tokens per row, drawn
    uniformly (:func:`~flowtext.objectives.two_stream_loss`'s ``window``; unbiased, since the
    bound decomposes over blocks). The clean stream, and so the AR term, keeps all ``L`` tokens.
    Like ``bound_row_fraction`` it makes a batch cheaper, but spreads the bound over every row
    instead of a few (theory §3e). A block size the window cannot hold (it must be a multiple
    of the block size and divide ``L``) and the whole-sequence bound use every position; a
    ``bound_row_fraction`` below 1 then thins those draws (and diagonal ones) by rows, while
    windowed draws keep every row. At 8 minutes on one thread, 0.25 (with rows 0.25 for the
    rest) scored like ``bound_row_fraction`` 0.25 alone, within noise (docs/results.md §2d)."""
    ar_tail: float = 0.0
    """Fraction of the learning-rate schedule at its end that trains the exact AR bound alone:
    from optimizer step ``(1 - ar_tail) * max_lr_steps`` on (and after the decay) every batch
    is the AR bound as an AR draw trains it (one causal stream with ``difficulty_on_ar``
    false), whatever the draw would give. The other bounds are then learned at the schedule's
    higher rates, and the AR term's last, low-rate steps carry none of their gradient noise;
    with ``difficulty_on_ar`` false they are also as cheap as the AR model's. A wall-clock
    setting like ``bound_row_fraction`` (0 = off; needs the model's ``max_lr_steps``). At 8
    minutes on one thread with ``bound_row_fraction`` 0.25, Evo was 7.0-7.3% behind the AR
    model without a tail and 4.6-10.0% behind with 0.1-0.2 (5 runs, 3 seeds), the other bounds
    losing up to 0.14 bits (docs/results.md §2e)."""
    schedule_fit_every: int = 100
    """Training batches between refits of a fitted schedule (info-uniform); every training batch
    feeds it the scored tokens' (log-SNR, commit cross-entropy) pairs. Ignored otherwise."""
    bound_weights: dict[str, float] = field(default_factory=dict)
    """Weight of each drawn bound's ELBO in the loss, by log label (``block1`` = AR,
    ``block<B>``, ``block0`` = whole sequence, ``diagonal``); a label not given weighs 1. The
    AR term added on every batch keeps ``ar_weight``. Logged bounds are never weighted."""
    normalize: bool = False
    """Train each ELBO term (the drawn bound and the AR term) as ``log`` of its batch mean, i.e.
    divide it by its own detached value: a 6-nat diffusion bound and a 2-nat AR bound then pull
    with the same relative strength. Changes the gradient only, never a reported bound."""
    noise_draws: int = 1
    """Noise and time draws per sequence for drawn bounds other than AR: the bound is estimated
    on this many copies of the batch, each with its own noise and (stratified) steps, and is
    their mean (less gradient noise, ``noise_draws`` times the drawn bound's cost). What reads
    no noise is computed once per sequence: the exact AR term's extra causal stream
    (single-stream and one-block bounds; with several blocks each copy's clean stream, which its
    noisy stream needs, also gives the AR term). The AR bound itself is never repeated."""
    reverse: Literal["gaussian", "mixture"] = "gaussian"
    """Reverse step of the bounds (training and validation): gaussian = the Gaussian-mean step
    q(z_s | z_t, x_hat) (theory §4), mixture = sum_v p(v | z_t) q(z_s | z_t, e_v) (theory §4b)."""

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalize YAML lists to tuples once, here
        set_(self, "block_sizes", tuple(_int(b, "block_sizes") for b in self.block_sizes))
        set_(self, "step_choices", tuple(_int(m, "step_choices") for m in self.step_choices))
        set_(self, "diagonal_widths", tuple(float(w) for w in self.diagonal_widths))
        set_(self, "steps_per_block", _int(self.steps_per_block, "steps_per_block"))
        set_(self, "diagonal_steps", _int(self.diagonal_steps, "diagonal_steps"))
        set_(self, "schedule_fit_every", _int(self.schedule_fit_every, "schedule_fit_every"))
        set_(self, "noise_draws", _int(self.noise_draws, "noise_draws"))
        set_(self, "bound_weights", _weights(self.bound_weights))
        self._check_mixture()
        self._check_steps()

    def _check_mixture(self) -> None:
        fraction = self.single_stream_fraction
        if not 0.0 <= fraction <= 1.0:
            raise ConfigError(f"single_stream_fraction must lie in [0, 1], got {fraction}")
        if fraction < 1.0 and not self.block_sizes:
            raise ConfigError(
                "block_sizes is empty but single_stream_fraction < 1: give block sizes "
                "(1 = AR, 0 = whole sequence) or set single_stream_fraction: 1.0"
            )
        if any(b < 0 for b in self.block_sizes):
            raise ConfigError(
                f"block_sizes must be >= 0 (0 = whole sequence), got {list(self.block_sizes)}"
            )
        widths = self.diagonal_widths
        if fraction > 0 and (not widths or not all(math.isfinite(w) and w > 0 for w in widths)):
            raise ConfigError(f"diagonal_widths must be positive numbers, got {list(widths)}")
        for name in ("difficulty_weight", "ar_weight", "ce_weight"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a number >= 0, got {value!r}")
        for name in ("bound_row_fraction", "bound_window"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value <= 1):
                raise ConfigError(f"{name} must lie in (0, 1], got {value!r}")
        tail = self.ar_tail
        if not (isinstance(tail, (int, float)) and 0 <= tail < 1):
            raise ConfigError(f"ar_tail must lie in [0, 1), got {tail!r}")
        rows = self.bound_row_fraction
        if rows < 1 and self.ar_weight == 0:
            raise ConfigError(
                "bound_row_fraction < 1 needs ar_weight > 0: the rows without the drawn bound "
                "would train nothing"
            )
        if self.step_sampling not in STEP_SAMPLINGS:
            raise ConfigError(
                f"unknown step_sampling {self.step_sampling!r}; valid: {', '.join(STEP_SAMPLINGS)}"
            )
        if self.reverse not in REVERSE_STEPS:
            raise ConfigError(
                f"unknown reverse step {self.reverse!r}; valid: {', '.join(REVERSE_STEPS)}"
            )

    def _check_steps(self) -> None:
        if self.steps_per_block < 1:
            raise ConfigError(f"steps_per_block must be >= 1, got {self.steps_per_block}")
        if any(m < 2 for m in self.step_choices):
            raise ConfigError(f"step_choices must all be >= 2, got {list(self.step_choices)}")
        if self.diagonal_steps < 1:
            raise ConfigError(f"diagonal_steps must be >= 1, got {self.diagonal_steps}")
        if self.noise_draws < 1:
            raise ConfigError(f"noise_draws must be >= 1, got {self.noise_draws}")
        if self.schedule_fit_every < 1:
            raise ConfigError(f"schedule_fit_every must be >= 1, got {self.schedule_fit_every}")
        if self.t_min is not None and not 0 < self.t_min < 1:
            raise ConfigError(f"t_min must lie in (0, 1), got {self.t_min}")
        trains_blocks = self.single_stream_fraction < 1.0
        if self.steps_per_block == 1 and trains_blocks and any(b != 1 for b in self.block_sizes):
            raise ConfigError(
                "steps_per_block = 1 commits whole blocks in one jump from pure noise, which only "
                "makes sense for block size 1 (AR); use steps_per_block > 1 for larger blocks"
            )

    # --------------------------------------------------------------------------------- presets
    @classmethod
    def autoregressive(cls) -> TrainingRegime:
        """Pure AR: ``block(1)`` with one jump per token; the ELBO is the AR likelihood."""
        return cls(block_sizes=(1,), steps_per_block=1)

    @classmethod
    def diffusion(cls, steps_per_block: int = 64) -> TrainingRegime:
        """Pure diffusion: one block over the whole sequence with the mixture reverse step.

        Each batch draws its steps from 4 to 64 (``step_choices``), as Evo does;
        ``steps_per_block`` is the bound :meth:`block_bound` names. At 400 equal steps this
        scored 4.6-4.9 bits/byte at 4, 16 and 64 synchronous steps, where the Gaussian-mean step
        on one 64-step grid scored 13.6, 6.5 and 52 (docs/results.md, "The diffusion special
        case's recipe").
        """
        return cls(
            block_sizes=(0,),
            steps_per_block=steps_per_block,
            step_choices=(4, 8, 16, 32, 64),
            reverse="mixture",
        )

    @classmethod
    def evo(cls) -> TrainingRegime:
        """Evo: AR, blocks and whole sequence, a quarter of diagonal states, difficulty head.

        Block sizes ``(1, 1, 2, 4, 8, 0)`` (AR twice as often) at 4 to 64 steps per block (drawn
        per batch; a network trained on one grid's times alone scored worse with more steps), the
        exact AR bound on every batch (``ar_weight = 1``), each term trained as the log of its
        value (``normalize``), the block and whole-sequence bounds weighted 0.5 and the diagonal
        states' bound (whose one-draw gradient is mostly noise) 0.025, and the mixture reverse
        step (theory §3e, §4b; at 400 equal steps this put Evo's AR bound within 1.5% of the AR
        model's, with block and synchronous bounds far better than the plain sum with the
        Gaussian-mean step: see docs/results.md, "Evo's balance").
        """
        return cls(
            block_sizes=(1, 1, 2, 4, 8, 0),
            steps_per_block=16,
            step_choices=(4, 8, 16, 32, 64),
            single_stream_fraction=0.25,
            difficulty_weight=0.1,
            ar_weight=1.0,
            bound_weights=EVO_BOUND_WEIGHTS,
            normalize=True,
            reverse="mixture",
        )

    # ------------------------------------------------------------------------------ the draws
    @property
    def grid_t_min(self) -> float:
        """Smallest positive time given to single-stream (non-block) grids."""
        return self.t_min or 1.0 / max(2, self.steps_per_block)

    def block_bound(self, block_size: int, length: int) -> DrawnBound:
        """The bound of ``block_size`` (``0`` = whole sequence) as this regime trains it.

        Args:
            block_size: Tokens per block, ``>= 0``.
            length: Sequence length ``L``.
        """
        return block_bound(block_size, self.steps_per_block, length)

    def draw(self, length: int, generator: torch.Generator) -> DrawnBound:
        """Draw the bound one batch trains on (see the module docstring).

        Args:
            length: Sequence length ``L``.
            generator: Random generator of the draw (two draws: kind, then size or width; a
                third, the steps per block, with ``step_choices``).

        Returns:
            The drawn :class:`DrawnBound`.
        """
        u = float(torch.rand((), generator=generator))
        if u < self.single_stream_fraction:
            i = int(torch.randint(len(self.diagonal_widths), (1,), generator=generator))
            policy = Diagonal(width=self.diagonal_widths[i])
            return DrawnBound(policy, length * self.diagonal_steps, "diagonal")
        i = int(torch.randint(len(self.block_sizes), (1,), generator=generator))
        m = self.steps_per_block
        if self.step_choices:
            k = int(torch.randint(len(self.step_choices), (1,), generator=generator))
            m = self.step_choices[k]
        return block_bound(self.block_sizes[i], m, length)

    def bound_rows(self, batch: int) -> int:
        """Rows of a batch that estimate a drawn non-AR bound (the first ones).

        Args:
            batch: Rows ``B`` of the batch.

        Returns:
            ``max(1, round(bound_row_fraction * B))``, at most ``B``.
        """
        return max(1, min(batch, round(self.bound_row_fraction * batch)))

    def window(self, length: int, block_size: int) -> int | None:
        """Noisy-stream window (tokens per row) of a ``block(block_size)`` bound, or ``None``.

        Args:
            length: Sequence length ``L``.
            block_size: Tokens per block (``0`` = the whole sequence).

        Returns:
            ``round(bound_window * L)`` when it is below ``L``, a multiple of ``block_size``
            and a divisor of ``L``; ``None`` (every position) otherwise.
        """
        w = round(self.bound_window * length)
        fits = 0 < block_size < w < length and w % block_size == 0 and length % w == 0
        return w if fits else None

    def ar_only(self, step: int, max_lr_steps: int) -> bool:
        """Whether optimizer step ``step`` lies in the :attr:`ar_tail` (trains AR alone).

        Args:
            step: Optimizer step.
            max_lr_steps: Length of the model's learning-rate decay (``0``: no tail).
        """
        return self.ar_tail > 0 and max_lr_steps > 0 and step >= (1 - self.ar_tail) * max_lr_steps

    def weight(self, label: str) -> float:
        """Weight of the drawn bound ``label`` in the loss (:attr:`bound_weights`, else 1)."""
        return self.bound_weights.get(label, 1.0)

    def trains_ar(self) -> bool:
        """Whether the AR bound is part of the loss (drawn as ``block1``, or ``ar_weight > 0``)."""
        drawn = self.single_stream_fraction < 1.0 and 1 in self.block_sizes
        return drawn or self.ar_weight > 0

    def probabilities(self) -> dict[str, float]:
        """Probability of each log label per batch (``block<B>`` and ``diagonal``)."""
        out: dict[str, float] = {}
        share = (1.0 - self.single_stream_fraction) / max(1, len(self.block_sizes))
        for b in self.block_sizes:
            out[f"block{b}"] = out.get(f"block{b}", 0.0) + share
        if self.single_stream_fraction > 0:
            out["diagonal"] = self.single_stream_fraction
        return {k: v for k, v in out.items() if v > 0}

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, numbers, strings) for checkpoints: ``TrainingRegime(**d)`` again."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def block_bound(block_size: int, steps_per_block: int, length: int) -> DrawnBound:
    """``block(block_size)`` over ``length`` tokens with ``steps_per_block`` steps per block.

    Single tokens always jump ``1 -> 0`` in one step (AR); a size of ``0`` or ``>= length`` is
    one block over the whole sequence (``synchronous``).

    Args:
        block_size: Tokens per block, ``>= 0`` (``0`` = whole sequence).
        steps_per_block: Steps ``m >= 1`` per block of more than one token.
        length: Sequence length ``L``.

    Returns:
        The bound, labelled ``block<block_size>``; ``steps = n_blocks * m``.
    """
    size = length if block_size == 0 else block_size
    if size < 1 or steps_per_block < 1 or length < 1:
        raise ConfigError(
            f"need block_size >= 0, steps_per_block >= 1 and length >= 1, got "
            f"{block_size}, {steps_per_block}, {length}"
        )
    m = 1 if size == 1 else steps_per_block
    policy = Synchronous() if size >= length else Block(size=size)
    return DrawnBound(policy, -(-length // min(size, length)) * m, f"block{block_size}")


_LABEL = re.compile(r"block\d+|diagonal")


def _weights(weights: Any) -> dict[str, float]:
    if not isinstance(weights, dict):
        raise ConfigError(f"bound_weights must map labels to weights, got {weights!r}")
    out = {}
    for label, w in weights.items():
        if not isinstance(label, str) or not _LABEL.fullmatch(label):
            raise ConfigError(
                f"unknown bound label {label!r} in bound_weights; labels are block<B> "
                "(block1 = AR, block0 = whole sequence) and diagonal"
            )
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ConfigError(f"bound_weights[{label!r}] must be a number >= 0, got {w!r}")
        out[label] = float(w)
    return out


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ConfigError(f"{name} must hold integers, got {value!r}")
    return int(value)
