"""Host launchers of the kernels: tile configurations, autotuning, grids and arguments."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton

from flowtext.errors import ConfigError
from flowtext.kernels.visibility_attention._backward import (
    _bwd_delta_kernel,
    _bwd_kernel,
)
from flowtext.kernels.visibility_attention._forward import _fwd_kernel
from flowtext.kernels.visibility_attention._tiles import GROUP, TileSummaries

LOG2E = 1.4426950408889634
"""``log2(e)``: the softmax runs in base 2, so the score scale is ``log2(e) / sqrt(D)``."""
DELTA_BLOCK = 64
"""Rows per program of the ``delta = rowsum(dO * O)`` kernel."""
DECODE_QUERIES = 16
"""Up to this many queries the forward pass uses the decoding configurations (small tiles)."""


@dataclass(frozen=True)
class TileConfig:
    """One fixed tile configuration (the single-config mode; autotuning is the default).

    The same tile sizes are used by the forward kernel and both backward passes.
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
        g = GROUP.value
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value < g or value & (value - 1):
                raise ConfigError(f"TileConfig.{name} must be a power of two >= {g}; got {value}")


INTERPRETED = type(_fwd_kernel).__name__ == "InterpretedFunction"
"""Whether this package was imported with ``TRITON_INTERPRET=1`` (the kernels run on the CPU)."""
INTERPRETER_TILES = TileConfig(block_m=16, block_n=16)
"""Tiles under the interpreter: autotuning benchmarks, meaningless (and slow) there."""


def _configs(entries):
    """``triton.Config`` list from ``(block_m, block_n, num_warps, num_stages)`` entries."""
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m, n, w, s in entries
    ]


# Keyed on power-of-two buckets of the lengths, the padded head dim, the dtypes (Triton adds the
# argument dtypes to the key) and the visibility pattern (TileSummaries.pattern). The lists are
# short on purpose: every entry is one compilation per key on a cold cache.
_TUNE_KEY = ["LQ_KEY", "LK_KEY", "BLOCK_D", "PATTERN"]
_fwd_tuned = triton.autotune(
    _configs([(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)]), key=_TUNE_KEY
)(_fwd_kernel)
_fwd_decode_tuned = triton.autotune(_configs([(16, 64, 4, 3), (16, 128, 4, 3)]), key=_TUNE_KEY)(
    _fwd_kernel
)
_dkdv_tuned = triton.autotune(
    _configs([(32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 8, 3)]), key=_TUNE_KEY
)(_bwd_kernel)
_dq_tuned = triton.autotune(
    _configs([(128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3)]), key=_TUNE_KEY
)(_bwd_kernel)


def resolve_tiles(single_config: bool | TileConfig) -> TileConfig | None:
    """The fixed tiles to use, or ``None`` to autotune."""
    if isinstance(single_config, TileConfig):
        return single_config
    if not isinstance(single_config, bool):
        raise ConfigError(f"single_config must be a bool or a TileConfig; got {single_config!r}")
    if INTERPRETED:
        return INTERPRETER_TILES
    if single_config or os.environ.get("FLOWTEXT_TRITON_SINGLE_CONFIG", "0") == "1":
        return TileConfig()
    return None


