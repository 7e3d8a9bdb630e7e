"""Decoding: generate text by following any progression-time policy through the shared flow.

* :func:`generate`: batched decoding under any registered policy (static ones via their grid, or
  :class:`~flowtext.policies.Adaptive`), ODE (``euler``, ``heun``, ``midpoint``, ``rk4``) or
  ``ancestral`` steps, temperature / top-p / greedy commits, stop at EOS, infilling, exact KV
  cache.
* :func:`speculative_generate` (``generate(policy="speculative")``): the model's own AR
  distribution, with the noisy stream drafting the next tokens and the AR readout verifying them
  in the same pass (:mod:`flowtext.decoding.speculative`).
* :class:`DecodeState` and :func:`step`: the loop as a state and a step
  (:mod:`flowtext.decoding.state`), for callers that drive or inspect decoding step by step.
* :func:`plot_maturity`, :func:`plot_policy_comparison`: maturity heatmaps (tokens x steps).

Modules, by role: :mod:`~flowtext.decoding.inputs` (checked settings, prompts, constraints),
:mod:`~flowtext.decoding.sampling` (per-row randomness, the commit rule),
:mod:`~flowtext.decoding.state` (state and step), :mod:`~flowtext.decoding.loop` (:func:`generate`),
:mod:`~flowtext.decoding.speculative` (drafts and verification),
:mod:`~flowtext.decoding.result` (result types), :mod:`~flowtext.decoding.plots`.

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

from flowtext.decoding.loop import decode, generate
from flowtext.decoding.result import DecodeStats, GenerationResult
from flowtext.decoding.sampling import sample_tokens
from flowtext.decoding.speculative import speculative_generate
from flowtext.decoding.state import Decoder, DecodeState, step
from flowtext.policies import Adaptive

__all__ = [
    "Adaptive",
    "DecodeState",
    "DecodeStats",
    "Decoder",
    "GenerationResult",
    "decode",
    "generate",
    "plot_maturity",
    "plot_policy_comparison",
    "sample_tokens",
    "speculative_generate",
    "step",
]


def __getattr__(name: str):
    if name in ("plot_maturity", "plot_policy_comparison"):  # matplotlib only when plotting
        from flowtext.decoding import plots

        return getattr(plots, name)
    raise AttributeError(f"module 'flowtext.decoding' has no attribute {name!r}")
