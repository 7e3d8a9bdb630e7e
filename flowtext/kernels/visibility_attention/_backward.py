"""Backward kernels, FlashAttention-2 split, no atomics.

``delta = rowsum(dO * O)``; then a key-tile-parallel kernel accumulates ``dK, dV`` over the query
tiles that may see its keys, and a query-tile-parallel kernel accumulates ``dQ`` over the key
tiles its queries may see. Both recompute ``P`` from the stored log-sum-exp and classify tiles
exactly like the forward pass (fully visible tiles skip the predicate, invisible ones are never
loaded).
"""

from __future__ import annotations

import triton
import triton.language as tl

from flowtext.kernels.visibility_attention._forward import _dot
from flowtext.kernels.visibility_attention._tiles import (
    NO_SPECIALIZE,
    _block_runs,
    _partial_segments,
    _reduce_sum,
    _segment_block,
    _visible,
    _visible_t,
)


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
def _dkdv_tile(
    dk, dv, k, v, tk, ok, offs_n, k_ok, Q, DO, LSE, DELTA, TQ, OQ, b, h, bh,
    s_qb, s_qh, s_qm, s_qd, s_db, s_dh, s_dm, s_dd, LQ, LK, offs_d, d_ok, qk_scale_log2, start_m,
    BLOCK_M: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Fold one query tile into ``dK, dV`` of one key tile (transposed: rows are keys)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q_ptr = Q + b * s_qb + h * s_qh + offs_m[None, :] * s_qm + offs_d[:, None] * s_qd
    do_ptr = DO + b * s_db + h * s_dh + offs_m[:, None] * s_dm + offs_d[None, :] * s_dd
    if MASKED:
        q_ok = offs_m < LQ
        qt = tl.load(q_ptr, mask=q_ok[None, :] & d_ok[:, None], other=0.0)
        do = tl.load(do_ptr, mask=q_ok[:, None] & d_ok[None, :], other=0.0)
        lse = tl.load(LSE + bh * LQ + offs_m, mask=q_ok, other=0.0)
        delta = tl.load(DELTA + bh * LQ + offs_m, mask=q_ok, other=0.0)
        tq = tl.load(TQ + b * LQ + offs_m, mask=q_ok, other=1.0)
        oq = tl.load(OQ + b * LQ + offs_m, mask=q_ok, other=0)
        vis_t = _visible_t(tq, oq, offs_m + (LK - LQ), q_ok, tk, ok, offs_n, k_ok)
        s_t = _dot(k, qt, PRECISION, UPCAST) * qk_scale_log2
        p_t = tl.exp2(tl.where(vis_t, s_t - lse[None, :], float("-inf")))
    else:  # every query sees every key of the tile (rows beyond Lq load zeros: no contribution)
        q_ok = offs_m < LQ
        qt = tl.load(q_ptr, mask=q_ok[None, :] & d_ok[:, None], other=0.0)
        do = tl.load(do_ptr, mask=q_ok[:, None] & d_ok[None, :], other=0.0)
        lse = tl.load(LSE + bh * LQ + offs_m, mask=q_ok, other=0.0)
        delta = tl.load(DELTA + bh * LQ + offs_m, mask=q_ok, other=0.0)
        p_t = tl.exp2(_dot(k, qt, PRECISION, UPCAST) * qk_scale_log2 - lse[None, :])
    dv += _dot(p_t.to(do.dtype), do, PRECISION, UPCAST)
    dp_t = _dot(v, tl.trans(do), PRECISION, UPCAST)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += _dot(ds_t.to(qt.dtype), tl.trans(qt), PRECISION, UPCAST)
    return dk, dv


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, TQ, OQ, TK, OK, QSUM, KSUM,
    s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd, s_db, s_dh, s_dm, s_dd, s_gb, s_gh, s_gn, s_gd,
    H, LQ, LK, NGQ, NGK, D, qk_scale_log2, sm_scale,
    LQ_KEY, LK_KEY, PATTERN,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """One key tile of one (batch, head): ``dK, dV`` over the query tiles that may see it."""
    pid_bh = tl.program_id(1)
    bh = pid_bh.to(tl.int64)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    start_n = tl.program_id(0) * BLOCK_N
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

    out_off = b * s_gb + h * s_gh + offs_n[:, None] * s_gn + offs_d[None, :] * s_gd
    tl.store(DK + out_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_tile(
    dq, q, do, lse, delta, tq, oq, iq, q_ok, K, V, TK, OK, b, h,
    s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd, LK, offs_d, d_ok, qk_scale_log2, start_n,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Fold one key tile into ``dQ`` of one query tile."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k_ptr = K + b * s_kb + h * s_kh + offs_n[None, :] * s_kn + offs_d[:, None] * s_kd
    v_ptr = V + b * s_vb + h * s_vh + offs_n[None, :] * s_vn + offs_d[:, None] * s_vd
    if MASKED:
        k_ok = offs_n < LK
        kt = tl.load(k_ptr, mask=k_ok[None, :] & d_ok[:, None], other=0.0)
        vt = tl.load(v_ptr, mask=k_ok[None, :] & d_ok[:, None], other=0.0)
        tk = tl.load(TK + b * LK + offs_n, mask=k_ok, other=1.0)
        ok = tl.load(OK + b * LK + offs_n, mask=k_ok, other=0)
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
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, TQ, OQ, TK, OK, QSUM, KSUM,
    s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd, s_db, s_dh, s_dm, s_dd, s_gb, s_gh, s_gm, s_gd,
    H, LQ, LK, NGQ, NGK, D, qk_scale_log2, sm_scale,
    LQ_KEY, LK_KEY, PATTERN,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """One query tile of one (batch, head): ``dQ`` over the key tiles it may see."""
    pid_bh = tl.program_id(1)
    bh = pid_bh.to(tl.int64)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    start_m = tl.program_id(0) * BLOCK_M
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
    lse = tl.load(LSE + bh * LQ + offs_m, mask=q_ok, other=0.0)
    delta = tl.load(DELTA + bh * LQ + offs_m, mask=q_ok, other=0.0)
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

    tl.store(
        DQ + b * s_gb + h * s_gh + offs_m[:, None] * s_gm + offs_d[None, :] * s_gd,
        (dq * sm_scale).to(DQ.dtype.element_ty),
        mask=q_mask,
    )
