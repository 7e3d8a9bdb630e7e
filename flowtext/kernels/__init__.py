"""Triton kernels. Importing this package imports Triton.

:func:`visibility_attention` is the fused attention of theory §2 (see
:mod:`flowtext.kernels.visibility_attention` for supported shapes, dtypes and hardware). Most code
should call :func:`flowtext.attention.attention`, which picks this kernel on CUDA. Build
:func:`tile_summaries` once per forward pass to share the token-vector work across layers.
"""

from __future__ import annotations

from flowtext.kernels.visibility_attention import (
    TileConfig,
    TileSummaries,
    VisibilityAttentionFunction,
    tile_summaries,
    visibility_attention,
)

__all__ = [
    "TileConfig",
    "TileSummaries",
    "VisibilityAttentionFunction",
    "tile_summaries",
    "visibility_attention",
]
