"""Input checks, the autograd Function and the functional API."""

from __future__ import annotations

import torch

from flowtext.errors import ConfigError, ShapeError, TimeRangeError
from flowtext.kernels.visibility_attention import _launch
from flowtext.kernels.visibility_attention._launch import INTERPRETED, TileConfig, resolve_tiles
from flowtext.kernels.visibility_attention._tiles import (
    BIG,
    TileSummaries,
    build_summaries,
    source_key,
)

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
"""Supported dtypes of ``q``, ``k``, ``v``."""
MAX_D = 128
"""Largest supported head dim."""


def _check_qkv(q, k, v) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise ShapeError(f"{name} must be a 4-D tensor [B, H, L, D]")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ShapeError(
            f"q, k, v must share one dtype among float16, bfloat16, float32; got "
            f"{q.dtype}, {k.dtype}, {v.dtype}"
        )
    bsz, heads, lq, d = q.shape
    if k.shape != v.shape or k.shape[:2] != (bsz, heads) or k.shape[3] != d:
        raise ShapeError(
            f"expected q [B, H, Lq, D] and k, v [B, H, Lk, D]; got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if lq > k.shape[2]:
        raise ShapeError(
            f"need Lq <= Lk (queries are the last Lq keys); got Lq={lq}, Lk={k.shape[2]}"
        )
    if not 1 <= d <= MAX_D:
        raise ShapeError(
            f"head dim {d} is not supported by the Triton kernel (1 <= D <= {MAX_D}); use "
            f'backend="sdpa"'
        )
    if len({q.device, k.device, v.device}) != 1:
        raise ShapeError("q, k, v must be on one device")
    if q.device.type != "cuda" and not INTERPRETED:
        raise ShapeError(
            f"the Triton kernel needs CUDA tensors (got {q.device.type}); use "
            f'attention(..., backend="sdpa") on this device, or set TRITON_INTERPRET=1 before '
            f"importing flowtext.kernels to run the kernel in Triton's (slow) CPU interpreter"
        )


def _check_token_shapes(t_q, o_q, t_k, o_k) -> None:
    """Shapes and dtypes of the token vectors (no device sync)."""
    (bsz, lq), lk = t_q.shape, t_k.shape[1]
    for name, x, length in (("t_q", t_q, lq), ("o_q", o_q, lq), ("t_k", t_k, lk), ("o_k", o_k, lk)):
        if tuple(x.shape) != (bsz, length):
            raise ShapeError(f"{name} must have shape {(bsz, length)}; got {tuple(x.shape)}")
    for name, t in (("t_q", t_q), ("t_k", t_k)):
        if not torch.is_floating_point(t):
            raise TimeRangeError(f"{name} must be a floating tensor, got dtype {t.dtype}")
    for name, o in (("o_q", o_q), ("o_k", o_k)):
        if o.dtype == torch.bool or torch.is_floating_point(o) or torch.is_complex(o):
            raise ShapeError(f"{name} must be an integer tensor, got dtype {o.dtype}")
    if len({x.device for x in (t_q, o_q, t_k, o_k)}) != 1:
        raise ShapeError("t_q, o_q, t_k, o_k must be on one device")


def _check_token_values(t_q, o_q, t_k, o_k) -> None:
    """Times in ``[0, 1]`` and orders in the int32 range, with one device sync for all."""
    big = BIG.value
    bad = torch.stack(
        [
            ((t_q < 0) | (t_q > 1) | t_q.isnan()).any(),
            ((t_k < 0) | (t_k > 1) | t_k.isnan()).any(),
            ((o_q < -big) | (o_q > big)).any(),
            ((o_k < -big) | (o_k > big)).any(),
        ]
    ).tolist()
    for flag, name, t in ((bad[0], "t_q", t_q), (bad[1], "t_k", t_k)):
        if flag:
            raise TimeRangeError(
                f"{name} must lie in [0, 1] (0 = committed, 1 = pure noise); got range "
                f"[{t.min().item():.4g}, {t.max().item():.4g}]"
            )
    if bad[2] or bad[3]:
        raise ShapeError(f"orders must lie in the int32 range [{-big}, {big}]")


def tile_summaries(
    t_q: torch.Tensor, o_q: torch.Tensor, t_k: torch.Tensor, o_k: torch.Tensor
) -> TileSummaries:
    """Check and summarise one set of token vectors, for reuse across attention calls.

    Every layer of a forward pass attends with the same ``(t_q, o_q, t_k, o_k)``: build this once
    and pass it as ``summaries=`` to each :func:`visibility_attention` call.

    Args:
        t_q: Query times ``[B, Lq]`` in ``[0, 1]``, any floating dtype.
        o_q: Query orders ``[B, Lq]``, integer, within int32.
        t_k: Key times ``[B, Lk]`` in ``[0, 1]``.
        o_k: Key orders ``[B, Lk]``, integer, within int32.

    Returns:
        A :class:`TileSummaries` (O(B L) memory).

    Raises:
        ShapeError: Mismatched shapes or devices, non-integer orders or orders outside int32.
        TimeRangeError: Non-floating times, or times outside ``[0, 1]`` (or NaN).
    """
    for name, x in (("t_q", t_q), ("o_q", o_q), ("t_k", t_k), ("o_k", o_k)):
        if not isinstance(x, torch.Tensor) or x.ndim != 2:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ShapeError(f"{name} must be a 2-D tensor [B, L]; got {got}")
    _check_token_shapes(t_q, o_q, t_k, o_k)
    _check_token_values(t_q, o_q, t_k, o_k)
    return build_summaries(t_q, o_q, t_k, o_k)


def _summaries_for(q, k, t_q, o_q, t_k, o_k, summaries: TileSummaries | None) -> TileSummaries:
    """Build the summaries, or check that the given ones were built from these vectors."""
    for name, x, length in (("t_q", t_q, q.shape[2]), ("t_k", t_k, k.shape[2])):
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != (q.shape[0], length):
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ShapeError(f"{name} must have shape {(q.shape[0], length)}; got {got}")
    if summaries is None:
        summaries = tile_summaries(t_q, o_q, t_k, o_k)
    elif not isinstance(summaries, TileSummaries):
        raise ConfigError(f"summaries must be a TileSummaries; got {type(summaries).__name__}")
    elif summaries.sources != source_key(t_q, o_q, t_k, o_k):
        raise ConfigError(
            "summaries were built from other (or since modified) t_q, o_q, t_k, o_k; build them "
            "with tile_summaries(t_q, o_q, t_k, o_k) from the tensors passed here"
        )
    if summaries.t_q.device != q.device:
        raise ShapeError(f"token vectors on {summaries.t_q.device} but q on {q.device}")
    return summaries


class VisibilityAttentionFunction(torch.autograd.Function):
    """Autograd wrapper of the fused kernels; gradients flow to ``q``, ``k`` and ``v`` only.

    Call through :func:`visibility_attention`, which validates the inputs.
    """

    @staticmethod
    def forward(ctx, q, k, v, summaries, tiles):  # noqa: D102
        out, lse, _ = _launch.forward(q, k, v, summaries, tiles)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.summaries, ctx.tiles = summaries, tiles
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _launch.backward(grad_out, q, k, v, out, lse, ctx.summaries, ctx.tiles)
        return dq, dk, dv, None, None


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
    summaries: TileSummaries | None = None,
) -> torch.Tensor:
    r"""Fused attention under the visibility rules of theory §2, differentiable in ``q, k, v``.

    Computes :math:`\mathrm{softmax}(q k^\top / \sqrt{D} + \log M)\, v` where
    :math:`M` is :func:`flowtext.attention.visibility_mask` ``(t_q, o_q, t_k, o_k)``, without ever
    forming :math:`M` (memory is ``O(B H L D)``): invisible tiles are skipped and fully visible
    tiles run without the mask predicate.

    Args:
        q: Queries ``[B, H, Lq, D]`` (float16, bfloat16 or float32; ``D <= 128``).
        k: Keys ``[B, H, Lk, D]``, same dtype, ``Lk >= Lq``; query ``i`` is key ``Lk - Lq + i``.
        v: Values ``[B, H, Lk, D]``, same dtype.
        t_q: Query times ``[B, Lq]`` in ``[0, 1]``.
        o_q: Query orders ``[B, Lq]`` (commit order, or group for live tokens), integer.
        t_k: Key times ``[B, Lk]`` in ``[0, 1]``.
        o_k: Key orders ``[B, Lk]``, integer.
        single_config: ``False`` autotunes the tile sizes (keyed on lengths, head dim, dtype and
            visibility pattern); ``True`` uses the default :class:`TileConfig`; a
            :class:`TileConfig` uses that one. The environment variable
            ``FLOWTEXT_TRITON_SINGLE_CONFIG=1`` turns ``False`` into ``True``; under the Triton
            interpreter a bool means 16 x 16 tiles.
        summaries: The :func:`tile_summaries` of exactly these ``t_q, o_q, t_k, o_k``, to reuse
            across calls (skips the conversions, the value checks and their device sync).

    Returns:
        Attention output ``[B, H, Lq, D]`` in the dtype of ``q`` (a fresh contiguous tensor).

    Raises:
        ShapeError: Mismatched shapes, dtypes or devices, an unsupported head dim, orders outside
            int32, or CPU tensors without ``TRITON_INTERPRET=1``.
        TimeRangeError: Times outside ``[0, 1]`` (or NaN).
        ConfigError: A ``single_config`` that is neither a bool nor a :class:`TileConfig`, or
            ``summaries`` built from other token vectors.
    """
    _check_qkv(q, k, v)
    summaries = _summaries_for(q, k, t_q, o_q, t_k, o_k, summaries)
    tiles = resolve_tiles(single_config)
    if q.shape[2] == 0:
        return q.new_zeros(q.shape)
    return VisibilityAttentionFunction.apply(q, k, v, summaries, tiles)
