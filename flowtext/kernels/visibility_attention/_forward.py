"""Forward kernel: one program per (query tile, batch x head), online softmax in base 2.

The program classifies its row of key tiles (:func:`._tiles._block_runs`), runs the first run of
fully visible tiles with no mask predicate, then every other tile that may be visible with the
predicate, and stores the output and the per-row log-sum-exp (base 2) for the backward pass.
"""

from __future__ import annotations

import triton
import triton.language as tl

from flowtext.kernels.visibility_attention._tiles import (
    NO_SPECIALIZE,
    _batch_head,
    _block_runs,
    _partial_segments,
    _reduce_max,
    _reduce_sum,
    _rows,
    _segment_block,
    _side,
    _visible,
)


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` accumulated in float32 (``UPCAST`` works around the interpreter's bf16 matmul)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _fwd_tile(
    acc, l_i, m_i, q, tq, oq, iq, q_ok, K, V, TK, OK, b, h,
    s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd, LK, offs_d, d_ok, qk_scale_log2, start_n,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Fold one key tile into the online softmax; ``MASKED=False`` for fully visible tiles."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k_ptr = _rows(K, b, h, s_kb, s_kh, s_kd, s_kn, offs_d, offs_n)  # [D, N]
    v_ptr = _rows(V, b, h, s_vb, s_vh, s_vn, s_vd, offs_n, offs_d)
    if MASKED:
        k_ok = offs_n < LK
        kt = tl.load(k_ptr, mask=k_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(v_ptr, mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        tk, ok = _side(TK, OK, b, LK, offs_n, k_ok)
        vis = _visible(tq, oq, iq, q_ok, tk, ok, offs_n, k_ok)
        s = tl.where(vis, _dot(q, kt, PRECISION, UPCAST) * qk_scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, _reduce_max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    else:  # every key exists and is visible: no bounds, no predicate, finite scores
        kt = tl.load(k_ptr, mask=d_ok[:, None], other=0.0)
        v = tl.load(v_ptr, mask=d_ok[None, :], other=0.0)
        s = _dot(q, kt, PRECISION, UPCAST) * qk_scale_log2
        m_new = tl.maximum(m_i, _reduce_max(s, 1))
        m_use = m_new
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + _reduce_sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST)
    return acc, l_i, m_new


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _fwd_kernel(
    Q, K, V, OUT, LSE, TQ, OQ, TK, OK, QSUM, KSUM, COUNT,
    s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd, s_ob, s_oh, s_om, s_od,
    H, LQ, LK, NGQ, NGK, D, qk_scale_log2,
    LQ_KEY, LK_KEY, PATTERN,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    COUNT_TILES: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """One query tile of one (batch, head): fully visible key tiles first, then partial ones."""
    pid_m = tl.program_id(0)
    bh, b, h = _batch_head(H)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_ok = offs_m < LQ
    d_ok = offs_d < D
    q_mask = q_ok[:, None] & d_ok[None, :]
    q = tl.load(_rows(Q, b, h, s_qb, s_qh, s_qm, s_qd, offs_m, offs_d), mask=q_mask, other=0.0)
    tq, oq = _side(TQ, OQ, b, LQ, offs_m, q_ok)
    iq = offs_m + (LK - LQ)
    lo1, hi1, lo2, hi2, f_lo, f_hi = _block_runs(
        QSUM, KSUM, b, NGQ, NGK, start_m, LQ, LK, BLOCK_M, BLOCK_N, True
    )
    a0, a_n, b0, b_n, c0, c_n, d0, n_partial = _partial_segments(lo1, hi1, lo2, hi2, f_lo, f_hi)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0, tl.float32)
    for start_n in range(f_lo * BLOCK_N, f_hi * BLOCK_N, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(
            acc, l_i, m_i, q, tq, oq, iq, q_ok, K, V, TK, OK, b, h,
            s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd, LK, offs_d, d_ok, qk_scale_log2,
            start_n, BLOCK_N, False, PRECISION, UPCAST,
        )  # fmt: skip
    for i in range(0, n_partial):
        start_n = _segment_block(i, a0, a_n, b0, b_n, c0, c_n, d0) * BLOCK_N
        acc, l_i, m_i = _fwd_tile(
            acc, l_i, m_i, q, tq, oq, iq, q_ok, K, V, TK, OK, b, h,
            s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd, LK, offs_d, d_ok, qk_scale_log2,
            start_n, BLOCK_N, True, PRECISION, UPCAST,
        )  # fmt: skip

    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = (acc / l_safe[:, None]).to(OUT.dtype.element_ty)
    tl.store(_rows(OUT, b, h, s_ob, s_oh, s_om, s_od, offs_m, offs_d), out, mask=q_mask)
    tl.store(LSE + bh * LQ + offs_m, m_safe + tl.log2(l_safe), mask=q_ok)
    if COUNT_TILES:  # visited tiles, then fully visible ones (tests)
        slot = COUNT + (bh * tl.num_programs(0) + pid_m) * 2
        tl.store(slot, n_partial + tl.maximum(f_hi - f_lo, 0))
        tl.store(slot + 1, tl.maximum(f_hi - f_lo, 0))
