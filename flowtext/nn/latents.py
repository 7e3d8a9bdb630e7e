"""The latent table shared by every flowtext backbone: ``e(v)``, ``embed`` and ``x0_hat``.

Both :class:`~flowtext.nn.FlowTransformer` and the Hugging Face backbone keep a parameter
``embedding [V, d_embed]`` and a ``config`` with ``vocab_size`` and ``d_embed``; the latents are
its rows at a fixed norm ``sqrt(d_embed)`` (unit RMS), so they cannot collapse.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowtext.errors import DataError, ShapeError

__all__ = ["LatentTable"]


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
