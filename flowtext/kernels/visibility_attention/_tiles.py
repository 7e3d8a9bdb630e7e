"""Tile summaries and the in-kernel visibility rules (theory §2).

Host side: the per-16-token summaries of the token vectors (:func:`side_summaries`) and
:class:`TileSummaries`, which holds them for one ``(t_q, o_q, t_k, o_k)`` so every layer of a
forward pass can reuse them. Kernel side: the pairwise rule (:func:`_visible`), the reduction of
the summaries over a tile, the classification of a (query tile, key tile) pair as *invisible*
(never loaded), *fully visible* (no predicate needed) or *partial* (pays the predicate), and the
scan that turns a row or column of classes into the ranges the main loops run over.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import triton
import triton.language as tl

GROUP = tl.constexpr(16)
"""Tokens per summary entry; every tile size is a multiple of it."""
BIG = tl.constexpr(2**31 - 1)
"""Sentinel of the summaries: an empty minimum is ``BIG``, an empty maximum ``-BIG``."""
SCAN_CHUNK = tl.constexpr(64)
"""Tiles classified at once (one vector) while a program scans its row or column of tiles."""

# Rows of a summary tensor ``[B, N_ROWS, ceil(L / GROUP)]`` (int32).
C_MIN = tl.constexpr(0)
"""Minimum order of the committed tokens (``t == 0``)."""
C_MAX = tl.constexpr(1)
"""Maximum order of the committed tokens."""
L_MIN = tl.constexpr(2)
"""Minimum order of the live tokens (queries: ``t > 0``; keys: informative, ``0 < t < 1``)."""
L_MAX = tl.constexpr(3)
"""Maximum order of the live tokens."""
COMPLETE = tl.constexpr(4)
"""Keys: 1 if every key of the group exists (``< Lk``) and is committed or informative. Queries:
always 1 (query rows beyond ``Lq`` are masked wherever they are loaded or stored)."""
N_ROWS = tl.constexpr(5)

# Classes of a (query tile, key tile) pair.
INVISIBLE = tl.constexpr(0)
PARTIAL = tl.constexpr(1)
FULL = tl.constexpr(2)

NO_SPECIALIZE = ("H", "NGQ", "NGK", "LQ_KEY", "LK_KEY", "PATTERN")
"""Integer kernel arguments Triton must not specialise on (divisibility by 16): the autotuning keys
(read only by the autotuner) and sizes that only enter scalar arithmetic, so new values do not
recompile identical code. Lengths, the head dim and strides stay specialised (alignment)."""

PATTERN_TILE = 64
"""Tile size of the host-side visibility pattern used as an autotuning key."""


# --------------------------------------------------------------------------------------------
# Reductions (interpreter-safe)
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


# --------------------------------------------------------------------------------------------
# Addressing: the program's (batch, head) and its tiles
# --------------------------------------------------------------------------------------------


@triton.jit
def _batch_head(H):
    """``(bh, b, h)`` of this program (grid axis 1 runs over batch x heads), int64."""
    pid_bh = tl.program_id(1)
    return pid_bh.to(tl.int64), (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)


@triton.jit
def _rows(X, b, h, s_b, s_h, s_r, s_d, offs_r, offs_d):
    """Pointers ``[R, D]`` to rows ``offs_r`` and features ``offs_d`` of ``X[b, h]``."""
    return X + b * s_b + h * s_h + offs_r[:, None] * s_r + offs_d[None, :] * s_d


@triton.jit
def _side(TIME, ORDER, b, L, offs, ok):
    """Times (1 off the sequence) and orders (0 off it) ``[R]`` of the tile's tokens."""
    t = tl.load(TIME + b * L + offs, mask=ok, other=1.0)
    return t, tl.load(ORDER + b * L + offs, mask=ok, other=0)


# --------------------------------------------------------------------------------------------
# The pairwise rule
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Tile classification
# --------------------------------------------------------------------------------------------