def _bucket(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _block_d(d: int) -> int:
    return max(GROUP.value, _bucket(d))


def _strides(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(x.stride())


def _common(q: torch.Tensor) -> dict:
    """Compile-time arguments shared by all launches."""
    return {
        "BLOCK_D": _block_d(q.shape[3]),
        "PRECISION": "ieee" if q.dtype == torch.float32 else None,
        "UPCAST": INTERPRETED and q.dtype == torch.bfloat16,
    }


def _fixed(tiles: TileConfig) -> dict:
    return {
        "BLOCK_M": tiles.block_m,
        "BLOCK_N": tiles.block_n,
        "num_warps": tiles.num_warps,
        "num_stages": tiles.num_stages,
    }


def _scalars(q, k, s: TileSummaries, tiles: TileConfig | None) -> tuple:
    """Sizes, scale and autotuning keys (the pattern is only computed when autotuning)."""
    heads, lq, d = q.shape[1], q.shape[2], q.shape[3]
    pattern = 0 if tiles is not None else s.pattern
    sizes = (heads, lq, k.shape[2], s.q.shape[2], s.k.shape[2], d, LOG2E / math.sqrt(d))
    return sizes, (_bucket(lq), _bucket(k.shape[2]), pattern)


def forward(q, k, v, s: TileSummaries, tiles: TileConfig | None, *, count_tiles: bool = False):
    """Launch the forward kernel.

    Returns:
        ``(out [B, H, Lq, D], lse [B * H, Lq] float32 base 2, counts)``; ``counts`` is ``None``
        unless ``count_tiles`` (fixed tiles only): ``[B * H, n_q_tiles, 2]`` int32 holding the
        visited and the fully visible key tiles of every query tile.
    """
    bsz, heads, lq, d = q.shape
    out = torch.empty((bsz, heads, lq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((bsz * heads, lq), dtype=torch.float32, device=q.device)
    n_count = 1
    if count_tiles:
        if tiles is None:
            raise ConfigError("count_tiles needs a fixed TileConfig")
        n_count = bsz * heads * -(-lq // tiles.block_m) * 2
    count = torch.zeros(n_count, dtype=torch.int32, device=q.device)
    sizes, keys = _scalars(q, k, s, tiles)
    args = (
        q, k, v, out, lse, s.t_q, s.o_q, s.t_k, s.o_k, s.q, s.k, count,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out), *sizes, *keys,
    )  # fmt: skip
    common = {**_common(q), "COUNT_TILES": count_tiles}
    if tiles is None:
        kernel = _fwd_decode_tuned if lq <= DECODE_QUERIES else _fwd_tuned
        kernel[lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]), bsz * heads)](*args, **common)
    else:
        grid = (triton.cdiv(lq, tiles.block_m), bsz * heads)
        _fwd_kernel[grid](*args, **_fixed(tiles), **common)
    counts = count.view(bsz * heads, -1, 2) if count_tiles else None
    return out, lse, counts


def backward(do, q, k, v, out, lse, s: TileSummaries, tiles: TileConfig | None):
    """Launch the delta kernel and the two backward passes; returns ``(dq, dk, dv)``."""
    bsz, heads, lq, d = q.shape
    lk = k.shape[2]
    common = _common(q)
    delta = torch.empty((bsz * heads, lq), dtype=torch.float32, device=q.device)
    _bwd_delta_kernel[(triton.cdiv(lq, DELTA_BLOCK), bsz * heads)](
        out, do, delta, *_strides(out), *_strides(do), heads, lq, d,
        BLOCK_M=DELTA_BLOCK, BLOCK_D=common["BLOCK_D"],
    )  # fmt: skip
    dq = torch.empty((bsz, heads, lq, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((bsz, heads, lk, d), dtype=k.dtype, device=k.device)
    dv = torch.empty((bsz, heads, lk, d), dtype=v.dtype, device=v.device)
    sizes, keys = _scalars(q, k, s, tiles)
    scalars = (*sizes, 1 / math.sqrt(d), *keys)
    inputs = (*_strides(q), *_strides(k), *_strides(v), *_strides(do))
    tokens = (s.t_q, s.o_q, s.t_k, s.o_k, s.q, s.k)
    # dk and dv are fresh contiguous tensors of one shape: they share the output strides.
    dkdv_args = (q, k, v, do, dk, dv, lse, delta, *tokens, *inputs, *_strides(dk), *scalars)
    dq_args = (q, k, v, do, dq, dq, lse, delta, *tokens, *inputs, *_strides(dq), *scalars)
    if tiles is None:
        _dkdv_tuned[lambda meta: (triton.cdiv(lk, meta["BLOCK_N"]), bsz * heads)](
            *dkdv_args, KEY_PASS=True, **common
        )
        _dq_tuned[lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]), bsz * heads)](
            *dq_args, KEY_PASS=False, **common
        )
    else:
        fixed = {**_fixed(tiles), **common}
        _bwd_kernel[(triton.cdiv(lk, tiles.block_n), bsz * heads)](
            *dkdv_args, KEY_PASS=True, **fixed
        )
        _bwd_kernel[(triton.cdiv(lq, tiles.block_m), bsz * heads)](
            *dq_args, KEY_PASS=False, **fixed
        )
    return dq, dk, dv
