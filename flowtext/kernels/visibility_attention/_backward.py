"""Backward kernels, FlashAttention-2 split, no atomics.

``delta = rowsum(dO * O)``; then one kernel in two launches: a key-tile-parallel pass
accumulates ``dK, dV`` over the query tiles that may see its keys, and a query-tile-parallel pass
accumulates ``dQ`` over the key tiles its queries may see. Both recompute ``P`` from the stored
log-sum-exp and classify tiles exactly like the forward pass (fully visible tiles skip the
predicate, invisible ones are never loaded).
"""

from __future__ import annotations

import triton
import triton.language as tl

from flowtext.kernels.visibility_attention._forward import _dot
from flowtext.kernels.visibility_attention._tiles import (
    NO_SPECIALIZE,
    _batch_head,
    _block_runs,
    _partial_segments,
    _reduce_sum,
    _rows,
    _segment_block,
    _side,
    _visible,
    _visible_t,
)


@triton.jit
def _bwd_delta_kernel(
    OUT, DO, DELTA, s_ob, s_oh, s_om, s_od, s_db, s_dh, s_dm, s_dd, H, LQ, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """``delta = rowsum(dO * O)`` in float32, ``[B * H, Lq]``."""
    bh, b, h = _batch_head(H)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < LQ)[:, None] & (offs_d < D)[None, :]
    o = tl.load(_rows(OUT, b, h, s_ob, s_oh, s_om, s_od, offs_m, offs_d), mask=mask, other=0.0)
    do = tl.load(_rows(DO, b, h, s_db, s_dh, s_dm, s_dd, offs_m, offs_d), mask=mask, other=0.0)
    delta = _reduce_sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh * LQ + offs_m, delta, mask=offs_m < LQ)


@triton.jit
def _row_stats(LSE, DELTA, bh, LQ, offs_m, q_ok):
    """The forward's log-sum-exp (base 2) and ``delta`` ``[M]`` of the tile's query rows."""
    lse = tl.load(LSE + bh * LQ + offs_m, mask=q_ok, other=0.0)
    return lse, tl.load(DELTA + bh * LQ + offs_m, mask=q_ok, other=0.0)


