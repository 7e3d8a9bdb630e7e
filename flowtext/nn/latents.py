"""The latent table shared by every flowtext backbone: ``e(v)``, ``embed``, ``x0_hat``, prior.

Both :class:`~flowtext.nn.FlowTransformer` and the Hugging Face backbone keep a parameter
``embedding [V, d_embed]`` and a ``config`` with ``vocab_size`` and ``d_embed``; the latents are
its rows at a fixed norm ``sqrt(d_embed)`` (unit RMS), so they cannot collapse.

With ``config.output_prior`` a backbone also keeps ``prior_logits [V]`` (a learned unigram law
``pi = softmax(prior_logits)``) and adds to its readout the exact Bayes posterior logits of each
token under that law (docs/theory.md §3f): the network learns a residual over the posterior.
The prior starts uniform; :meth:`LatentTable.init_prior_from_counts` starts it at the data's
unigram law (what a :class:`~flowtext.lm.FlowLM` fit from scratch does).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowtext.errors import ConfigError, DataError, ShapeError
from flowtext.schedules import NoiseSchedule

__all__ = ["PRIOR_MAX_LOG_SNR", "LatentTable", "bind_prior_schedule", "prior_from_counts"]

PRIOR_MAX_LOG_SNR = 10.0
"""Cap on the log-SNR at which the output prior reads a state (its coefficient is finite at
``t = 0``); above it the posterior is one-hot to working precision for unit-RMS embeddings."""


def bind_prior_schedule(net: Any, schedule: NoiseSchedule) -> None:
    """Make ``net``'s output prior read states of ``schedule`` (no-op for other networks).

    The objectives and the decoder call it with the schedule whose states they build, so what
    is scored and what is sampled use the same prior.
    """
    if isinstance(net, LatentTable):
        net.prior_schedule = schedule


def prior_from_counts(net: Any, counts: Tensor) -> bool:
    """Start ``net``'s output prior at the counts' smoothed unigram law, if it has one.

    See :meth:`LatentTable.init_prior_from_counts`; other networks, and backbones with the
    prior off, are left as they are.

    Args:
        net: A backbone.
        counts: Token counts ``[V]``.

    Returns:
        Whether a prior was set.
    """
    if not isinstance(net, LatentTable) or getattr(net, "prior_logits", None) is None:
        return False
    net.init_prior_from_counts(counts)
    return True


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__


def _is_int(x: Tensor) -> bool:
    return not torch.is_floating_point(x) and not torch.is_complex(x) and x.dtype != torch.bool


class LatentTable:
    """Mixin: the unit-RMS latent table of a backbone and the two maps through it."""

    embedding: nn.Parameter
    config: Any
    prior_schedule: NoiseSchedule | None = None
    """The schedule whose states the output prior reads (:func:`bind_prior_schedule`)."""

    def _init_prior(self) -> None:
        """Create ``prior_logits [V]`` (zeros: uniform) when ``config.output_prior`` is set."""
        if getattr(self.config, "output_prior", False):
            self.prior_logits = nn.Parameter(torch.zeros(self.config.vocab_size))

    def init_prior_from_counts(self, counts: Tensor) -> None:
        """Set ``prior_logits`` to the log of add-one-smoothed unigram frequencies.

        ``prior_logits_v = log((n_v + 1) / (N + V))`` with ``N = sum_v n_v``: ``pi`` is then the
        smoothed unigram law of the counts (every token keeps a positive probability). What
        :class:`~flowtext.lm.FlowLM` does at the start of a fit from scratch (``prior_init``).

        Args:
            counts: Token counts ``[V]`` (non-negative).

        Raises:
            ConfigError: The output prior is off.
            ShapeError: ``counts`` is not ``[vocab_size]``.
            DataError: A negative or non-finite count.
        """
        logits = getattr(self, "prior_logits", None)
        if logits is None:
            raise ConfigError("the output prior is off: set output_prior to give it counts")
        v = self.config.vocab_size
        if not isinstance(counts, Tensor) or tuple(counts.shape) != (v,):
            raise ShapeError(f"counts must be [vocab_size={v}], got {_describe(counts)}")
        counts = counts.detach().to(torch.float64)
        if not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()):
            raise DataError("token counts must be finite and non-negative")
        with torch.no_grad():
            logits.copy_(torch.log((counts + 1) / (counts.sum() + v)))

    def log_prior(self) -> Tensor | None:
        """``log pi`` ``[V]`` of the output prior, or ``None`` when it is off."""
        logits = getattr(self, "prior_logits", None)
        if logits is None:
            return None
        return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), 0)

    def prior(self, z: Tensor, t: Tensor) -> Tensor | None:
        """The output prior's logits ``[B, L, V]`` for tokens at states ``(z, t)``, or ``None``.

        For ``0 < t < 1`` the exact Bayes posterior logits of a token with latent
        ``z = alpha e_x + sigma eps`` and ``x ~ pi``, up to a constant per token:
        ``log pi_v + c <z, e_v> - c alpha |e_v|^2 / 2`` with ``c = alpha / sigma^2``, the log-SNR
        capped at :data:`PRIOR_MAX_LOG_SNR` (``c = alpha / max(sigma^2, alpha^2 e^-cap)``). For
        ``t = 1`` (``z`` is not read) and ``t = 0`` (a committed token's readout predicts the
        next token, theory §3d) it is ``log pi``: the law of a token no state informs.

        Args:
            z: Latents ``[B, L, d_embed]`` (rows with ``t`` in ``{0, 1}`` are not read).
            t: Times ``[B, L]``.

        Raises:
            ConfigError: The prior is on but no schedule is bound.
        """
        log_pi = self.log_prior()
        if log_pi is None:
            return None
        if self.prior_schedule is None:
            raise ConfigError(
                "output_prior needs the schedule of the states: call "
                "flowtext.nn.latents.bind_prior_schedule(net, schedule) (the objectives and the "
                "decoder do)"
            )
        dtype = torch.promote_types(z.dtype, torch.float32)
        t = t.to(dtype)
        a, s = self.prior_schedule.alpha(t), self.prior_schedule.sigma(t)
        c = a / torch.maximum(s * s, a * a * math.exp(-PRIOR_MAX_LOG_SNR))
        c = torch.where((t > 0) & (t < 1), c, 0.0)[..., None]
        z = torch.where(c > 0, z.to(dtype), 0.0)  # no NaN from rows that are not read
        table = self.embedding_table().to(dtype)
        sq = table.pow(2).sum(-1)
        return log_pi.to(dtype) + c * (z @ table.T) - (0.5 * c * a[..., None]) * sq

    def embedding_table(self) -> Tensor:
        """All embeddings ``e(v)``, ``[V, d_embed]``, each of norm ``sqrt(d_embed)``."""
        return math.sqrt(self.config.d_embed) * F.normalize(self.embedding, dim=-1)

    def embed(self, tokens: Tensor) -> Tensor:
        """Embeddings ``e(x)`` of token ids, at fixed norm ``sqrt(d_embed)`` (unit RMS).

        Args:
            tokens: Token ids ``[B, L]`` (integer) in ``[0, vocab_size)``.

        Returns:
            ``[B, L, d_embed]``.

        Raises:
            ShapeError: ``tokens`` is not an integer tensor.
            DataError: An id lies outside ``[0, vocab_size)``.
        """
        if not isinstance(tokens, Tensor) or not _is_int(tokens):
            raise ShapeError(f"tokens must be an integer tensor [B, L], got {_describe(tokens)}")
        v = self.config.vocab_size
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= v):
            raise DataError(
                f"token ids must lie in [0, vocab_size={v}); got range "
                f"[{tokens.min().item()}, {tokens.max().item()}]"
            )
        return F.embedding(tokens, self.embedding_table())

    def x0_hat(self, logits: Tensor) -> Tensor:
        """Expected clean embedding ``sum_v softmax(logits)_v e(v)`` (theory §1).

        Args:
            logits: ``[..., V]``.

        Returns:
            ``[..., d_embed]``, a convex combination of the embeddings (norm ``<= sqrt(d_embed)``).
        """
        if not isinstance(logits, Tensor) or logits.shape[-1:] != (self.config.vocab_size,):
            raise ShapeError(
                f"logits must end in vocab_size={self.config.vocab_size}, got {_describe(logits)}"
            )
        table = self.embedding_table()
        return torch.softmax(logits, dim=-1).to(table.dtype) @ table
