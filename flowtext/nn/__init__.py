"""The time-conditioned Transformer backbone: one denoiser for every mixture of token times.

:class:`FlowTransformer` maps latents ``z [B, L, d_embed]``, per-token times ``t [B, L]`` and
orders ``o [B, L]`` to clean-token logits and a per-token difficulty (theory §1-§3). Committed
tokens can be cached exactly (:class:`KVCache`, :meth:`FlowTransformer.commit`) for decoding.
"""

from __future__ import annotations

from flowtext.nn.cache import KVCache
from flowtext.nn.config import FlowTransformerConfig
from flowtext.nn.transformer import FlowOutput, FlowTransformer

__all__ = ["FlowOutput", "FlowTransformer", "FlowTransformerConfig", "KVCache"]
