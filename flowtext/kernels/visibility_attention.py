"""Fused attention under progression-time visibility (theory §2), forward and backward, in Triton.

The mask of :func:`flowtext.attention.visibility_mask` is never materialised: every tile computes it
in registers from the per-token vectors ``(t, o)``, and tiles in which no pair can be visible are
skipped using ``O(L / 16)`` per-block summaries built on the host with a few cheap torch ops.

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
* Hardware: CUDA GPUs supported by Triton (written for sm80+/H100), and CPU through the Triton
  interpreter (``TRITON_INTERPRET=1`` set before this module is imported; slow, for tests only).
  Measured on: no GPU was available when this kernel was written; see ``docs/attention.md``.

Layering: private ``@triton.jit`` kernels → host wrappers (:func:`_forward`, :func:`_backward`) →
:class:`VisibilityAttentionFunction` (``torch.autograd.Function``) → :func:`visibility_attention`.

Autotuning is keyed on the (power-of-two bucketed) lengths, the padded head dim and the dtypes.
``single_config=True`` (or the environment variable ``FLOWTEXT_TRITON_SINGLE_CONFIG=1``, or
running under the interpreter) uses one fixed :class:`TileConfig` instead, which tests use so that
autotuning cannot hide a bug in one configuration.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from flowtext.errors import ConfigError, ShapeError, TimeRangeError

__all__ = ["TileConfig", "VisibilityAttentionFunction", "visibility_attention"]

_G = 16
"""Granularity (tokens) of the per-block summaries; every tile size is a multiple of it."""
_BIG = 2**31 - 1
"""Sentinel of the summaries: an empty minimum is ``_BIG``, an empty maximum is ``-_BIG``."""
_LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_D = 128


# --------------------------------------------------------------------------------------------
# Triton kernels (private)
# --------------------------------------------------------------------------------------------


@triton.jit
def _max_op(a, b):
    return tl.maximum(a, b)


@triton.jit
def _min_op(a, b):
    return tl.minimum(a, b)


@triton.jit
def _add_op(a, b):
    return a + b


# Reductions call ``tl.reduce`` with the combine functions of Triton's standard library (what
# ``tl.max`` / ``tl.min`` / ``tl.sum`` do) instead of calling those ``@jit`` wrappers: they are
# decorated when Triton is first imported, so if Triton was imported before ``TRITON_INTERPRET=1``
# was set (and this module after), the interpreter cannot call them. The interpreter recognises
# these combine functions by identity and reduces with numpy; our own are the fallback.
_MAX_COMBINE = getattr(tl.standard, "_elementwise_max", _max_op)
_MIN_COMBINE = getattr(tl.standard, "_elementwise_min", _min_op)
_SUM_COMBINE = getattr(tl.standard, "_sum_combine", _add_op)


@triton.jit
def _reduce_max(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _MAX_COMBINE)


@triton.jit
def _reduce_min(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _MIN_COMBINE)


@triton.jit
def _reduce_sum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _SUM_COMBINE)


@triton.jit
def _visible(tq, oq, iq, q_ok, tk, ok, ik, k_ok):
    """Visibility of a ``[M, N]`` tile from query vectors ``[M]`` and key vectors ``[N]``."""
    q_live = tq[:, None] > 0.0
    same = ok[None, :] == oq[:, None]
    committed_key = (tk[None, :] == 0.0) & ((ok[None, :] < oq[:, None]) | (same & (~q_live)))
    live_key = q_live & (tk[None, :] > 0.0) & (tk[None, :] < 1.0) & same
    self_key = iq[:, None] == ik[None, :]
    return (committed_key | live_key | self_key) & q_ok[:, None] & k_ok[None, :]


@triton.jit
def _visible_t(tq, oq, iq, q_ok, tk, ok, ik, k_ok):
    """The transpose of :func:`_visible`, ``[N, M]`` (rows are keys), built directly."""
    q_live = tq[None, :] > 0.0
    same = ok[:, None] == oq[None, :]
    committed_key = (tk[:, None] == 0.0) & ((ok[:, None] < oq[None, :]) | (same & (~q_live)))
    live_key = q_live & (tk[:, None] > 0.0) & (tk[:, None] < 1.0) & same
    self_key = iq[None, :] == ik[:, None]
    return (committed_key | live_key | self_key) & q_ok[None, :] & k_ok[:, None]


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` accumulated in float32 (``UPCAST`` works around the interpreter's bf16 matmul)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _q_summary(QSUM, b, NGQ, start_m, BLOCK_M: tl.constexpr, G: tl.constexpr):
    """Reduce the query summaries of one query block: (max committed order, live min, live max)."""
    base = QSUM + b * 3 * NGQ
    c_max = -2147483647
    l_min = 2147483647
    l_max = -2147483647
    for j in tl.static_range(BLOCK_M // G):
        g = start_m // G + j
        ok = g < NGQ
        c_max = tl.maximum(c_max, tl.load(base + g, mask=ok, other=-2147483647))
        l_min = tl.minimum(l_min, tl.load(base + NGQ + g, mask=ok, other=2147483647))
        l_max = tl.maximum(l_max, tl.load(base + 2 * NGQ + g, mask=ok, other=-2147483647))
    return c_max, l_min, l_max


@triton.jit
def _k_summary(KSUM, b, NGK, start_n, BLOCK_N: tl.constexpr, G: tl.constexpr):
    """Reduce the key summaries of one key block: (min committed order, informative min, max)."""
    base = KSUM + b * 3 * NGK
    c_min = 2147483647
    l_min = 2147483647
    l_max = -2147483647
    for j in tl.static_range(BLOCK_N // G):
        g = start_n // G + j
        ok = g < NGK
        c_min = tl.minimum(c_min, tl.load(base + g, mask=ok, other=2147483647))
        l_min = tl.minimum(l_min, tl.load(base + NGK + g, mask=ok, other=2147483647))
        l_max = tl.maximum(l_max, tl.load(base + 2 * NGK + g, mask=ok, other=-2147483647))
    return c_min, l_min, l_max


@triton.jit
def _tile_may_be_visible(
    qc_max, ql_min, ql_max, kc_min, kl_min, kl_max, start_m, start_n, LQ, LK,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Conservative test: can any (query, key) pair of the tile be visible?"""
    q_first = LK - LQ + start_m
    q_last = LK - LQ + tl.minimum(start_m + BLOCK_M, LQ) - 1
    k_last = tl.minimum(start_n + BLOCK_N, LK) - 1
    diagonal = (start_n <= q_last) & (k_last >= q_first)
    committed_by_committed = kc_min <= qc_max
    committed_by_live = kc_min < ql_max
    live_by_live = (ql_min <= kl_max) & (kl_min <= ql_max)
    return diagonal | committed_by_committed | committed_by_live | live_by_live