@triton.jit
def _tile_summary(SUM, b, NG, start, BLOCK: tl.constexpr):
    """Reduce the group summaries of the tile(s) starting at ``start`` (a scalar or a vector).

    Returns ``(c_min, c_max, l_min, l_max, complete)`` in the layout of :func:`side_summaries`.
    (No ``tl.zeros``, ``tl.zeros_like`` or ``tl.cdiv`` here or below: those are ``@jit`` helpers
    of Triton's standard library, which the interpreter cannot call if Triton was imported before
    ``TRITON_INTERPRET=1`` was set.)
    """
    base = SUM + b * N_ROWS * NG
    c_min = BIG + start * 0
    c_max = -BIG + start * 0
    l_min = BIG + start * 0
    l_max = -BIG + start * 0
    complete = 1 + start * 0
    for j in tl.static_range(BLOCK // GROUP):
        g = start // GROUP + j
        ok = g < NG
        c_min = tl.minimum(c_min, tl.load(base + C_MIN * NG + g, mask=ok, other=BIG))
        c_max = tl.maximum(c_max, tl.load(base + C_MAX * NG + g, mask=ok, other=-BIG))
        l_min = tl.minimum(l_min, tl.load(base + L_MIN * NG + g, mask=ok, other=BIG))
        l_max = tl.maximum(l_max, tl.load(base + L_MAX * NG + g, mask=ok, other=-BIG))
        complete = complete & tl.load(base + COMPLETE * NG + g, mask=ok, other=0)
    return c_min, c_max, l_min, l_max, complete


@triton.jit
def _tile_class(
    qc_min, qc_max, ql_min, ql_max, kc_min, kc_max, kl_min, kl_max, k_complete,
    start_m, start_n, LQ, LK, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """``(may_be_visible, fully_visible)`` of a tile from its reduced summaries.

    *May be visible* is conservative (never false when a pair is visible): the tile touches the
    diagonal, or a committed key is old enough for a committed or a live query, or the live order
    ranges meet. *Fully visible* is sufficient (never true unless every pair is visible): every
    key exists and is committed or informative, every committed key is older than every
    query (``<=`` for committed, ``<`` for live queries), and if there is an informative key then
    every query is live and all live tokens share one group.
    """
    q_first = LK - LQ + start_m
    q_last = LK - LQ + tl.minimum(start_m + BLOCK_M, LQ) - 1
    k_last = tl.minimum(start_n + BLOCK_N, LK) - 1
    diagonal = (start_n <= q_last) & (k_last >= q_first)
    committed_by_committed = kc_min <= qc_max
    committed_by_live = kc_min < ql_max
    live_by_live = (ql_min <= kl_max) & (kl_min <= ql_max)
    may = diagonal | committed_by_committed | committed_by_live | live_by_live

    old_keys = (kc_max <= qc_min) & (kc_max < ql_min)
    no_live_key = kl_min > kl_max
    one_group = (qc_min > qc_max) & (ql_min == ql_max) & (kl_min == ql_min) & (kl_max == ql_min)
    full = (k_complete != 0) & old_keys & (no_live_key | one_group)
    return may, full & may


@triton.jit
def _scan_class(
    QSUM, KSUM, b, NGQ, NGK, f_cmin, f_cmax, f_lmin, f_lmax, f_complete, start_fixed, chunk, nb,
    LQ, LK, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SCAN_KEYS: tl.constexpr,
):  # fmt: skip
    """The chunk of blocks from ``chunk`` against one fixed tile: ``(blk, may, full, inside)``.

    ``blk`` holds the ``SCAN_CHUNK`` block indices, ``inside`` which of them are ``< nb``, and
    ``(may, full)`` their classes. The fixed tile's reduced summary is ``f_*``; the scanned tiles
    are the key tiles of one query tile if ``SCAN_KEYS``, else the query tiles of one key tile.
    Blocks ``>= nb`` are neither.
    """
    blk = chunk + tl.arange(0, SCAN_CHUNK)
    if SCAN_KEYS:
        c_min, c_max, l_min, l_max, complete = _tile_summary(KSUM, b, NGK, blk * BLOCK_N, BLOCK_N)
        may, full = _tile_class(
            f_cmin, f_cmax, f_lmin, f_lmax, c_min, c_max, l_min, l_max, complete,
            start_fixed, blk * BLOCK_N, LQ, LK, BLOCK_M, BLOCK_N,
        )  # fmt: skip
    else:
        c_min, c_max, l_min, l_max, complete = _tile_summary(QSUM, b, NGQ, blk * BLOCK_M, BLOCK_M)
        may, full = _tile_class(
            c_min, c_max, l_min, l_max, f_cmin, f_cmax, f_lmin, f_lmax, f_complete,
            blk * BLOCK_M, start_fixed, LQ, LK, BLOCK_M, BLOCK_N,
        )  # fmt: skip
    inside = blk < nb
    return blk, may & inside, full & inside, inside


@triton.jit
def _block_runs(
    QSUM, KSUM, b, NGQ, NGK, start_fixed, LQ, LK,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SCAN_KEYS: tl.constexpr,
):  # fmt: skip
    """The tiles one program visits: ``(lo1, hi1, lo2, hi2, f_lo, f_hi)``, block indices.

    The program owns the query tile (``SCAN_KEYS``) or key tile starting at ``start_fixed`` and
    scans the other side. ``[lo1, hi1)`` is the first run of tiles that may be visible and
    ``[lo2, hi2)`` everything that may be visible after it (gaps included, conservatively);
    ``[f_lo, f_hi)`` is the first run of fully visible tiles (inside one of the two). Loops over
    such ranges have no branch, so Triton can software-pipeline their loads.

    One pass over the chunks, in increasing order: a run's start, once found in a chunk, is
    final (later chunks hold larger blocks), so its end and the next run's start can be searched
    in the same chunk and every later one.
    """
    if SCAN_KEYS:
        nb = (LK + BLOCK_N - 1) // BLOCK_N + tl.full([], 0, tl.int32)
        f0, f1, f2, f3, f4 = _tile_summary(QSUM, b, NGQ, start_fixed, BLOCK_M)
    else:
        nb = (LQ + BLOCK_M - 1) // BLOCK_M + tl.full([], 0, tl.int32)
        f0, f1, f2, f3, f4 = _tile_summary(KSUM, b, NGK, start_fixed, BLOCK_N)
    lo1, hi1, lo2, f_lo, f_hi = nb, nb, nb, nb, nb
    hi2 = nb * 0
    for c in range(0, nb, SCAN_CHUNK):
        blk, may, full, inside = _scan_class(
            QSUM, KSUM, b, NGQ, NGK, f0, f1, f2, f3, f4, start_fixed, c, nb, LQ, LK,
            BLOCK_M, BLOCK_N, SCAN_KEYS,
        )  # fmt: skip
        lo1 = tl.minimum(lo1, _reduce_min(tl.where(may, blk, nb), 0))
        hi2 = tl.maximum(hi2, _reduce_max(tl.where(may, blk + 1, 0), 0))
        hi1 = tl.minimum(hi1, _reduce_min(tl.where((~may) & (blk > lo1) & inside, blk, nb), 0))
        lo2 = tl.minimum(lo2, _reduce_min(tl.where(may & (blk > hi1), blk, nb), 0))
        f_lo = tl.minimum(f_lo, _reduce_min(tl.where(full, blk, nb), 0))
        not_full = (~full) & (blk > f_lo) & inside
        f_hi = tl.minimum(f_hi, _reduce_min(tl.where(not_full, blk, nb), 0))
    return lo1, tl.minimum(hi1, hi2), lo2, hi2, f_lo, f_hi


@triton.jit
def _partial_segments(lo1, hi1, lo2, hi2, f_lo, f_hi):
    """The runs ``[lo1, hi1)`` and ``[lo2, hi2)`` minus the full run ``[f_lo, f_hi)``.

    Returns four segments as ``(start, length)`` pairs, in increasing order, and their total.
    """
    a0 = lo1
    a_n = tl.maximum(tl.minimum(hi1, f_lo) - lo1, 0)
    b0 = tl.maximum(lo1, f_hi)
    b_n = tl.maximum(hi1 - b0, 0)
    c0 = lo2
    c_n = tl.maximum(tl.minimum(hi2, f_lo) - lo2, 0)
    d0 = tl.maximum(lo2, f_hi)
    d_n = tl.maximum(hi2 - d0, 0)
    return a0, a_n, b0, b_n, c0, c_n, d0, a_n + b_n + c_n + d_n


@triton.jit
def _segment_block(i, a0, a_n, b0, b_n, c0, c_n, d0):
    """Block index of the ``i``-th partial tile (branch-free, so the loop stays pipelined)."""
    blk = a0 + i
    blk = tl.where(i >= a_n, b0 + (i - a_n), blk)
    blk = tl.where(i >= a_n + b_n, c0 + (i - a_n - b_n), blk)
    return tl.where(i >= a_n + b_n + c_n, d0 + (i - a_n - b_n - c_n), blk)


@triton.jit
def _classify_kernel(
    QSUM, KSUM, CLS, LQ, LK, NGQ, NGK, NBK, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    """Class of every (query tile, key tile) pair, ``[B, ceil(Lq / M), ceil(Lk / N)]`` int8."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    start_m = pid_m * BLOCK_M
    f0, f1, f2, f3, f4 = _tile_summary(QSUM, b, NGQ, start_m, BLOCK_M)
    row = CLS + (b * tl.num_programs(0) + pid_m) * NBK
    for c in range(0, NBK, SCAN_CHUNK):
        blk, may, full, inside = _scan_class(
            QSUM, KSUM, b, NGQ, NGK, f0, f1, f2, f3, f4, start_m, c, NBK, LQ, LK,
            BLOCK_M, BLOCK_N, True,
        )  # fmt: skip
        cls = tl.where(full, FULL, tl.where(may, PARTIAL, INVISIBLE))
        tl.store(row + blk, cls.to(tl.int8), mask=inside)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------


def side_summaries(t: torch.Tensor, o: torch.Tensor, *, query: bool) -> torch.Tensor:
    """Per-16-token summaries ``[B, 5, ceil(L / 16)]`` int32 of one side's token vectors.

    Rows (see the module constants): min and max order of the committed tokens, min and max order
    of the live tokens (queries: ``t > 0``; keys: informative ``0 < t < 1``), and, for keys,
    whether the group is complete (all 16 keys exist and each is committed or informative; always
    1 for queries). Empty
    minima are ``BIG`` and empty maxima ``-BIG``, so an empty set never makes a tile visible.

    Args:
        t: Times ``[B, L]`` float32.
        o: Orders ``[B, L]`` int32.
        query: Summarise queries (else keys).
    """
    b, length = t.shape
    n = -(-length // GROUP.value)
    pad = (0, n * GROUP.value - length)
    committed = t == 0
    live = (t > 0) if query else ((t > 0) & (t < 1))
    o = torch.nn.functional.pad(o, pad).view(b, n, GROUP.value)
    committed, live = (
        torch.nn.functional.pad(x, pad, value=False).view(b, n, GROUP.value)
        for x in (committed, live)
    )
    complete = torch.ones_like(committed[..., 0]) if query else (committed | live).all(-1)
    big = torch.tensor(BIG.value, dtype=torch.int32, device=t.device)
    rows = [
        torch.where(committed, o, big).amin(-1),
        torch.where(committed, o, -big).amax(-1),
        torch.where(live, o, big).amin(-1),
        torch.where(live, o, -big).amax(-1),
        complete.to(torch.int32),
    ]
    return torch.stack(rows, 1).contiguous()


@dataclass(frozen=True, eq=False)
class TileSummaries:
    """The token vectors of one attention call in kernel form, with their tile summaries.

    Build it once per set of ``(t_q, o_q, t_k, o_k)`` with :func:`tile_summaries` and pass it to
    every :func:`~flowtext.kernels.visibility_attention` call that uses those vectors (every
    layer of a forward pass): the conversions, the value checks (one device sync) and the
    visibility pattern used as an autotuning key are then paid once instead of once per layer.
    """

    t_q: torch.Tensor
    """Query times ``[B, Lq]`` float32, contiguous."""
    o_q: torch.Tensor
    """Query orders ``[B, Lq]`` int32, contiguous."""
    t_k: torch.Tensor
    """Key times ``[B, Lk]`` float32, contiguous."""
    o_k: torch.Tensor
    """Key orders ``[B, Lk]`` int32, contiguous."""
    q: torch.Tensor
    """Query summaries ``[B, 5, ceil(Lq / 16)]`` int32 (:func:`side_summaries`)."""
    k: torch.Tensor
    """Key summaries ``[B, 5, ceil(Lk / 16)]`` int32."""
    sources: tuple
    """Identity of the tensors it was built from, to catch a mismatched reuse."""

    def classes(self, block_m: int, block_n: int) -> torch.Tensor:
        """Class of every (query tile, key tile) pair, as the kernels classify them.

        Args:
            block_m: Query tile size (a power of two, at least 16).
            block_n: Key tile size (likewise).

        Returns:
            ``[B, ceil(Lq / block_m), ceil(Lk / block_n)]`` int8: 0 invisible (no visible pair,
            never loaded), 1 partial, 2 fully visible (the mask predicate is skipped).
        """
        bsz, lq = self.t_q.shape
        lk = self.t_k.shape[1]
        n_m, n_k = -(-lq // block_m), -(-lk // block_n)
        out = torch.empty((bsz, n_m, n_k), dtype=torch.int8, device=self.q.device)
        _classify_kernel[(n_m, bsz)](
            self.q, self.k, out, lq, lk, self.q.shape[2], self.k.shape[2], n_k,
            BLOCK_M=block_m, BLOCK_N=block_n,
        )  # fmt: skip
        return out

    @cached_property
    def pattern(self) -> int:
        """Autotuning key of the visibility pattern (computed once, one device sync).

        From the classes at 64 x 64 tiles: ``4 * round(3 * visible) + round(3 * full)``, where
        ``visible`` is the fraction of tiles that may be visible and ``full`` the fraction of
        those that are fully visible (dense layouts, two-stream, Evo and cached decoding fall in
        different buckets).
        """
        cls = self.classes(PATTERN_TILE, PATTERN_TILE)
        counts = torch.stack([(cls != INVISIBLE.value).sum(), (cls == FULL.value).sum()]).tolist()
        visible = counts[0] / max(cls.numel(), 1)
        full = counts[1] / max(counts[0], 1)
        return 4 * round(3 * visible) + round(3 * full)


def source_key(*tensors: torch.Tensor) -> tuple:
    """What identifies the inputs of :class:`TileSummaries`: storage, shape and version."""
    return tuple((x.data_ptr(), tuple(x.shape), x.dtype, x._version) for x in tensors)


def build_summaries(t_q, o_q, t_k, o_k) -> TileSummaries:
    """Convert the (already checked) token vectors and summarise both sides."""
    tq = t_q.to(torch.float32).contiguous()
    tk = t_k.to(torch.float32).contiguous()
    oq = o_q.to(torch.int32).contiguous()
    ok = o_k.to(torch.int32).contiguous()
    return TileSummaries(
        t_q=tq,
        o_q=oq,
        t_k=tk,
        o_k=ok,
        q=side_summaries(tq, oq, query=True),
        k=side_summaries(tk, ok, query=False),
        sources=source_key(t_q, o_q, t_k, o_k),
    )