@triton.jit
def _dkdv_tile(
    dk, dv, k, v, tk, ok, offs_n, k_ok, Q, DO, LSE, DELTA, TQ, OQ, b, h, bh,
    s_qb, s_qh, s_qm, s_qd, s_db, s_dh, s_dm, s_dd, LQ, LK, offs_d, d_ok, qk_scale_log2, start_m,
    BLOCK_M: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Fold one query tile into ``dK, dV`` of one key tile (transposed: rows are keys)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q_ok = offs_m < LQ  # rows beyond Lq load zeros: no contribution
    qt_ptr = _rows(Q, b, h, s_qb, s_qh, s_qd, s_qm, offs_d, offs_m)  # [D, M]
    qt = tl.load(qt_ptr, mask=d_ok[:, None] & q_ok[None, :], other=0.0)
    do_ptr = _rows(DO, b, h, s_db, s_dh, s_dm, s_dd, offs_m, offs_d)
    do = tl.load(do_ptr, mask=q_ok[:, None] & d_ok[None, :], other=0.0)
    lse, delta = _row_stats(LSE, DELTA, bh, LQ, offs_m, q_ok)
    s_t = _dot(k, qt, PRECISION, UPCAST) * qk_scale_log2 - lse[None, :]
    if MASKED:  # else every query sees every key of the tile
        tq, oq = _side(TQ, OQ, b, LQ, offs_m, q_ok)
        vis_t = _visible_t(tq, oq, offs_m + (LK - LQ), q_ok, tk, ok, offs_n, k_ok)
        s_t = tl.where(vis_t, s_t, float("-inf"))
    p_t = tl.exp2(s_t)
    dv += _dot(p_t.to(do.dtype), do, PRECISION, UPCAST)
    dp_t = _dot(v, tl.trans(do), PRECISION, UPCAST)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += _dot(ds_t.to(qt.dtype), tl.trans(qt), PRECISION, UPCAST)
    return dk, dv


@triton.jit
def _dq_tile(
    dq, q, do, lse, delta, tq, oq, iq, q_ok, K, V, TK, OK, b, h,
    s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd, LK, offs_d, d_ok, qk_scale_log2, start_n,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Fold one key tile into ``dQ`` of one query tile."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k_ptr = _rows(K, b, h, s_kb, s_kh, s_kd, s_kn, offs_d, offs_n)  # [D, N]
    v_ptr = _rows(V, b, h, s_vb, s_vh, s_vd, s_vn, offs_d, offs_n)
    if MASKED:
        k_ok = offs_n < LK
        kt = tl.load(k_ptr, mask=k_ok[None, :] & d_ok[:, None], other=0.0)
        vt = tl.load(v_ptr, mask=k_ok[None, :] & d_ok[:, None], other=0.0)
        tk, ok = _side(TK, OK, b, LK, offs_n, k_ok)
        vis = _visible(tq, oq, iq, q_ok, tk, ok, offs_n, k_ok)
        s = _dot(q, kt, PRECISION, UPCAST) * qk_scale_log2
        p = tl.exp2(tl.where(vis, s - lse[:, None], float("-inf")))
    else:  # every key exists and is visible to every query of the tile
        kt = tl.load(k_ptr, mask=d_ok[:, None], other=0.0)
        vt = tl.load(v_ptr, mask=d_ok[:, None], other=0.0)
        p = tl.exp2(_dot(q, kt, PRECISION, UPCAST) * qk_scale_log2 - lse[:, None])
    dp = _dot(do, vt, PRECISION, UPCAST)
    ds = p * (dp - delta[:, None])
    return dq + _dot(ds.to(kt.dtype), tl.trans(kt), PRECISION, UPCAST)


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _bwd_kernel(
    Q, K, V, DO, G1, G2, LSE, DELTA, TQ, OQ, TK, OK, QSUM, KSUM,
    s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd, s_db, s_dh, s_dm, s_dd, s_gb, s_gh, s_gr, s_gd,
    H, LQ, LK, NGQ, NGK, D, qk_scale_log2, sm_scale,
    LQ_KEY, LK_KEY, PATTERN,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, KEY_PASS: tl.constexpr,
):  # fmt: skip
    """One tile of one (batch, head), in one of the two passes (a static branch).

    ``KEY_PASS``: program ``i`` is key tile ``i``; its ``dK, dV`` (into ``G1, G2``, strides
    ``s_g*``) over the query tiles that may see it. Otherwise program ``i`` is query tile ``i``;
    its ``dQ`` (into ``G1``) over the key tiles it may see. One signature for both passes, so
    the launcher builds one argument list; the body is long because Triton kernels take flat
    arguments and a static branch cannot share its prologue.
    """
    bh, b, h = _batch_head(H)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    if KEY_PASS:
        start_n = tl.program_id(0) * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ok = offs_n < LK
        kv_mask = k_ok[:, None] & d_ok[None, :]
        k = tl.load(_rows(K, b, h, s_kb, s_kh, s_kn, s_kd, offs_n, offs_d), mask=kv_mask, other=0.0)
        v = tl.load(_rows(V, b, h, s_vb, s_vh, s_vn, s_vd, offs_n, offs_d), mask=kv_mask, other=0.0)
        tk, ok = _side(TK, OK, b, LK, offs_n, k_ok)
        lo1, hi1, lo2, hi2, f_lo, f_hi = _block_runs(
            QSUM, KSUM, b, NGQ, NGK, start_n, LQ, LK, BLOCK_M, BLOCK_N, False
        )
        a0, a_n, b0, b_n, c0, c_n, d0, n_partial = _partial_segments(lo1, hi1, lo2, hi2, f_lo, f_hi)
        dk = tl.full([BLOCK_N, BLOCK_D], 0, tl.float32)
        dv = tl.full([BLOCK_N, BLOCK_D], 0, tl.float32)
        for start_m in range(f_lo * BLOCK_M, f_hi * BLOCK_M, BLOCK_M):
            dk, dv = _dkdv_tile(
                dk, dv, k, v, tk, ok, offs_n, k_ok, Q, DO, LSE, DELTA, TQ, OQ, b, h, bh,
                s_qb, s_qh, s_qm, s_qd, s_db, s_dh, s_dm, s_dd, LQ, LK, offs_d, d_ok, qk_scale_log2,
                start_m, BLOCK_M, False, PRECISION, UPCAST,
            )  # fmt: skip
        for i in range(0, n_partial):
            start_m = _segment_block(i, a0, a_n, b0, b_n, c0, c_n, d0) * BLOCK_M
            dk, dv = _dkdv_tile(
                dk, dv, k, v, tk, ok, offs_n, k_ok, Q, DO, LSE, DELTA, TQ, OQ, b, h, bh,
                s_qb, s_qh, s_qm, s_qd, s_db, s_dh, s_dm, s_dd, LQ, LK, offs_d, d_ok, qk_scale_log2,
                start_m, BLOCK_M, True, PRECISION, UPCAST,
            )  # fmt: skip
        dk_ptr = _rows(G1, b, h, s_gb, s_gh, s_gr, s_gd, offs_n, offs_d)
        tl.store(dk_ptr, (dk * sm_scale).to(G1.dtype.element_ty), mask=kv_mask)
        dv_ptr = _rows(G2, b, h, s_gb, s_gh, s_gr, s_gd, offs_n, offs_d)
        tl.store(dv_ptr, dv.to(G2.dtype.element_ty), mask=kv_mask)
    else:
        start_m = tl.program_id(0) * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_ok = offs_m < LQ
        q_mask = q_ok[:, None] & d_ok[None, :]
        q = tl.load(_rows(Q, b, h, s_qb, s_qh, s_qm, s_qd, offs_m, offs_d), mask=q_mask, other=0.0)
        do = tl.load(
            _rows(DO, b, h, s_db, s_dh, s_dm, s_dd, offs_m, offs_d), mask=q_mask, other=0.0
        )
        tq, oq = _side(TQ, OQ, b, LQ, offs_m, q_ok)
        lse, delta = _row_stats(LSE, DELTA, bh, LQ, offs_m, q_ok)
        iq = offs_m + (LK - LQ)
        lo1, hi1, lo2, hi2, f_lo, f_hi = _block_runs(
            QSUM, KSUM, b, NGQ, NGK, start_m, LQ, LK, BLOCK_M, BLOCK_N, True
        )
        a0, a_n, b0, b_n, c0, c_n, d0, n_partial = _partial_segments(lo1, hi1, lo2, hi2, f_lo, f_hi)
        dq = tl.full([BLOCK_M, BLOCK_D], 0, tl.float32)
        for start_n in range(f_lo * BLOCK_N, f_hi * BLOCK_N, BLOCK_N):
            dq = _dq_tile(
                dq, q, do, lse, delta, tq, oq, iq, q_ok, K, V, TK, OK, b, h,
                s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd, LK, offs_d, d_ok, qk_scale_log2,
                start_n, BLOCK_N, False, PRECISION, UPCAST,
            )  # fmt: skip
        for i in range(0, n_partial):
            start_n = _segment_block(i, a0, a_n, b0, b_n, c0, c_n, d0) * BLOCK_N
            dq = _dq_tile(
                dq, q, do, lse, delta, tq, oq, iq, q_ok, K, V, TK, OK, b, h,
                s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd, LK, offs_d, d_ok, qk_scale_log2,
                start_n, BLOCK_N, True, PRECISION, UPCAST,
            )  # fmt: skip
        dq_ptr = _rows(G1, b, h, s_gb, s_gh, s_gr, s_gd, offs_m, offs_d)
        tl.store(dq_ptr, (dq * sm_scale).to(G1.dtype.element_ty), mask=q_mask)
