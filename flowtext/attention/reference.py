"""Reference visibility rules of theory §2: a dense boolean mask fed to PyTorch SDPA.

Every token carries a progression time ``t`` and an integer order ``o``:

* committed tokens (``t == 0``): ``o`` is the commit order, ``step * M + position`` (``M`` any bound
  on the positions): commits are ordered by step, and tokens committed in the same step by
  position, so they see each other causally (a token-causal clean stream);
* live tokens (``t > 0``): ``o`` is the *group* the token will commit with. During sampling every
  live token shares the sentinel group :data:`LIVE`; in two-stream training the noisy copy of block
  ``b`` has group ``b``.

Query ``q`` sees key ``k`` iff one of:

1. ``k`` is ``q`` itself (queries are the *last* ``Lq`` keys: query ``i`` is key ``Lk - Lq + i``);
2. ``t_k == 0`` and (``o_k <= o_q`` if ``t_q == 0`` else ``o_k < o_q``): committed keys that were
   committed no later than a committed query, or strictly before a live query's group;
3. ``t_q > 0`` and ``0 < t_k < 1`` and ``o_k == o_q``: live keys that carry information, in the
   query's own group.

So a token at ``t = 1`` is seen by nobody but itself, committed queries never see live keys (their
keys and values can be cached), and the two-stream layout of AR/block training is the same rule on
a ``2L`` sequence (see :func:`two_stream_layout`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flowtext.errors import ShapeError


def _check_layout(t_q, o_q, t_k, o_k) -> None:
    if t_q.shape != o_q.shape or t_k.shape != o_k.shape or t_q.ndim != 2 or t_k.ndim != 2:
        raise ShapeError(
            f"expected t_q, o_q of shape [B, Lq] and t_k, o_k of shape [B, Lk]; got "
            f"{tuple(t_q.shape)}, {tuple(o_q.shape)}, {tuple(t_k.shape)}, {tuple(o_k.shape)}"
        )
    if t_q.shape[1] > t_k.shape[1] or t_q.shape[0] != t_k.shape[0]:
        raise ShapeError(
            f"need the same batch and Lq <= Lk; got {tuple(t_q.shape)} vs {tuple(t_k.shape)}"
        )


def visibility_mask(
    t_q: torch.Tensor, o_q: torch.Tensor, t_k: torch.Tensor, o_k: torch.Tensor
) -> torch.Tensor:
    """Dense visibility mask of theory §2 (``True`` = query may attend to key).

    Args:
        t_q: Query times, ``[B, Lq]`` in ``[0, 1]``.
        o_q: Query orders (commit order or group), ``[B, Lq]`` integer.
        t_k: Key times, ``[B, Lk]`` with ``Lk >= Lq``.
        o_k: Key orders, ``[B, Lk]`` integer.

    Returns:
        Boolean mask ``[B, Lq, Lk]``. Query ``i`` is key ``Lk - Lq + i``.
    """
    _check_layout(t_q, o_q, t_k, o_k)
    lq, lk = t_q.shape[1], t_k.shape[1]
    tq, oq = t_q[:, :, None], o_q[:, :, None]
    tk, ok = t_k[:, None, :], o_k[:, None, :]
    q_committed = tq == 0
    k_committed = tk == 0
    committed_key = k_committed & torch.where(q_committed, ok <= oq, ok < oq)
    live_key = (~q_committed) & (tk > 0) & (tk < 1) & (ok == oq)
    idx_q = torch.arange(lk - lq, lk, device=t_q.device)[:, None]
    idx_k = torch.arange(lk, device=t_q.device)[None, :]
    return committed_key | live_key | (idx_q == idx_k)


def _all_visible_flag(t_q, o_q, t_k, o_k) -> torch.Tensor:
    """Whether :func:`sdpa_layout` may skip the mask, a 0-d bool tensor (no device sync)."""
    if t_k.shape[1] == 0:
        return torch.zeros((), dtype=torch.bool, device=t_k.device)
    group = o_k[:, :1]
    ok = (o_q == group).all() & (o_k == group).all() & (t_q > 0).all()
    return ok & (t_k > 0).all() & (t_k < 1).all()


def _causal_flag(t_q, o_q, t_k, o_k) -> torch.Tensor:
    """Whether the mask is plain causal (:func:`sdpa_layout`), 0-d bool (no device sync)."""
    if t_q.shape != t_k.shape or t_k.shape[1] == 0:
        return torch.zeros((), dtype=torch.bool, device=t_k.device)
    return (t_k == 0).all() & (o_k[:, 1:] > o_k[:, :-1]).all()


def _split_flag(t_q, o_q, t_k, o_k) -> torch.Tensor:
    """Whether the first half is a committed causal stream and the second half is live (0-d)."""
    n = t_k.shape[1] // 2
    if t_q.shape != t_k.shape or n == 0 or t_k.shape[1] != 2 * n:
        return torch.zeros((), dtype=torch.bool, device=t_k.device)
    head, tail = slice(None, n), slice(n, None)
    return (
        (t_k[:, head] == 0).all() & (o_k[:, 1:n] > o_k[:, : n - 1]).all() & (t_k[:, tail] > 0).all()
    )


def two_stream_layout(
    block_ids: torch.Tensor, t_noisy: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Times and orders of the two-stream (clean + noisy) training layout.

    The first ``L`` tokens are the clean stream (``t = 0``, order = position: block ``b`` commits
    at step ``b``, ties broken by position, and blocks are contiguous); the last ``L`` are the
    noisy stream (time of their block, group = the block's first position). With the rule of
    :func:`visibility_mask`, noisy queries of block ``b`` see the clean keys of blocks ``< b`` and
    the informative noisy keys of block ``b``; clean queries see the clean keys at positions
    ``<=`` their own: the clean stream is token-causal, a plain causal LM's stream.

    Args:
        block_ids: Block index of every position, ``[B, L]`` integer, non-decreasing.
        t_noisy: Time of every noisy-stream token, ``[B, L]`` in ``(0, 1]``.

    Returns:
        ``(t, o)``, each ``[B, 2L]``.
    """
    if block_ids.shape != t_noisy.shape:
        raise ShapeError(
            f"block_ids {tuple(block_ids.shape)} and t_noisy {tuple(t_noisy.shape)} differ"
        )
    b, length = block_ids.shape
    pos = torch.arange(length, device=block_ids.device).expand(b, length)
    starts = torch.full_like(block_ids, length).scatter_reduce(1, block_ids, pos, "amin")
    t = torch.cat([torch.zeros_like(t_noisy), t_noisy], dim=1)
    o = torch.cat([pos, torch.gather(starts, 1, block_ids)], dim=1)
    return t, o


