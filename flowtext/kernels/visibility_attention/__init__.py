"""Fused attention under progression-time visibility (theory §2), forward and backward, in Triton.

The mask of :func:`flowtext.attention.visibility_mask` is never materialised: tiles compute it in
registers from the per-token vectors ``(t, o)``. Before that, every (query tile, key tile) pair is
classified from ``O(L / 16)`` per-group summaries as *invisible* (never loaded), *fully visible*
(the inner loop runs with no mask predicate and no bounds checks) or *partial* (pays the
predicate).

Modules, by role:

* ``_tiles``: host summaries (:class:`TileSummaries`), the pairwise rule and the tile
  classification used by every kernel;
* ``_forward``: the forward kernel (online softmax in base 2, ``log2(e)`` folded into the scale);
* ``_backward``: the FlashAttention-2 backward split (``delta``, a ``dK, dV`` pass over key tiles,
  a ``dQ`` pass over query tiles), with the same classification;
* ``_launch``: :class:`TileConfig`, the autotuning configurations and the host launchers;
* ``_api``: input checks, :func:`tile_summaries`, :class:`VisibilityAttentionFunction` and
  :func:`visibility_attention`.

Supported:

* ``q: [B, H, Lq, D]``, ``k, v: [B, H, Lk, D]`` with ``1 <= Lq <= Lk`` (queries are the *last*
  ``Lq`` keys, so ``Lq < Lk`` is the KV-cache decoding call), any lengths (not only powers of two),
  any batch and head count, any strides (no copies are made; a unit stride on ``D`` is fastest).
* ``D <= 128`` (32, 64 and 128 are the tuned sizes; other sizes are padded to the next power of
  two inside the kernel, so they work at the cost of the padded size).
* float16, bfloat16 and float32 (the same dtype for ``q``, ``k``, ``v``; float32 matmuls use IEEE
  precision, i.e. no TF32, so float32 is for checking rather than speed). Accumulation is float32.
* Times ``[B, L]`` of any floating dtype in ``[0, 1]``; orders ``[B, L]`` of any integer dtype
  within the int32 range (they are converted to int32; :data:`~flowtext.attention.LIVE` fits).
* Hardware: CUDA GPUs supported by Triton (written for sm80+, tuned for Hopper), and CPU through
  the Triton interpreter (``TRITON_INTERPRET=1`` set before this package is imported; slow, for
  tests only).

Measured on one NVIDIA H200 (torch 2.11, Triton 3.6, bf16, ``L = 4096, D = 128``, batch 4,
16 heads; ``docs/attention.md`` has the tables). This version, 2026-11-29: forward+backward at
257 TFLOP/s on the two-stream layout (3.24x SDPA with a dense mask, 0.85x FlexAttention with a
reused BlockMask), 123 TFLOP/s on the Evo single stream (0.71x SDPA), and the dense forward at
461 TFLOP/s (0.72x SDPA FlashAttention). The previous version (no fully-visible fast path),
2026-11-27: 143-146 TFLOP/s two-stream, 121 Evo, dense forward 168-178 TFLOP/s.

Autotuning is keyed on the (power-of-two bucketed) lengths, the padded head dim, the dtypes and
the visibility pattern (:attr:`TileSummaries.pattern`). ``single_config=True`` (or the
environment variable ``FLOWTEXT_TRITON_SINGLE_CONFIG=1``, or running under the interpreter) uses
one fixed :class:`TileConfig` instead, which tests use so that autotuning cannot hide a bug in one
configuration and cannot stall a test run on a cold cache.
"""

from __future__ import annotations

from flowtext.kernels.visibility_attention._api import (
    VisibilityAttentionFunction,
    tile_summaries,
    visibility_attention,
)
from flowtext.kernels.visibility_attention._launch import TileConfig
from flowtext.kernels.visibility_attention._tiles import TileSummaries

__all__ = [
    "TileConfig",
    "TileSummaries",
    "VisibilityAttentionFunction",
    "tile_summaries",
    "visibility_attention",
]
