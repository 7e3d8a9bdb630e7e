"""Attention under progression-time visibility (theory §2).

One entry point, :func:`attention`, takes per-token times and orders and dispatches to a backend:
``"sdpa"`` (dense mask + PyTorch SDPA, the reference) or ``"triton"`` (the fused kernel of
:mod:`flowtext.kernels`). ``"auto"`` picks the kernel on CUDA and SDPA elsewhere.
"""

from __future__ import annotations

from typing import Literal, get_args

from flowtext.attention.reference import (
    all_visible,
    sdpa_attention,
    two_stream_layout,
    visibility_mask,
)
from flowtext.errors import ConfigError
from flowtext.visibility import LIVE, check_times

__all__ = [
    "BACKENDS",
    "LIVE",
    "Backend",
    "all_visible",
    "attention",
    "check_times",
    "sdpa_attention",
    "two_stream_layout",
    "visibility_mask",
]

Backend = Literal["auto", "sdpa", "triton"]
"""The attention backends: the one list every other place (config, tests) reads."""
BACKENDS: tuple[str, ...] = get_args(Backend)


def attention(q, k, v, t_q, o_q, t_k, o_k, *, backend: str = "auto", summaries=None):
    """Visibility-masked attention, ``[B, H, Lq, D]`` from queries/keys/values and token vectors.

    Args:
        q: Queries ``[B, H, Lq, D]``.
        k: Keys ``[B, H, Lk, D]``.
        v: Values ``[B, H, Lk, D]``.
        t_q: Query times ``[B, Lq]`` in ``[0, 1]``.
        o_q: Query orders ``[B, Lq]`` (commit order, or group for live tokens).
        t_k: Key times ``[B, Lk]``.
        o_k: Key orders ``[B, Lk]``.
        backend: ``"auto"``, ``"sdpa"`` or ``"triton"``.
        summaries: Optional :func:`flowtext.kernels.tile_summaries` of these token vectors,
            reused by the kernel across layers (ignored by SDPA).

    Returns:
        Attention output ``[B, H, Lq, D]``.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown attention backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend == "triton" or (backend == "auto" and q.is_cuda):
        from flowtext.kernels import visibility_attention  # imports Triton only when used

        return visibility_attention(q, k, v, t_q, o_q, t_k, o_k, summaries=summaries)
    return sdpa_attention(q, k, v, t_q, o_q, t_k, o_k)