@triton.jit
def _k_block_runs(
    KSUM, b, NGK, qc_max, ql_min, ql_max, start_m, LQ, LK,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, G: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    """Key blocks that may be visible from one query block, as two runs of block indices.

    Returns ``(lo1, hi1, lo2, hi2)``: ``[lo1, hi1)`` is the first run of kept blocks and
    ``[lo2, hi2)`` everything kept after it (conservatively including any gaps). The main loops run
    over these ranges without branches, so Triton can software-pipeline their loads.
    """
    nb = (LK + BLOCK_N - 1) // BLOCK_N
    lo1 = nb
    hi2 = nb * 0
    for c in range(0, nb, CHUNK):
        blk = c + tl.arange(0, CHUNK)
        kc_min, kl_min, kl_max = _k_summary(KSUM, b, NGK, blk * BLOCK_N, BLOCK_N, G)
        keep = _tile_may_be_visible(
            qc_max, ql_min, ql_max, kc_min, kl_min, kl_max, start_m, blk * BLOCK_N, LQ, LK,
            BLOCK_M, BLOCK_N,
        ) & (blk < nb)  # fmt: skip
        lo1 = tl.minimum(lo1, _reduce_min(tl.where(keep, blk, nb), 0))
        hi2 = tl.maximum(hi2, _reduce_max(tl.where(keep, blk + 1, 0), 0))
    hi1 = hi2  # one run unless a gap is found below
    lo2 = nb
    if hi2 - lo1 > 1:  # a gap is possible: find the end of the first run and the next kept block
        for c in range(0, nb, CHUNK):
            blk = c + tl.arange(0, CHUNK)
            kc_min, kl_min, kl_max = _k_summary(KSUM, b, NGK, blk * BLOCK_N, BLOCK_N, G)
            keep = _tile_may_be_visible(
                qc_max, ql_min, ql_max, kc_min, kl_min, kl_max, start_m, blk * BLOCK_N, LQ, LK,
                BLOCK_M, BLOCK_N,
            )  # fmt: skip
            gap = (~keep) & (blk > lo1) & (blk < nb)
            hi1 = tl.minimum(hi1, _reduce_min(tl.where(gap, blk, nb), 0))
        for c in range(0, nb, CHUNK):
            blk = c + tl.arange(0, CHUNK)
            kc_min, kl_min, kl_max = _k_summary(KSUM, b, NGK, blk * BLOCK_N, BLOCK_N, G)
            keep = _tile_may_be_visible(
                qc_max, ql_min, ql_max, kc_min, kl_min, kl_max, start_m, blk * BLOCK_N, LQ, LK,
                BLOCK_M, BLOCK_N,
            )  # fmt: skip
            later = keep & (blk > hi1) & (blk < nb)
            lo2 = tl.minimum(lo2, _reduce_min(tl.where(later, blk, nb), 0))
    return lo1, hi1, lo2, hi2


@triton.jit
def _q_block_runs(
    QSUM, b, NGQ, kc_min, kl_min, kl_max, start_n, LQ, LK,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, G: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    """Query blocks that may see one key block, as two runs (see :func:`_k_block_runs`)."""
    nb = (LQ + BLOCK_M - 1) // BLOCK_M
    lo1 = nb
    hi2 = nb * 0
    for c in range(0, nb, CHUNK):
        blk = c + tl.arange(0, CHUNK)
        qc_max, ql_min, ql_max = _q_summary(QSUM, b, NGQ, blk * BLOCK_M, BLOCK_M, G)
        keep = _tile_may_be_visible(
            qc_max, ql_min, ql_max, kc_min, kl_min, kl_max, blk * BLOCK_M, start_n, LQ, LK,
            BLOCK_M, BLOCK_N,
        ) & (blk < nb)  # fmt: skip
        lo1 = tl.minimum(lo1, _reduce_min(tl.where(keep, blk, nb), 0))
        hi2 = tl.maximum(hi2, _reduce_max(tl.where(keep, blk + 1, 0), 0))
    hi1 = hi2  # one run unless a gap is found below
    lo2 = nb
    if hi2 - lo1 > 1:
        for c in range(0, nb, CHUNK):
            blk = c + tl.arange(0, CHUNK)
            qc_max, ql_min, ql_max = _q_summary(QSUM, b, NGQ, blk * BLOCK_M, BLOCK_M, G)
            keep = _tile_may_be_visible(
                qc_max, ql_min, ql_max, kc_min, kl_min, kl_max, blk * BLOCK_M, start_n, LQ, LK,
                BLOCK_M, BLOCK_N,
            )  # fmt: skip
            gap = (~keep) & (blk > lo1) & (blk < nb)
            hi1 = tl.minimum(hi1, _reduce_min(tl.where(gap, blk, nb), 0))
        for c in range(0, nb, CHUNK):
            blk = c + tl.arange(0, CHUNK)
            qc_max, ql_min, ql_max = _q_summary(QSUM, b, NGQ, blk * BLOCK_M, BLOCK_M, G)
            keep = _tile_may_be_visible(
                qc_max, ql_min, ql_max, kc_min, kl_min, kl_max, blk * BLOCK_M, start_n, LQ, LK,
                BLOCK_M, BLOCK_N,
            )  # fmt: skip
            later = keep & (blk > hi1) & (blk < nb)
            lo2 = tl.minimum(lo2, _reduce_min(tl.where(later, blk, nb), 0))
    return lo1, hi1, lo2, hi2


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, n_tiles, q, tq, oq, iq, q_ok, K, V, TK, OK, b, h,
    s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd, LK, offs_d, d_ok, qk_scale_log2, lo, hi,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Online-softmax accumulation over the key tiles starting in ``[lo, hi)`` (token indices)."""
    for start_n in range(lo, hi, BLOCK_N):
        n_tiles += 1
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ok = offs_n < LK
        kt = tl.load(
            K + b * s_kb + h * s_kh + offs_n[None, :] * s_kn + offs_d[:, None] * s_kd,
            mask=k_ok[None, :] & d_ok[:, None],
            other=0.0,
        )
        v = tl.load(
            V + b * s_vb + h * s_vh + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd,
            mask=k_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        tk = tl.load(TK + b * LK + offs_n, mask=k_ok, other=1.0)
        ok = tl.load(OK + b * LK + offs_n, mask=k_ok, other=0)
        vis = _visible(tq, oq, iq, q_ok, tk, ok, offs_n, k_ok)
        s = _dot(q, kt, PRECISION, UPCAST) * qk_scale_log2
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, _reduce_max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + _reduce_sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST)
        m_i = m_new
    return acc, l_i, m_i, n_tiles


@triton.jit
def _fwd_kernel(
    Q, K, V, OUT, LSE, TQ, OQ, TK, OK, QSUM, KSUM, COUNT,
    s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd, s_ob, s_oh, s_om, s_od,
    H, LQ, LK, NGQ, NGK, D, qk_scale_log2,
    LQ_KEY, LK_KEY,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, G: tl.constexpr,
    CHUNK: tl.constexpr, COUNT_TILES: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    """One query block of one (batch, head): online softmax over the possibly visible key blocks."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_ok = offs_m < LQ
    d_ok = offs_d < D

    q = tl.load(
        Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd,
        mask=q_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    tq = tl.load(TQ + b * LQ + offs_m, mask=q_ok, other=1.0)
    oq = tl.load(OQ + b * LQ + offs_m, mask=q_ok, other=0)
    iq = offs_m + (LK - LQ)
    qc_max, ql_min, ql_max = _q_summary(QSUM, b, NGQ, start_m, BLOCK_M, G)
    lo1, hi1, lo2, hi2 = _k_block_runs(
        KSUM, b, NGK, qc_max, ql_min, ql_max, start_m, LQ, LK, BLOCK_M, BLOCK_N, G, CHUNK
    )

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0, tl.float32)
    n_tiles = tl.full([], 0, tl.int32)
    acc, l_i, m_i, n_tiles = _fwd_inner(
        acc, l_i, m_i, n_tiles, q, tq, oq, iq, q_ok, K, V, TK, OK, b, h,
        s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd, LK, offs_d, d_ok, qk_scale_log2,
        lo1 * BLOCK_N, hi1 * BLOCK_N, BLOCK_N, PRECISION, UPCAST,
    )  # fmt: skip
    acc, l_i, m_i, n_tiles = _fwd_inner(
        acc, l_i, m_i, n_tiles, q, tq, oq, iq, q_ok, K, V, TK, OK, b, h,
        s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd, LK, offs_d, d_ok, qk_scale_log2,
        lo2 * BLOCK_N, hi2 * BLOCK_N, BLOCK_N, PRECISION, UPCAST,
    )  # fmt: skip

    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(
        OUT + b * s_ob + h * s_oh + offs_m[:, None] * s_om + offs_d[None, :] * s_od,
        out.to(OUT.dtype.element_ty),
        mask=q_ok[:, None] & d_ok[None, :],
    )
    tl.store(LSE + pid_bh.to(tl.int64) * LQ + offs_m, m_safe + tl.log2(l_safe), mask=q_ok)
    if COUNT_TILES:
        tl.store(COUNT + pid_bh * tl.num_programs(0) + pid_m, n_tiles)


@triton.jit
def _bwd_delta_kernel(
    OUT, DO, DELTA, s_ob, s_oh, s_om, s_od, s_db, s_dh, s_dm, s_dd, H, LQ, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """``delta = rowsum(dO * O)`` in float32, ``[B * H, Lq]``."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < LQ)[:, None] & (offs_d < D)[None, :]
    o = tl.load(
        OUT + b * s_ob + h * s_oh + offs_m[:, None] * s_om + offs_d[None, :] * s_od,
        mask=mask,
        other=0.0,
    )
    do = tl.load(
        DO + b * s_db + h * s_dh + offs_m[:, None] * s_dm + offs_d[None, :] * s_dd,
        mask=mask,
        other=0.0,
    )
    delta = _reduce_sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * LQ + offs_m, delta, mask=offs_m < LQ)


@triton.jit
def _dkdv_inner(
    dk, dv, k, v, tk, ok, offs_n, k_ok, Q, DO, LSE, DELTA, TQ, OQ, b, h, bh,
    s_qb, s_qh, s_qm, s_qd, s_db, s_dh, s_dm, s_dd, LQ, LK, offs_d, d_ok, qk_scale_log2, lo, hi,
    BLOCK_M: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Accumulate dK, dV of one key block over the query tiles starting in ``[lo, hi)``."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_ok = offs_m < LQ
        qt = tl.load(
            Q + b * s_qb + h * s_qh + offs_m[None, :] * s_qm + offs_d[:, None] * s_qd,
            mask=q_ok[None, :] & d_ok[:, None],
            other=0.0,
        )
        do = tl.load(
            DO + b * s_db + h * s_dh + offs_m[:, None] * s_dm + offs_d[None, :] * s_dd,
            mask=q_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        tq = tl.load(TQ + b * LQ + offs_m, mask=q_ok, other=1.0)
        oq = tl.load(OQ + b * LQ + offs_m, mask=q_ok, other=0)
        lse = tl.load(LSE + bh * LQ + offs_m, mask=q_ok, other=0.0)
        delta = tl.load(DELTA + bh * LQ + offs_m, mask=q_ok, other=0.0)
        # Transposed tile [N, M]: rows are keys, columns are queries.
        vis_t = _visible_t(tq, oq, offs_m + (LK - LQ), q_ok, tk, ok, offs_n, k_ok)
        s_t = _dot(k, qt, PRECISION, UPCAST) * qk_scale_log2
        p_t = tl.exp2(tl.where(vis_t, s_t - lse[None, :], float("-inf")))
        dv += _dot(p_t.to(do.dtype), do, PRECISION, UPCAST)
        dp_t = _dot(v, tl.trans(do), PRECISION, UPCAST)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _dot(ds_t.to(qt.dtype), tl.trans(qt), PRECISION, UPCAST)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, TQ, OQ, TK, OK, QSUM, KSUM,
    s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd, s_db, s_dh, s_dm, s_dd, s_gb, s_gh, s_gn, s_gd,
    H, LQ, LK, NGQ, NGK, D, qk_scale_log2, sm_scale,
    LQ_KEY, LK_KEY,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, G: tl.constexpr,
    CHUNK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """One key block of one (batch, head): dK and dV over the query blocks that may see it."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    bh = pid_bh.to(tl.int64)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_ok = offs_n < LK
    d_ok = offs_d < D
    kv_mask = k_ok[:, None] & d_ok[None, :]
    k = tl.load(
        K + b * s_kb + h * s_kh + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd,
        mask=kv_mask,
        other=0.0,
    )
    v = tl.load(
        V + b * s_vb + h * s_vh + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd,
        mask=kv_mask,
        other=0.0,
    )
    tk = tl.load(TK + b * LK + offs_n, mask=k_ok, other=1.0)
    ok = tl.load(OK + b * LK + offs_n, mask=k_ok, other=0)
    kc_min, kl_min, kl_max = _k_summary(KSUM, b, NGK, start_n, BLOCK_N, G)
    lo1, hi1, lo2, hi2 = _q_block_runs(
        QSUM, b, NGQ, kc_min, kl_min, kl_max, start_n, LQ, LK, BLOCK_M, BLOCK_N, G, CHUNK
    )

    dk = tl.full([BLOCK_N, BLOCK_D], 0, tl.float32)
    dv = tl.full([BLOCK_N, BLOCK_D], 0, tl.float32)
    dk, dv = _dkdv_inner(
        dk, dv, k, v, tk, ok, offs_n, k_ok, Q, DO, LSE, DELTA, TQ, OQ, b, h, bh,
        s_qb, s_qh, s_qm, s_qd, s_db, s_dh, s_dm, s_dd, LQ, LK, offs_d, d_ok, qk_scale_log2,
        lo1 * BLOCK_M, hi1 * BLOCK_M, BLOCK_M, PRECISION, UPCAST,
    )  # fmt: skip
    dk, dv = _dkdv_inner(
        dk, dv, k, v, tk, ok, offs_n, k_ok, Q, DO, LSE, DELTA, TQ, OQ, b, h, bh,
        s_qb, s_qh, s_qm, s_qd, s_db, s_dh, s_dm, s_dd, LQ, LK, offs_d, d_ok, qk_scale_log2,
        lo2 * BLOCK_M, hi2 * BLOCK_M, BLOCK_M, PRECISION, UPCAST,
    )  # fmt: skip

    out_off = b * s_gb + h * s_gh + offs_n[:, None] * s_gn + offs_d[None, :] * s_gd
    tl.store(DK + out_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_inner(
    dq, q, do, lse, delta, tq, oq, iq, q_ok, K, V, TK, OK, b, h,
    s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd, LK, offs_d, d_ok, qk_scale_log2, lo, hi,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Accumulate dQ of one query block over the key tiles starting in ``[lo, hi)``."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ok = offs_n < LK
        kt = tl.load(
            K + b * s_kb + h * s_kh + offs_n[None, :] * s_kn + offs_d[:, None] * s_kd,
            mask=k_ok[None, :] & d_ok[:, None],
            other=0.0,
        )
        vt = tl.load(
            V + b * s_vb + h * s_vh + offs_n[None, :] * s_vn + offs_d[:, None] * s_vd,
            mask=k_ok[None, :] & d_ok[:, None],
            other=0.0,
        )
        tk = tl.load(TK + b * LK + offs_n, mask=k_ok, other=1.0)
        ok = tl.load(OK + b * LK + offs_n, mask=k_ok, other=0)
        vis = _visible(tq, oq, iq, q_ok, tk, ok, offs_n, k_ok)
        s = _dot(q, kt, PRECISION, UPCAST) * qk_scale_log2
        p = tl.exp2(tl.where(vis, s - lse[:, None], float("-inf")))
        dp = _dot(do, vt, PRECISION, UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(kt.dtype), tl.trans(kt), PRECISION, UPCAST)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, TQ, OQ, TK, OK, QSUM, KSUM,
    s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd, s_db, s_dh, s_dm, s_dd, s_gb, s_gh, s_gm, s_gd,
    H, LQ, LK, NGQ, NGK, D, qk_scale_log2, sm_scale,
    LQ_KEY, LK_KEY,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, G: tl.constexpr,
    CHUNK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """One query block of one (batch, head): dQ over the possibly visible key blocks."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_ok = offs_m < LQ
    d_ok = offs_d < D
    q_mask = q_ok[:, None] & d_ok[None, :]
    q = tl.load(
        Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd,
        mask=q_mask,
        other=0.0,
    )
    do = tl.load(
        DO + b * s_db + h * s_dh + offs_m[:, None] * s_dm + offs_d[None, :] * s_dd,
        mask=q_mask,
        other=0.0,
    )
    tq = tl.load(TQ + b * LQ + offs_m, mask=q_ok, other=1.0)
    oq = tl.load(OQ + b * LQ + offs_m, mask=q_ok, other=0)
    iq = offs_m + (LK - LQ)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * LQ + offs_m, mask=q_ok, other=0.0)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * LQ + offs_m, mask=q_ok, other=0.0)
    qc_max, ql_min, ql_max = _q_summary(QSUM, b, NGQ, start_m, BLOCK_M, G)
    lo1, hi1, lo2, hi2 = _k_block_runs(
        KSUM, b, NGK, qc_max, ql_min, ql_max, start_m, LQ, LK, BLOCK_M, BLOCK_N, G, CHUNK
    )

    dq = tl.full([BLOCK_M, BLOCK_D], 0, tl.float32)
    dq = _dq_inner(
        dq, q, do, lse, delta, tq, oq, iq, q_ok, K, V, TK, OK, b, h,
        s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd, LK, offs_d, d_ok, qk_scale_log2,
        lo1 * BLOCK_N, hi1 * BLOCK_N, BLOCK_N, PRECISION, UPCAST,
    )  # fmt: skip
    dq = _dq_inner(
        dq, q, do, lse, delta, tq, oq, iq, q_ok, K, V, TK, OK, b, h,
        s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd, LK, offs_d, d_ok, qk_scale_log2,
        lo2 * BLOCK_N, hi2 * BLOCK_N, BLOCK_N, PRECISION, UPCAST,
    )  # fmt: skip

    tl.store(
        DQ + b * s_gb + h * s_gh + offs_m[:, None] * s_gm + offs_d[None, :] * s_gd,
        (dq * sm_scale).to(DQ.dtype.element_ty),
        mask=q_mask,
    )


def _configs(pairs, warps_stages):
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m, n in pairs
        for w, s in warps_stages
    ]


_TUNE_KEY = ["LQ_KEY", "LK_KEY", "BLOCK_D"]
_fwd_tuned = triton.autotune(
    _configs([(128, 64), (128, 128), (64, 64), (64, 32)], [(4, 3), (8, 3), (4, 4)]), key=_TUNE_KEY
)(_fwd_kernel)
_fwd_decode_tuned = triton.autotune(
    _configs([(16, 64), (16, 128)], [(4, 2), (4, 3), (8, 3)]), key=_TUNE_KEY
)(_fwd_kernel)
_dkdv_tuned = triton.autotune(
    _configs([(32, 64), (64, 64), (32, 128), (64, 128)], [(4, 3), (8, 3), (4, 2)]), key=_TUNE_KEY
)(_bwd_dkdv_kernel)
_dq_tuned = triton.autotune(
    _configs([(64, 32), (64, 64), (128, 64), (128, 32)], [(4, 3), (8, 3), (4, 2)]), key=_TUNE_KEY
)(_bwd_dq_kernel)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TileConfig:
    """One fixed tile configuration (the single-config mode; autotuning is the default).

    The same tile sizes are used by the forward kernel and both backward kernels.
    """

    block_m: int = 64
    """Queries per tile; a power of two, at least 16."""
    block_n: int = 64
    """Keys per tile; a power of two, at least 16."""
    num_warps: int = 4
    """Warps per program (ignored by the interpreter)."""
    num_stages: int = 2
    """Software-pipelining stages (ignored by the interpreter)."""

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value < _G or value & (value - 1):
                raise ConfigError(f"TileConfig.{name} must be a power of two >= {_G}; got {value}")


_INTERPRETED = type(_fwd_kernel).__name__ == "InterpretedFunction"
"""Whether this module was imported with ``TRITON_INTERPRET=1`` (the kernels run on the CPU)."""
_INTERPRETER_TILES = TileConfig(block_m=16, block_n=16)


def _bucket(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _block_d(d: int) -> int:
    return max(16, _bucket(d))


def _summaries(t: torch.Tensor, o: torch.Tensor, *, query: bool) -> torch.Tensor:
    """Per-16-token summaries ``[B, 3, ceil(L / 16)]`` int32 used to skip invisible tiles.

    Keys: (min order of committed keys, min and max order of informative live keys ``0 < t < 1``).
    Queries: (max order of committed queries, min and max order of live queries ``t > 0``).
    Empty minima are ``_BIG``, empty maxima ``-_BIG``, so an empty group never makes a tile visible.
    """
    b, length = t.shape
    n = -(-length // _G)
    pad = n * _G - length
    first = t == 0
    second = (t > 0) if query else ((t > 0) & (t < 1))
    if pad:
        o = torch.nn.functional.pad(o, (0, pad))
        first = torch.nn.functional.pad(first, (0, pad), value=False)
        second = torch.nn.functional.pad(second, (0, pad), value=False)
    big = torch.tensor(_BIG, dtype=torch.int32, device=t.device)
    if query:
        c = torch.where(first, o, -big).view(b, n, _G).amax(-1)
    else:
        c = torch.where(first, o, big).view(b, n, _G).amin(-1)
    lo = torch.where(second, o, big).view(b, n, _G).amin(-1)
    hi = torch.where(second, o, -big).view(b, n, _G).amax(-1)
    return torch.stack([c, lo, hi], 1).contiguous()


def _check_inputs(q, k, v, t_q, o_q, t_k, o_k) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise ShapeError(f"{name} must be a 4-D tensor [B, H, L, D]")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ShapeError(
            f"q, k, v must share one dtype among float16, bfloat16, float32; got "
            f"{q.dtype}, {k.dtype}, {v.dtype}"
        )
    bsz, heads, lq, d = q.shape
    lk = k.shape[2]
    if k.shape != v.shape or k.shape[:2] != (bsz, heads) or k.shape[3] != d:
        raise ShapeError(
            f"expected q [B, H, Lq, D] and k, v [B, H, Lk, D]; got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if lq > lk:
        raise ShapeError(f"need Lq <= Lk (queries are the last Lq keys); got Lq={lq}, Lk={lk}")
    if not 1 <= d <= _MAX_D:
        raise ShapeError(
            f"head dim {d} is not supported by the Triton kernel (1 <= D <= {_MAX_D}); use "
            f'backend="sdpa"'
        )
    for name, x, length in (("t_q", t_q, lq), ("o_q", o_q, lq), ("t_k", t_k, lk), ("o_k", o_k, lk)):
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != (bsz, length):
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ShapeError(f"{name} must have shape {(bsz, length)}; got {got}")
    for name, t in (("t_q", t_q), ("t_k", t_k)):
        if not torch.is_floating_point(t):
            raise TimeRangeError(f"{name} must be a floating tensor, got dtype {t.dtype}")
    for name, o in (("o_q", o_q), ("o_k", o_k)):
        if o.dtype == torch.bool or torch.is_floating_point(o) or torch.is_complex(o):
            raise ShapeError(f"{name} must be an integer tensor, got dtype {o.dtype}")
    devices = {x.device for x in (q, k, v, t_q, o_q, t_k, o_k)}
    if len(devices) != 1:
        raise ShapeError(f"all inputs must be on one device; got {sorted(map(str, devices))}")
    if q.device.type != "cuda" and not _INTERPRETED:
        raise ShapeError(
            f"the Triton kernel needs CUDA tensors (got {q.device.type}); use "
            f'attention(..., backend="sdpa") on this device, or set TRITON_INTERPRET=1 before '
            f"importing flowtext.kernels to run the kernel in Triton's (slow) CPU interpreter"
        )
    # One host synchronisation for all value checks.
    bad = torch.stack(
        [
            ((t_q < 0) | (t_q > 1) | t_q.isnan()).any(),
            ((t_k < 0) | (t_k > 1) | t_k.isnan()).any(),
            ((o_q < -_BIG) | (o_q > _BIG)).any(),
            ((o_k < -_BIG) | (o_k > _BIG)).any(),
        ]
    ).tolist()
    for flag, name, t in ((bad[0], "t_q", t_q), (bad[1], "t_k", t_k)):
        if flag:
            raise TimeRangeError(
                f"{name} must lie in [0, 1] (0 = committed, 1 = pure noise); got range "
                f"[{t.min().item():.4g}, {t.max().item():.4g}]"
            )
    if bad[2] or bad[3]:
        raise ShapeError(f"orders must lie in the int32 range [{-_BIG}, {_BIG}]")


def _resolve_tiles(single_config: bool | TileConfig) -> TileConfig | None:
    """The fixed tiles to use, or ``None`` to autotune."""
    if isinstance(single_config, TileConfig):
        return single_config
    if not isinstance(single_config, bool):
        raise ConfigError(f"single_config must be a bool or a TileConfig; got {single_config!r}")
    if _INTERPRETED:  # autotuning benchmarks, meaningless (and slow) in the interpreter
        return _INTERPRETER_TILES
    if single_config or os.environ.get("FLOWTEXT_TRITON_SINGLE_CONFIG", "0") == "1":
        return TileConfig()
    return None


def _strides(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(x.stride())


def _forward(q, k, v, tq, oq, tk, ok, qsum, ksum, tiles, *, count_tiles: bool = False):
    """Launch the forward kernel; returns ``(out, lse_log2, tile_counts_or_None)``."""
    bsz, heads, lq, d = q.shape
    lk = k.shape[2]
    out = torch.empty((bsz, heads, lq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((bsz * heads, lq), dtype=torch.float32, device=q.device)
    count = torch.zeros(
        (bsz * heads, -(-lq // (tiles.block_m if tiles else 16))) if count_tiles else (1,),
        dtype=torch.int32,
        device=q.device,
    )
    args = (
        q, k, v, out, lse, tq, oq, tk, ok, qsum, ksum, count,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        heads, lq, lk, qsum.shape[2], ksum.shape[2], d, _LOG2E / math.sqrt(d),
        _bucket(lq), _bucket(lk),
    )  # fmt: skip
    common = {
        "BLOCK_D": _block_d(d),
        "G": _G,
        "CHUNK": 64,
        "COUNT_TILES": count_tiles,
        "PRECISION": "ieee" if q.dtype == torch.float32 else None,
        "UPCAST": _INTERPRETED and q.dtype == torch.bfloat16,
    }
    if tiles is None:
        if count_tiles:
            raise ConfigError("count_tiles needs a fixed TileConfig")
        kernel = _fwd_decode_tuned if lq <= 16 else _fwd_tuned
        grid = lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]), bsz * heads)  # noqa: E731
        kernel[grid](*args, **common)
    else:
        grid = (triton.cdiv(lq, tiles.block_m), bsz * heads)
        _fwd_kernel[grid](
            *args,
            BLOCK_M=tiles.block_m,
            BLOCK_N=tiles.block_n,
            num_warps=tiles.num_warps,
            num_stages=tiles.num_stages,
            **common,
        )
    return out, lse, (count if count_tiles else None)


def _backward(do, q, k, v, out, lse, tq, oq, tk, ok, qsum, ksum, tiles):
    """Launch the three backward kernels; returns ``(dq, dk, dv)``."""
    bsz, heads, lq, d = q.shape
    lk = k.shape[2]
    block_d = _block_d(d)
    delta = torch.empty((bsz * heads, lq), dtype=torch.float32, device=q.device)
    _bwd_delta_kernel[(triton.cdiv(lq, 64), bsz * heads)](
        out, do, delta, *_strides(out), *_strides(do), heads, lq, d, BLOCK_M=64, BLOCK_D=block_d
    )
    dq = torch.empty((bsz, heads, lq, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((bsz, heads, lk, d), dtype=k.dtype, device=k.device)
    dv = torch.empty((bsz, heads, lk, d), dtype=v.dtype, device=v.device)
    common = {
        "BLOCK_D": block_d,
        "G": _G,
        "CHUNK": 64,
        "PRECISION": "ieee" if q.dtype == torch.float32 else None,
        "UPCAST": _INTERPRETED and q.dtype == torch.bfloat16,
    }
    scalars = (
        heads, lq, lk, qsum.shape[2], ksum.shape[2], d, _LOG2E / math.sqrt(d), 1 / math.sqrt(d),
        _bucket(lq), _bucket(lk),
    )  # fmt: skip
    # dk and dv are fresh contiguous tensors of one shape: they share the output strides.
    dkdv_args = (
        q, k, v, do, dk, dv, lse, delta, tq, oq, tk, ok, qsum, ksum,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *scalars,
    )  # fmt: skip
    dq_args = (
        q, k, v, do, dq, lse, delta, tq, oq, tk, ok, qsum, ksum,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq), *scalars,
    )  # fmt: skip
    if tiles is None:
        _dkdv_tuned[lambda meta: (triton.cdiv(lk, meta["BLOCK_N"]), bsz * heads)](
            *dkdv_args, **common
        )
        _dq_tuned[lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]), bsz * heads)](*dq_args, **common)
    else:
        fixed = {
            "BLOCK_M": tiles.block_m,
            "BLOCK_N": tiles.block_n,
            "num_warps": tiles.num_warps,
            "num_stages": tiles.num_stages,
        }
        _bwd_dkdv_kernel[(triton.cdiv(lk, tiles.block_n), bsz * heads)](
            *dkdv_args, **fixed, **common
        )
        _bwd_dq_kernel[(triton.cdiv(lq, tiles.block_m), bsz * heads)](*dq_args, **fixed, **common)
    return dq, dk, dv


class VisibilityAttentionFunction(torch.autograd.Function):
    """Autograd wrapper of the fused kernels; gradients flow to ``q``, ``k`` and ``v`` only.

    Call through :func:`visibility_attention`, which validates the inputs.
    """

    @staticmethod
    def forward(ctx, q, k, v, t_q, o_q, t_k, o_k, tiles):  # noqa: D102
        tq = t_q.to(torch.float32).contiguous()
        tk = t_k.to(torch.float32).contiguous()
        oq = o_q.to(torch.int32).contiguous()
        ok = o_k.to(torch.int32).contiguous()
        qsum = _summaries(tq, oq, query=True)
        ksum = _summaries(tk, ok, query=False)
        out, lse, _ = _forward(q, k, v, tq, oq, tk, ok, qsum, ksum, tiles)
        ctx.save_for_backward(q, k, v, out, lse, tq, oq, tk, ok, qsum, ksum)
        ctx.tiles = tiles
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        q, k, v, out, lse, tq, oq, tk, ok, qsum, ksum = ctx.saved_tensors
        dq, dk, dv = _backward(grad_out, q, k, v, out, lse, tq, oq, tk, ok, qsum, ksum, ctx.tiles)
        return dq, dk, dv, None, None, None, None, None


def visibility_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    t_q: torch.Tensor,
    o_q: torch.Tensor,
    t_k: torch.Tensor,
    o_k: torch.Tensor,
    *,
    single_config: bool | TileConfig = False,
) -> torch.Tensor:
    r"""Fused attention under the visibility rules of theory §2, differentiable in ``q, k, v``.

    Computes :math:`\mathrm{softmax}(q k^\top / \sqrt{D} + \log M)\, v` where
    :math:`M` is :func:`flowtext.attention.visibility_mask` ``(t_q, o_q, t_k, o_k)``, without ever
    forming :math:`M` (memory is ``O(B H L D)``); tiles with no visible pair are skipped.

    Args:
        q: Queries ``[B, H, Lq, D]`` (float16, bfloat16 or float32; ``D <= 128``).
        k: Keys ``[B, H, Lk, D]``, same dtype, ``Lk >= Lq``; query ``i`` is key ``Lk - Lq + i``.
        v: Values ``[B, H, Lk, D]``, same dtype.
        t_q: Query times ``[B, Lq]`` in ``[0, 1]``.
        o_q: Query orders ``[B, Lq]`` (commit order, or group for live tokens), integer.
        t_k: Key times ``[B, Lk]`` in ``[0, 1]``.
        o_k: Key orders ``[B, Lk]``, integer.
        single_config: ``False`` autotunes the tile sizes (keyed on lengths, head dim and dtype);
            ``True`` uses the default :class:`TileConfig`; a :class:`TileConfig` uses that one.
            The environment variable ``FLOWTEXT_TRITON_SINGLE_CONFIG=1`` turns ``False`` into
            ``True``; under the Triton interpreter a bool means 16 x 16 tiles.

    Returns:
        Attention output ``[B, H, Lq, D]`` in the dtype of ``q`` (a fresh contiguous tensor).

    Raises:
        ShapeError: Mismatched shapes, dtypes or devices, an unsupported head dim, orders outside
            int32, or CPU tensors without ``TRITON_INTERPRET=1``.
        TimeRangeError: Times outside ``[0, 1]`` (or NaN).
        ConfigError: A ``single_config`` that is neither a bool nor a :class:`TileConfig`.
    """
    _check_inputs(q, k, v, t_q, o_q, t_k, o_k)
    tiles = _resolve_tiles(single_config)
    if q.shape[2] == 0:
        return q.new_zeros(q.shape)
    return VisibilityAttentionFunction.apply(q, k, v, t_q, o_q, t_k, o_k, tiles)
