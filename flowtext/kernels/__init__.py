"""Triton kernels. Importing this package imports Triton.

:func:`visibility_attention` is the fused attention of theory §2 (see
:mod:`flowtext.kernels.visibility_attention` for supported shapes, dtypes and hardware). Most code
should call :func:`flowtext.attention.attention`, which picks this kernel on CUDA. Build
:func:`tile_summaries` once per forward pass to share the token-vector work across layers.
"""

from __future__ import annotations

# the package's public names are the kernel's, listed once in its ``__all__``
from flowtext.kernels.visibility_attention import *  # noqa: F403
from flowtext.kernels.visibility_attention import __all__ as __all__
