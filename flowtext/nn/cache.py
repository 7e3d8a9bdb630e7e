"""Exact key/value cache of committed tokens (theory §2).

A committed query only attends to committed keys, so the keys and values of committed tokens never
depend on live tokens: once computed they stay exact for the rest of decoding.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["KVCache", "LayerCache"]


@dataclass(frozen=True, eq=False)
class LayerCache:
    """Per-layer keys and values of committed tokens with their orders and positions.

    The part every backbone's cache shares (:class:`KVCache`, and the Hugging Face backbone's
    ``PretrainedCache``, which also keeps token ids). Immutable: extending returns a new cache.

    Attributes:
        keys: One tensor per layer, ``[B, H, Lc, Dh]`` (positions already applied).
        values: One tensor per layer, ``[B, H, Lc, Dh]``.
        orders: Commit orders ``[B, Lc]`` (int64).
        positions: Positions ``[B, Lc]`` (int64).
    """

    keys: tuple[Tensor, ...]
    values: tuple[Tensor, ...]
    orders: Tensor
    positions: Tensor

    @property
    def length(self) -> int:
        """Number ``Lc`` of cached tokens per row (padding included)."""
        return self.orders.shape[1]

    @property
    def batch_size(self) -> int:
        """Batch size ``B``."""
        return self.orders.shape[0]

    @classmethod
    def empty(
        cls,
        n_layers: int,
        batch_size: int,
        heads: int,
        head_dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Self:
        """A cache of ``Lc = 0`` tokens: keys and values ``[B, H, 0, Dh]``, the rest ``[B, 0]``.

        Args:
            n_layers: Layers (one key and one value tensor each).
            batch_size: Rows ``B``.
            heads: Key/value heads ``H``.
            head_dim: Head dimension ``Dh``.
            device: Device of every tensor.
            dtype: Dtype of the keys and values (the per-token fields are int64).
        """
        kv = torch.zeros(batch_size, heads, 0, head_dim, device=device, dtype=dtype)
        idx = torch.zeros(batch_size, 0, device=device, dtype=torch.long)
        per_token = {f.name: idx for f in fields(cls) if f.name not in ("keys", "values")}
        return cls(keys=(kv,) * n_layers, values=(kv,) * n_layers, **per_token)

    def _extended(
        self, kv: list[tuple[Tensor, Tensor]], orders: Tensor, positions: Tensor, **more: Tensor
    ) -> Self:
        """This cache with ``n`` more tokens per row (``more``: other ``[B, n]`` fields, int64)."""
        extra = {name: torch.cat([getattr(self, name), x.long()], 1) for name, x in more.items()}
        return replace(
            self,
            keys=tuple(torch.cat([old, k], dim=2) for old, (k, _) in zip(self.keys, kv)),
            values=tuple(torch.cat([old, v], dim=2) for old, (_, v) in zip(self.values, kv)),
            orders=torch.cat([self.orders, orders.long()], dim=1),
            positions=torch.cat([self.positions, positions.long()], dim=1),
            **extra,
        )


@dataclass(frozen=True, eq=False)
class KVCache(LayerCache):
    """Per-layer keys and values of the committed tokens, plus their orders and positions.

    Immutable: :meth:`FlowTransformer.commit <flowtext.nn.FlowTransformer.commit>` returns a new
    cache, so a decoder can keep (or branch from) earlier caches. Create an empty one with
    :meth:`FlowTransformer.new_cache <flowtext.nn.FlowTransformer.new_cache>`.

    Entries with order :data:`~flowtext.attention.LIVE` are padding: no other query can see them
    (a committed key is visible to a live query only if its order is ``< LIVE``, and to a committed
    query only if its order is ``<=`` the query's, which is ``< LIVE``).

    Attributes:
        keys: One tensor per layer, ``[B, H, Lc, Dh]`` (rotary already applied).
        values: One tensor per layer, ``[B, H, Lc, Dh]``.
        orders: Commit orders ``[B, Lc]`` (int64).
        positions: Positions ``[B, Lc]`` (int64).
    """

    def append(self, kv: list[tuple[Tensor, Tensor]], orders: Tensor, positions: Tensor) -> KVCache:
        """A new cache with ``n`` more tokens per row.

        Args:
            kv: Per layer ``(k, v)``, each ``[B, H, n, Dh]``.
            orders: Their commit orders ``[B, n]``.
            positions: Their positions ``[B, n]``.

        Returns:
            The extended cache (this one is unchanged).
        """
        return self._extended(kv, orders, positions)
