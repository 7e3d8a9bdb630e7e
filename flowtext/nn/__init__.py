"""The time-conditioned Transformer backbone: one denoiser for every mixture of token times.

:class:`FlowTransformer` maps latents ``z [B, L, d_embed]``, per-token times ``t [B, L]`` and
orders ``o [B, L]`` to clean-token logits and a per-token difficulty (theory §1-§3). Committed
tokens can be cached exactly (:class:`KVCache`, :meth:`FlowTransformer.commit`) for decoding.
:class:`FlowNetwork` is the interface every backbone offers (``FlowTransformer`` and
:class:`~flowtext.nn.hf_backbone.PretrainedBackbone` have it).
"""

from __future__ import annotations

from flowtext.nn.cache import KVCache
from flowtext.nn.config import FlowTransformerConfig
from flowtext.nn.interface import FlowNetwork, FlowNetworkConfig
from flowtext.nn.transformer import FlowOutput, FlowTransformer

__all__ = [
    "FlowNetwork",
    "FlowNetworkConfig",
    "FlowOutput",
    "FlowTransformer",
    "FlowTransformerConfig",
    "KVCache",
]
