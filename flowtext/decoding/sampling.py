"""Randomness of decoding: per-row generators, and the commit rule (temperature, top-p, greedy)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from flowtext.errors import ConfigError

__all__ = ["Generators", "RowNoise", "sample_tokens", "token_probs"]

Generators = torch.Generator | Sequence[torch.Generator] | None
"""One generator for the whole batch, one per row, or ``None`` (the global generator)."""


class RowNoise:
    """Random draws from one generator (batch-wide) or one generator per row (batch-invariant).

    With one generator per row, the draws for row ``b`` come from generator ``b`` only, in the
    row-major order of the items asked for, so a row's sample does not depend on the rest of the
    batch. Implements :class:`~flowtext.solvers.NoiseSource` (zeros outside ``where``).

    Args:
        generator: A ``torch.Generator``, a sequence of ``batch`` of them, or ``None``.
        batch: Number of rows ``B``.
        device: Device of the returned tensors.

    Raises:
        ConfigError: A sequence whose length is not ``batch`` or that holds other objects.
    """

    def __init__(self, generator: Generators, batch: int, device: torch.device) -> None:
        self.per_row: list[torch.Generator] | None = None
        self.gen: torch.Generator | None = None
        if generator is None or isinstance(generator, torch.Generator):
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
                draw = torch.multinomial(probs[sel].to(g.device), 1, generator=g)
                out[sel] = draw.squeeze(1).to(self.device)
        return out

    def normal(self, like: Tensor, where: Tensor) -> Tensor:
        """Standard normal noise ``[B, n, d]`` at the tokens ``where [B, n]``, zeros elsewhere."""
        out = torch.zeros_like(like)
        out[where] = self.randn(where.nonzero()[:, 0], like.shape[-1], like.dtype)
        return out

    def categorical(self, probs: Tensor, where: Tensor) -> Tensor:
        """Ids ``[B, n]`` drawn from ``probs [B, n, V]`` at ``where [B, n]``, 0 elsewhere."""
        out = torch.zeros(where.shape, dtype=torch.long, device=self.device)
        out[where] = self.multinomial(probs[where], where.nonzero()[:, 0])
        return out


def token_probs(logits: Tensor, temperature: float, top_p: float) -> Tensor:
    """``softmax(logits / temperature)`` restricted to the smallest top-p nucleus, renormalized.

    Args:
        logits: ``[n, V]``.
        temperature: ``> 0``.
        top_p: Nucleus mass in ``(0, 1]``.

    Returns:
        Probabilities ``[n, V]``.
    """
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = torch.sort(probs, dim=-1, descending=True)
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass strictly before each entry
        keep_sorted = before < top_p
        keep = torch.zeros_like(keep_sorted).scatter(-1, idx, keep_sorted)
        probs = torch.where(keep, probs, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample_tokens(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw one token per row of ``logits``: the commit rule of :func:`~flowtext.decoding.generate`.

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
    rng = RowNoise(generator, 1, logits.device)
    return rng.multinomial(token_probs(logits, temperature, top_p), torch.zeros(len(logits)))