@dataclass(frozen=True, eq=False)
class SdpaLayout:
    """How SDPA attends under one set of token vectors: built once, reused by every layer.

    Attributes:
        kind: ``"dense"`` (every pair visible: no mask, fused kernels), ``"causal"`` (the plain
            causal mask, ``is_causal=True``), ``"split"`` (a committed causal stream of
            ``prefix`` tokens, then live queries under a mask: the two-stream layout) or
            ``"mask"`` (the dense boolean mask).
        mask: The mask ``[B, 1, Lq, Lk]`` for ``"mask"``; for ``"split"`` the live queries'
            rows ``[B, 1, Lq - prefix, Lk]``; else ``None``.
        prefix: The committed stream's length for ``"split"``, else 0.
    """

    kind: str
    mask: torch.Tensor | None = None
    prefix: int = 0


def sdpa_layout(
    t_q: torch.Tensor, o_q: torch.Tensor, t_k: torch.Tensor, o_k: torch.Tensor
) -> SdpaLayout:
    """Which mask SDPA needs under the rule of :func:`visibility_mask`: none, causal, split, dense.

    Three sufficient checks, ``O(B (Lq + Lk))`` and one device sync together; the dense mask is
    built in full only when none holds. ``"dense"`` (every query sees every key: no mask): every
    query is live (``t_q > 0``), every key is live and informative (``0 < t_k < 1``), and all
    tokens of a row share one group, as in the synchronous (diffusion) single stream at
    ``0 < t < 1``. ``"causal"`` (the plain lower-triangular mask): queries are the keys
    (``Lq == Lk``), every token is committed and orders strictly increase along each row, as in
    the autoregressive stream; committed query ``i`` then sees key ``j`` iff ``o_j <= o_i`` iff
    ``j <= i``. ``"split"``: queries are the keys, the first half is such a causal stream and
    every token of the second half is live, as in the two-stream layout; committed queries never
    see live keys, so the first half attends causally among itself and only the second half's
    rows need the mask (three quarters of the dense mask's work, a quarter of it causal).

    Args:
        t_q: Query times ``[B, Lq]``.
        o_q: Query orders ``[B, Lq]``.
        t_k: Key times ``[B, Lk]``.
        o_k: Key orders ``[B, Lk]``.

    Returns:
        The :class:`SdpaLayout` for :func:`sdpa_attention`.
    """
    _check_layout(t_q, o_q, t_k, o_k)
    args = (t_q, o_q, t_k, o_k)
    flags = torch.stack([_all_visible_flag(*args), _causal_flag(*args), _split_flag(*args)])
    dense, causal, split = flags.tolist()
    if dense or causal:  # no mask tensor: fused kernels, or is_causal=True
        return SdpaLayout("dense" if dense else "causal")
    if split:  # the live half's rows of the mask (its queries are the last keys)
        n = t_k.shape[1] // 2
        return SdpaLayout("split", visibility_mask(t_q[:, n:], o_q[:, n:], t_k, o_k)[:, None], n)
    return SdpaLayout("mask", visibility_mask(t_q, o_q, t_k, o_k)[:, None])


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    t_q: torch.Tensor,
    o_q: torch.Tensor,
    t_k: torch.Tensor,
    o_k: torch.Tensor,
    *,
    upcast: bool = False,
    layout: SdpaLayout | None = None,
) -> torch.Tensor:
    """Attention under the visibility rules through a dense mask and PyTorch SDPA.

    When every pair is visible (:func:`sdpa_layout` says ``"dense"``, e.g. the diffusion single
    stream) or the mask is plain causal (``"causal"``, the autoregressive stream) no mask is
    built and SDPA may pick its fused (flash / memory-efficient) kernels; in the two-stream
    layout (``"split"``) the clean half runs causally and only the noisy half reads a mask.

    Args:
        q: Queries ``[B, H, Lq, D]``.
        k: Keys ``[B, H, Lk, D]``.
        v: Values ``[B, H, Lk, D]``.
        t_q: Query times ``[B, Lq]``.
        o_q: Query orders ``[B, Lq]``.
        t_k: Key times ``[B, Lk]``.
        o_k: Key orders ``[B, Lk]``.
        upcast: Compute in float32 and cast back (the fp32 reference of the kernel tests).
        layout: The :func:`sdpa_layout` of these token vectors, to reuse across layers
            (default: built here).

    Returns:
        Output ``[B, H, Lq, D]`` in the dtype of ``q``.
    """
    if upcast:
        mask = visibility_mask(t_q, o_q, t_k, o_k)[:, None]
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
        return out.to(q.dtype)
    if layout is None:
        layout = sdpa_layout(t_q, o_q, t_k, o_k)
    if layout.kind == "dense":
        return F.scaled_dot_product_attention(q, k, v)
    if layout.kind == "causal":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if layout.kind == "split":
        n = layout.prefix
        head = F.scaled_dot_product_attention(q[:, :, :n], k[:, :, :n], v[:, :, :n], is_causal=True)
        tail = F.scaled_dot_product_attention(q[:, :, n:], k, v, attn_mask=layout.mask)
        return torch.cat([head, tail], dim=2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=layout.mask)
