"""What flowtext's backbones share around their trunk: the forward, commit and cache passes.

:class:`~flowtext.nn.FlowTransformer` and :class:`~flowtext.nn.hf_backbone.PretrainedBackbone`
differ only in their trunk (how given tokens become final features and per-layer keys and
values) and in their heads. Everything around the trunk is written once here, in
:class:`FlowBackbone`: the self-conditioned :meth:`~FlowBackbone.forward`,
:meth:`~FlowBackbone.commit`, the fused :meth:`~FlowBackbone.commit_forward`,
:meth:`~FlowBackbone.new_cache`, positions and the commit-order checks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Generic, TypeVar

import torch
from torch import Tensor, nn

from flowtext.errors import ConfigError, ShapeError, TimeRangeError
from flowtext.nn.cache import LayerCache
from flowtext.nn.latents import LatentTable, _describe, _is_int
from flowtext.visibility import LIVE

__all__ = ["FlowBackbone", "FlowOutput"]

CacheT = TypeVar("CacheT", bound=LayerCache)

Trunk = tuple[Tensor, list[tuple[Tensor, Tensor]], dict[str, Tensor]]
"""``(h [B, L, d_model], per-layer (k, v), the cache's other per-token fields [B, L])``."""


class FlowOutput:
    """What the backbone predicts for every given token.

    Attributes:
        logits: Clean-token logits ``[B, L, V]``: ``softmax`` gives ``p_theta(x_i | z, t)``. For
            a committed token the readout predicts the *next* token: its logits are the commit
            distribution of token ``i + 1`` when that token jumps from ``t = 1`` to 0 after a
            committed prefix in position order (theory §3d).
        hidden: Final features ``[B, L, d_model]`` that both heads read.
        next_logits: In commit passes that ask for it (``readout=``), the logits ``[B, V]`` of
            one committed token per row; otherwise ``None``.

    Args:
        logits: As the attribute.
        difficulty: The difficulty ``[B, L]``, or a function computing it on first access.
        hidden: As the attribute.
        next_logits: As the attribute.
    """

    def __init__(
        self,
        logits: Tensor,
        difficulty: Tensor | Callable[[], Tensor],
        hidden: Tensor | None = None,
        next_logits: Tensor | None = None,
    ) -> None:
        self.logits, self.hidden, self.next_logits = logits, hidden, next_logits
        self._difficulty = difficulty

    @property
    def difficulty(self) -> Tensor:
        """Progression-time head ``g_theta(z, t)`` ``[B, L]`` (non-negative, computed on first use).

        The predicted commit loss of each token (theory §3).
        """
        if callable(self._difficulty):
            self._difficulty = self._difficulty()
        return self._difficulty


class FlowBackbone(LatentTable, nn.Module, Generic[CacheT]):
    """Base of flowtext's backbones: the passes around a trunk, with an exact cache.

    A subclass sets ``_cache_type`` and provides the trunk and heads (below); the latent table
    and the output prior come from :class:`~flowtext.nn.latents.LatentTable`.

    Attributes:
        _trunk: ``(z, t, o, positions, cache, estimate=None) -> (h, kv, fields)``: final features
            ``[B, L, d_model]``, each layer's ``(k, v)`` and the cache's other per-token fields
            (:data:`Trunk`) of the given tokens; ``estimate [B, L, d_embed]`` is the
            self-conditioning input (``None``: zero).
        _heads: ``(h, z, t) -> FlowOutput``: logits (output prior included) and difficulty.
        _logits: ``h [..., d_model] -> [..., V]``: the readout alone.
        _check: ``(z, t, o, cache) -> None``: raise on wrong inputs of a pass.
        _kv_shape: ``() -> (heads, head_dim)`` of the cached keys and values.
    """

    _cache_type: ClassVar[type[LayerCache]]
    _max_len_advice: ClassVar[str] = "crop the input"
    """How to fix a position beyond ``max_len`` (the end of that error message)."""
    _trunk: Callable[..., Trunk]
    _heads: Callable[[Tensor, Tensor, Tensor], FlowOutput]
    _logits: Callable[[Tensor], Tensor]
    _check: Callable[[Tensor, Tensor, Tensor, Any], None]
    _kv_shape: Callable[[], tuple[int, int]]

    def forward(
        self,
        z: Tensor,
        t: Tensor,
        o: Tensor,
        positions: Tensor | None = None,
        cache: CacheT | None = None,
        *,
        self_cond: bool | Tensor = True,
    ) -> FlowOutput:
        """Predict clean tokens and difficulties for every given token.

        Without a cache the given tokens are the whole state (single stream, or the ``2L``
        two-stream layout of :func:`flowtext.attention.two_stream_layout` with
        ``positions = arange(L).repeat(2)``). With a cache the given tokens are the queries and
        attend to the cached committed tokens and to each other; the cache is not modified.

        Args:
            z: Latents ``[B, L, d_embed]``. Rows with ``t == 1`` are not read (may hold anything).
            t: Progression times ``[B, L]`` in ``[0, 1]``.
            o: Orders ``[B, L]`` (integer): commit order for ``t == 0``, group for ``t > 0``
                (:data:`~flowtext.attention.LIVE` while sampling).
            positions: Positions ``[B, L]`` or ``[L]`` (integer) in ``[0, max_len)``; default
                ``Lc + arange(L)`` where ``Lc`` is the cache length (0 without a cache).
            cache: Committed tokens' keys and values from :meth:`commit`, or ``None``.
            self_cond: Read only with ``config.self_condition`` (docs/theory.md §3g). ``True``:
                the self-conditioned denoiser ``f(z, sg(x_hat(f(z, 0))))``, two passes (what
                every bound and the decoder read); ``False``: one pass with a zero estimate (the
                training batches without a first pass); a tensor ``[B, L, d_embed]``: one pass
                with that estimate (rows of committed tokens are not read).

        Returns:
            :class:`FlowOutput` with ``logits [B, L, V]``, ``difficulty [B, L]``,
            ``hidden [B, L, d_model]``.

        Raises:
            ShapeError: Wrong shapes or dtypes, or positions beyond ``max_len``.
            TimeRangeError: ``t`` outside ``[0, 1]``.
            ConfigError: An estimate tensor for a network without self-conditioning.
        """
        estimate = self._estimate(z, t, o, positions, cache, self_cond)
        h = self._trunk(z, t, o, positions, cache, estimate)[0]
        return self._heads(h, z, t)

    def commit_forward(
        self,
        cache: CacheT,
        committed: tuple[Tensor, Tensor, Tensor],
        z: Tensor,
        t: Tensor,
        o: Tensor,
        positions: Tensor,
        *,
        readout: Tensor | None = None,
    ) -> tuple[FlowOutput, CacheT]:
        """:meth:`commit` new tokens and evaluate queries against the result in one pass.

        Equal to ``cache = commit(cache, *committed)`` followed by
        ``forward(z, t, o, positions, cache)``, but one trunk pass runs both: the committed
        tokens (order ``<`` every live order) never attend to the queries, so their keys and
        values are the ones :meth:`commit` computes (theory §2), and the queries see them. With
        ``config.self_condition`` that pass is the first one; the queries' second pass runs
        against the extended cache (committed tokens have no estimate, so the cache is exact).

        Args:
            cache: Current cache (unchanged; a new one is returned).
            committed: ``(z_c [B, n, d_embed], o_c [B, n], positions_c [B, n] or [n])`` of the
                newly committed tokens, as for :meth:`commit` (padding has order ``LIVE``).
            z: Query latents ``[B, m, d_embed]``.
            t: Query times ``[B, m]``.
            o: Query orders ``[B, m]``.
            positions: Query positions ``[B, m]`` or ``[m]``.
            readout: Optional ``[B]`` index of one committed token per row (``0..n-1``; ``-1``
                = none, those rows get the first one's): its logits come back as
                ``next_logits [B, V]``, the commit distribution of the token after it
                (theory §3d). The pass computes its features anyway; only the readout is added.

        Returns:
            ``(FlowOutput of the m queries, cache extended by the n committed tokens)``.

        Raises:
            ShapeError: Wrong shapes or dtypes, or positions beyond ``max_len``.
            TimeRangeError: Commit orders above ``LIVE`` or not after the cached ones.
        """
        out, cache = self._fused_pass(cache, committed, (z, t, o, positions), readout)
        if self._self_conditioned and bool((t > 0).any()):
            nxt, estimate = out.next_logits, self.x0_hat(out.logits.detach())
            out = self.forward(z, t, o, positions, cache, self_cond=estimate)
            out.next_logits = nxt  # a committed token's features: the same in either pass
        return out, cache

    def new_cache(
        self,
        batch_size: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> CacheT:
        """An empty cache (``Lc = 0``) for ``batch_size`` rows.

        Args:
            batch_size: Number of rows ``B``.
            device: Defaults to the device of the parameters.
            dtype: Defaults to the dtype of the parameters.

        Returns:
            A cache of this backbone's type with zero tokens.
        """
        ref = self.embedding
        device = ref.device if device is None else device
        dtype = ref.dtype if dtype is None else dtype
        heads, head_dim = self._kv_shape()
        empty = self._cache_type.empty(
            self.config.n_layers, batch_size, heads, head_dim, device=device, dtype=dtype
        )
        return empty  # type: ignore[return-value]  # _cache_type is CacheT in every subclass

    def commit(self, cache: CacheT, z: Tensor, o: Tensor, positions: Tensor) -> CacheT:
        """Run newly committed tokens (``t = 0``) and return the cache extended by them.

        The new tokens attend to the cached tokens and to each other under the visibility rule
        (committed queries see committed keys of order ``<=`` their own), which is exactly what
        they see in a full forward pass: the result is exact, not an approximation.

        Every row appends the same number ``n`` of tokens. A row that commits fewer tokens can be
        padded with dummy tokens of order :data:`~flowtext.attention.LIVE`: such entries are
        invisible to every other query, now and later.

        Args:
            cache: Current cache (unchanged; a new one is returned).
            z: Committed latents ``[B, n, d_embed]`` (normally ``embed(tokens)``).
            o: Their commit orders ``[B, n]`` (integer, ``<= LIVE``); per row, every non-padding
                order must exceed every non-padding order already cached (commits come in order;
                tokens committed in the same step share an order).
            positions: Their positions ``[B, n]`` or ``[n]`` (integer) in ``[0, max_len)``.

        Returns:
            The extended cache (``Lc + n`` tokens).

        Raises:
            ShapeError: Wrong shapes or dtypes, or positions beyond ``max_len``.
            TimeRangeError: Orders above ``LIVE`` or not after the cached ones.
        """
        if not isinstance(o, Tensor) or not _is_int(o):
            raise ShapeError(f"o must be an integer tensor [B, n], got {_describe(o)}")
        if positions is None:
            raise ShapeError("commit needs explicit positions [B, n] of the committed tokens")
        if isinstance(z, Tensor) and z.ndim == 3 and z.shape[1] == 0:
            return cache
        o = o.long()
        self._check_commit_orders(cache, o)
        t = torch.zeros(o.shape, device=o.device, dtype=torch.float32)
        _, kv, fields = self._trunk(z, t, o, positions, cache)
        b, n = o.shape
        positions = self._positions(positions, b, n, cache.length, o.device)
        return cache._extended(kv, o, positions, **fields)

    # ------------------------------------------------------------------ internals

    @property
    def _self_conditioned(self) -> bool:
        return bool(getattr(self.config, "self_condition", False))

    def _estimate(
        self,
        z: Tensor,
        t: Tensor,
        o: Tensor,
        positions: Tensor | None,
        cache: CacheT | None,
        self_cond: bool | Tensor,
    ) -> Tensor | None:
        """The self-conditioning input ``[B, L, d_embed]`` of :meth:`forward`, or ``None`` (zero).

        ``True`` on a self-conditioned network runs the first pass (no gradient: ``sg``) and
        returns its softmax-mean embedding; nothing when no token is live (all committed).
        """
        if isinstance(self_cond, Tensor):
            if not self._self_conditioned:
                raise ConfigError("a self-conditioning estimate needs config.self_condition=True")
            if self_cond.shape != getattr(z, "shape", None):
                raise ShapeError(f"the estimate must have z's shape, got {_describe(self_cond)}")
            return self_cond
        if not (self_cond and self._self_conditioned):
            return None
        self._check(z, t, o, cache)
        if not bool((t > 0).any()):
            return None
        with torch.no_grad():
            h = self._trunk(z, t, o, positions, cache)[0]
            return self.x0_hat(self._heads(h, z, t).logits)

    def _fused_pass(
        self,
        cache: CacheT,
        committed: tuple[Tensor, Tensor, Tensor],
        queries: tuple[Tensor, Tensor, Tensor, Tensor],
        readout: Tensor | None,
    ) -> tuple[FlowOutput, CacheT]:
        """The one trunk pass of :meth:`commit_forward` (a zero self-conditioning estimate).

        ``committed = (z_c, o_c, positions_c)`` and ``queries = (z, t, o, positions)`` as there.
        """
        zc, oc, pc = committed
        z, t, o, positions = queries
        self._check_commit_orders(cache, oc)
        if not isinstance(t, Tensor) or t.ndim != 2:
            raise ShapeError(f"t must be [B, m], got {_describe(t)}")
        n = zc.shape[1]
        pc = pc.expand(oc.shape) if pc.ndim == 1 else pc
        positions = positions.expand(t.shape) if positions.ndim == 1 else positions
        t_all = torch.cat([torch.zeros(oc.shape, dtype=t.dtype, device=t.device), t], 1)
        h, kv, fields = self._trunk(
            torch.cat([zc, z], 1),
            t_all,
            torch.cat([oc, o], 1),
            torch.cat([pc, positions], 1),
            cache,
        )
        # shapes, times and positions of both parts were checked on the concatenation
        kv_c = [(k[:, :, :n], v[:, :, :n]) for k, v in kv]
        cache = cache._extended(kv_c, oc, pc, **{k: x[:, :n] for k, x in fields.items()})
        out = self._heads(h[:, n:], z, t)
        if readout is not None:
            out.next_logits = self._next_logits(h[:, :n], readout)
        return out, cache

    def _next_logits(self, h: Tensor, readout: Tensor) -> Tensor:
        """Logits ``[B, V]`` of token ``readout [B]`` (``-1``: the first) of each row of ``h``."""
        idx = readout.clamp_min(0).view(-1, 1, 1).expand(-1, 1, h.shape[-1])
        logits = self._logits(torch.gather(h, 1, idx))[:, 0]
        log_pi = self.log_prior()  # the prior of the next token: no state informs it
        return logits if log_pi is None else logits + log_pi

    @staticmethod
    def _check_commit_orders(cache: LayerCache, o: Tensor) -> None:
        if not isinstance(o, Tensor) or not _is_int(o):
            raise ShapeError(f"o must be an integer tensor [B, n], got {_describe(o)}")
        if bool((o > LIVE).any()):
            raise TimeRangeError(f"commit orders must be <= LIVE={LIVE} (LIVE marks padding)")
        if cache.length and o.shape[0] == cache.batch_size:
            low = torch.iinfo(torch.long).min
            prev = torch.where(cache.orders < LIVE, cache.orders, low).amax(dim=1)
            new = torch.where(o < LIVE, o, LIVE).amin(dim=1)
            if bool((new <= prev).any()):
                row = int((new <= prev).nonzero()[0, 0])
                raise TimeRangeError(
                    f"commit orders must increase: row {row} commits order {int(new[row])} but "
                    f"the cache already holds order {int(prev[row])}"
                )

    def _positions(
        self, positions: Tensor | None, batch: int, length: int, past: int, device: torch.device
    ) -> Tensor:
        max_len, advice = self.config.max_len, self._max_len_advice
        if positions is None:
            if past + length > max_len:
                raise ShapeError(
                    f"sequence too long: {length} tokens"
                    + (f" after {past} cached" if past else "")
                    + f" exceed max_len={max_len}; {advice}"
                )
            return torch.arange(past, past + length, device=device).expand(batch, length)
        if not isinstance(positions, Tensor) or not _is_int(positions):
            raise ShapeError(f"positions must be an integer tensor, got {_describe(positions)}")
        if positions.shape == (length,):
            positions = positions.expand(batch, length)
        if positions.shape != (batch, length):
            raise ShapeError(
                f"positions must have shape [B, L] = {(batch, length)} or [L], got "
                f"{tuple(positions.shape)}"
            )
        if positions.numel() and (positions.min() < 0 or positions.max() >= max_len):
            raise ShapeError(
                f"positions must lie in [0, max_len={max_len}); got range "
                f"[{positions.min().item()}, {positions.max().item()}]; {advice}"
            )
        return positions.long()
