"""Decoding: generate text by following any progression-time policy through the shared flow.

* :func:`generate`: batched decoding under any registered policy (static ones via their grid, or
  :class:`Adaptive`), ODE (``euler``, ``heun``, ``midpoint``, ``rk4``) or ``ancestral`` steps,
  temperature / top-p / greedy commits, stop at EOS, infilling, exact KV cache.
* :class:`Adaptive`: the confidence-driven (Evo) policy, registered as ``adaptive``.
* :func:`plot_maturity`, :func:`plot_policy_comparison`: maturity heatmaps (tokens x steps).

Example:
    >>> import torch
    >>> from flowtext.nn import FlowTransformer, FlowTransformerConfig
    >>> from flowtext.decoding import generate
    >>> net = FlowTransformer(FlowTransformerConfig(vocab_size=16, max_len=16, d_model=32,
    ...     n_layers=1, n_heads=2, d_embed=8, cond_dim=16, cond_rank=4))
    >>> out = generate(net, "cosine", prompt=[[1, 2, 3]], length=4, policy="autoregressive",
    ...                greedy=True)
    >>> len(out.tokens[0]), out.stats.nfe
    (4, 4)
"""

from __future__ import annotations

from flowtext.decoding._engine import DecodeStats, GenerationResult, generate, sample_tokens
from flowtext.decoding.adaptive import Adaptive

__all__ = [
    "Adaptive",
    "DecodeStats",
    "GenerationResult",
    "generate",
    "plot_maturity",
    "plot_policy_comparison",
    "sample_main",
    "sample_tokens",
]


def __getattr__(name: str):
    if name in ("plot_maturity", "plot_policy_comparison"):
        from flowtext.decoding import plots

        return getattr(plots, name)
    if name == "sample_main":
        from flowtext.decoding.cli import sample_main

        return sample_main
    raise AttributeError(f"module 'flowtext.decoding' has no attribute {name!r}")
