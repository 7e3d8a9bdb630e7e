"""Result types of decoding: :class:`GenerationResult` and its :class:`DecodeStats`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["DecodeStats", "GenerationResult"]


@dataclass(frozen=True)
class DecodeStats:
    """Cost and speed of one :func:`~flowtext.decoding.generate` call.

    Attributes:
        nfe: Network evaluations of live tokens (one forward pass each, whatever its width;
            two for a self-conditioned network, whose denoiser runs two passes).
        passes: All forward passes, ``nfe`` plus commit-only passes (0 for a network with
            :meth:`~flowtext.nn.FlowTransformer.commit_forward`, whose commits are fused into
            evaluations).
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
    """Output of :func:`~flowtext.decoding.generate`.

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
