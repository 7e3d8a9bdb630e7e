"""The time-conditioned Transformer: the one denoiser ``p_theta(x_i | z, t)`` of theory §1.

Reading order of :meth:`FlowTransformer.forward`:

1. input: ``W_in z_i`` for tokens with ``t_i < 1``; a learned null vector for ``t_i == 1`` (their
   ``z`` is not read); plus ``W_t c_i`` where ``c_i = MLP(features(t_i))`` is the token's time
   conditioning; with ``config.self_condition`` also ``W_sc x_hat_i`` for live tokens, where
   ``x_hat_i`` is the token's clean estimate from a first pass (self-conditioning, see
   :meth:`FlowTransformer.forward`);
2. ``n_layers`` pre-norm blocks with per-token low-rank adaLN-Zero modulation from ``c_i``,
   rotary positions, and attention under the visibility rule of theory §2;
3. final modulated norm, then two heads: logits over the vocabulary and a non-negative
   per-token difficulty (theory §3).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowtext.attention import plan_attention
from flowtext.errors import ConfigError, ShapeError, TimeRangeError
from flowtext.nn.cache import KVCache
from flowtext.nn.config import FlowTransformerConfig
from flowtext.nn.latents import LatentTable, _describe, _is_int
from flowtext.nn.layers import (
    Block,
    LayerInputs,
    LowRankModulation,
    TimeEmbedding,
    modulate,
    rotary,
)
from flowtext.visibility import LIVE, check_times

__all__ = ["FlowOutput", "FlowTransformer"]


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


class FlowTransformer(LatentTable, nn.Module):
    """Compact Transformer with per-token time conditioning, the shared denoiser of flowtext.

    Every token ``i`` carries a latent ``z_i`` ``[d_embed]``, a progression time ``t_i`` in
    ``[0, 1]`` (0 = committed, 1 = pure noise) and an integer order ``o_i`` (commit order if
    committed, group id if live, see :mod:`flowtext.attention.reference`). Attention always goes
    through :func:`flowtext.attention.attention`, so the visibility rules hold by construction.

    The readout is *not* tied to the embedding table: ``d_embed`` is the (typically small)
    dimension of the diffusion latent, and tying would cap the rank of the logits at ``d_embed``.

    Args:
        config: Hyperparameters.

    Example:
        >>> import torch
        >>> from flowtext.nn import FlowTransformer, FlowTransformerConfig
        >>> cfg = FlowTransformerConfig(vocab_size=16, max_len=8, d_model=32, n_layers=1,
        ...                             n_heads=2, d_embed=8, cond_dim=16, cond_rank=4)
        >>> model = FlowTransformer(cfg)
        >>> tokens = torch.randint(0, 16, (2, 8))
        >>> t = torch.full((2, 8), 0.5)
        >>> z = 0.5 * model.embed(tokens) + 0.5 * torch.randn(2, 8, 8)
        >>> out = model(z, t, torch.zeros(2, 8, dtype=torch.long))
        >>> out.logits.shape, out.difficulty.shape
        (torch.Size([2, 8, 16]), torch.Size([2, 8]))
    """

    def __init__(self, config: FlowTransformerConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.embedding = nn.Parameter(torch.empty(c.vocab_size, c.d_embed))
        self.in_proj = nn.Linear(c.d_embed, c.d_model)
        self.null = nn.Parameter(torch.empty(c.d_model))
        self.time_embed = TimeEmbedding(c.cond_dim)
        self.time_in = nn.Linear(c.cond_dim, c.d_model)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        if c.compile:  # regional: the blocks share their code, so one graph serves every layer
            for block in self.blocks:
                block.compile()
        self.final_modulation = LowRankModulation(c.cond_dim, c.cond_rank, c.d_model, n_chunks=2)
        self.readout = nn.Linear(c.d_model, c.vocab_size)
        self.difficulty_head = nn.Sequential(
            nn.Linear(c.d_model, c.d_model), nn.GELU(), nn.Linear(c.d_model, 1)
        )
        self._init_prior()  # prior_logits [V] when config.output_prior
        if c.self_condition:  # registered last: the other parameters are drawn as without it
            self.self_cond_proj = nn.Parameter(torch.zeros(c.d_model, c.d_embed))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialize: linears ``N(0, 0.02)``, zero biases, adaLN up-projections zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.embedding)
        nn.init.normal_(self.null, std=0.02 * math.sqrt(self.config.d_embed))
        for module in self.modules():
            if isinstance(module, LowRankModulation):
                module.reset_parameters()
        if self.config.output_prior:
            nn.init.zeros_(self.prior_logits)  # a uniform prior until it learns
        if self.config.self_condition:
            nn.init.zeros_(self.self_cond_proj)  # untrained, the plain one-pass network

    # ------------------------------------------------------------------ embeddings

    # ------------------------------------------------------------------ forward / cache

    def forward(
        self,
        z: Tensor,
        t: Tensor,
        o: Tensor,
        positions: Tensor | None = None,
        cache: KVCache | None = None,
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
        h, _ = self._trunk(z, t, o, positions, cache, estimate)
        return self._heads(h, z, t)

    def null_logits(self) -> Tensor:
        """Logits ``[V]`` of the null query alone: ``t = 1``, seeing only itself.

        The commit distribution of a first token under every one-jump policy (theory §3d). It
        reads no data, so no positions, mask or checks are needed: each layer's attention
        output is the token's own value. Equal to ``forward`` on that one token.

        Returns:
            ``[V]`` logits in the parameters' dtype.
        """
        if not self.config.self_condition:
            return self._null_pass(None)
        with torch.no_grad():  # the two-pass denoiser, as forward
            estimate = self.x0_hat(self._null_pass(None))
        return self._null_pass(estimate)

    def _null_pass(self, estimate: Tensor | None) -> Tensor:
        """One pass of the null query (``estimate [d_embed]``: its self-conditioning input)."""
        c = self.time_embed(self.null.new_ones(1, 1))
        c_act = F.silu(c)
        x = self.null + self.time_in(c)  # [1, 1, d_model]
        if estimate is not None:
            x = x + F.linear(estimate.to(x.dtype), self.self_cond_proj)
        x = self.drop(x)
        for block in self.blocks:
            x, _ = block(x, c_act, None)
        shift, scale = self.final_modulation(c_act)
        logits = self.readout(modulate(x, shift, scale))[0, 0]
        log_pi = self.log_prior()  # the output prior at t = 1 (None unless output_prior)
        return logits if log_pi is None else logits + log_pi

    def commit_forward(
        self,
        cache: KVCache,
        committed: tuple[Tensor, Tensor, Tensor],
        z: Tensor,
        t: Tensor,
        o: Tensor,
        positions: Tensor,
        *,
        readout: Tensor | None = None,
    ) -> tuple[FlowOutput, KVCache]:
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
        out, cache = self._fused_commit(cache, committed, z, t, o, positions, readout)
        if self.config.self_condition and bool((t > 0).any()):
            nxt, estimate = out.next_logits, self.x0_hat(out.logits.detach())
            out = self.forward(z, t, o, positions, cache, self_cond=estimate)
            out.next_logits = nxt  # a committed token's features: the same in either pass
        return out, cache

    def _fused_commit(
        self,
        cache: KVCache,
        committed: tuple[Tensor, Tensor, Tensor],
        z: Tensor,
        t: Tensor,
        o: Tensor,
        positions: Tensor,
        readout: Tensor | None,
    ) -> tuple[FlowOutput, KVCache]:
        """One trunk pass of :meth:`commit_forward` (zero self-conditioning estimate)."""
        zc, oc, pc = committed
        self._check_commit_orders(cache, oc)
        if not isinstance(t, Tensor) or t.ndim != 2:
            raise ShapeError(f"t must be [B, m], got {_describe(t)}")
        n = zc.shape[1]
        if pc.ndim == 1:
            pc = pc.expand(oc.shape)
        if positions.ndim == 1:
            positions = positions.expand(t.shape)
        t_all = torch.cat([torch.zeros(oc.shape, dtype=t.dtype, device=t.device), t], 1)
        h, kv = self._trunk(
            torch.cat([zc, z], 1),
            t_all,
            torch.cat([oc, o], 1),
            torch.cat([pc, positions], 1),
            cache,
        )
        # shapes, times and positions of both parts were checked on the concatenation
        cache = cache.append([(k[:, :, :n], v[:, :, :n]) for k, v in kv], oc, pc)
        out = self._heads(h[:, n:], z, t)
        if readout is not None:
            idx = readout.clamp_min(0).view(-1, 1, 1).expand(-1, 1, h.shape[-1])
            out.next_logits = self.readout(torch.gather(h[:, :n], 1, idx))[:, 0]
            log_pi = self.log_prior()  # the prior of the next token: no state informs it
            if log_pi is not None:
                out.next_logits = out.next_logits + log_pi
        return out, cache

    def new_cache(
        self,
        batch_size: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """An empty cache (``Lc = 0``) for ``batch_size`` rows.

        Args:
            batch_size: Number of rows ``B``.
            device: Defaults to the device of the parameters.
            dtype: Defaults to the dtype of the parameters.

        Returns:
            A :class:`KVCache` with zero tokens.
        """
        ref = self.in_proj.weight
        device = ref.device if device is None else device
        dtype = ref.dtype if dtype is None else dtype
        c = self.config
        empty = torch.zeros(batch_size, c.n_heads, 0, c.head_dim, device=device, dtype=dtype)
        idx = torch.zeros(batch_size, 0, device=device, dtype=torch.long)
        return KVCache(
            keys=(empty,) * c.n_layers, values=(empty,) * c.n_layers, orders=idx, positions=idx
        )

    def commit(self, cache: KVCache, z: Tensor, o: Tensor, positions: Tensor) -> KVCache:
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
            The extended :class:`KVCache` (``Lc + n`` tokens).

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
        _, kv = self._trunk(z, t, o, positions, cache)
        b, n = o.shape
        positions = self._positions(positions, b, n, cache.length, o.device)
        return cache.append(kv, o, positions)

    # ------------------------------------------------------------------ internals

    def _estimate(
        self,
        z: Tensor,
        t: Tensor,
        o: Tensor,
        positions: Tensor | None,
        cache: KVCache | None,
        self_cond: bool | Tensor,
    ) -> Tensor | None:
        """The self-conditioning input ``[B, L, d_embed]`` of :meth:`forward`, or ``None`` (zero).

        ``True`` on a self-conditioned network runs the first pass (no gradient: ``sg``) and
        returns its softmax-mean embedding; nothing when no token is live (all committed).
        """
        if isinstance(self_cond, Tensor):
            if not self.config.self_condition:
                raise ConfigError("a self-conditioning estimate needs config.self_condition=True")
            if self_cond.shape != getattr(z, "shape", None):
                raise ShapeError(f"the estimate must have z's shape, got {_describe(self_cond)}")
            return self_cond
        if not (self_cond and self.config.self_condition):
            return None
        self._check(z, t, o, cache)
        if not bool((t > 0).any()):
            return None
        with torch.no_grad():
            h, _ = self._trunk(z, t, o, positions, cache)
            return self.x0_hat(self._heads(h, z, t).logits)

    def _heads(self, h: Tensor, z: Tensor, t: Tensor) -> FlowOutput:
        def difficulty() -> Tensor:  # only when read: no cost where nothing trains or reads it
            feats = h.detach() if self.config.difficulty_detach else h
            return F.softplus(self.difficulty_head(feats)).squeeze(-1)

        logits, prior = self.readout(h), self.prior(z, t)  # prior: None unless output_prior
        logits = logits if prior is None else logits + prior
        return FlowOutput(logits=logits, difficulty=difficulty, hidden=h)

    @staticmethod
    def _check_commit_orders(cache: KVCache, o: Tensor) -> None:
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
        max_len = self.config.max_len
        if positions is None:
            if past + length > max_len:
                raise ShapeError(
                    f"sequence too long: {length} tokens"
                    + (f" after {past} cached" if past else "")
                    + f" exceed max_len={max_len}; crop the input or raise max_len in "
                    "FlowTransformerConfig"
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
                f"[{positions.min().item()}, {positions.max().item()}]; crop the input or raise "
                "max_len in FlowTransformerConfig"
            )
        return positions.long()

    def _check(self, z: Tensor, t: Tensor, o: Tensor, cache: KVCache | None) -> None:
        c = self.config
        if not isinstance(z, Tensor) or z.ndim != 3 or z.shape[-1] != c.d_embed:
            raise ShapeError(f"z must be [B, L, d_embed={c.d_embed}], got {_describe(z)}")
        if not torch.is_floating_point(z):
            raise ShapeError(f"z must be a floating tensor, got dtype {z.dtype}")
        b, n = z.shape[:2]
        if n == 0:
            raise ShapeError("z holds no tokens (L = 0)")
        if not isinstance(t, Tensor) or t.shape != (b, n):
            raise ShapeError(f"t must have shape [B, L] = {(b, n)}, got {_describe(t)}")
        check_times(t)
        if not isinstance(o, Tensor) or o.shape != (b, n) or not _is_int(o):
            raise ShapeError(f"o must be an integer tensor [B, L] = {(b, n)}, got {_describe(o)}")
        if cache is not None:
            if not isinstance(cache, KVCache):
                raise ShapeError(f"cache must be a KVCache, got {type(cache).__name__}")
            if cache.batch_size != b:
                raise ShapeError(f"cache holds {cache.batch_size} rows but z has {b}")
            if len(cache.keys) != c.n_layers or (
                cache.keys[0].shape[1:2] + cache.keys[0].shape[3:] != (c.n_heads, c.head_dim)
            ):
                raise ShapeError("cache was built for a different model configuration")

    def _trunk(
        self,
        z: Tensor,
        t: Tensor,
        o: Tensor,
        positions: Tensor | None,
        cache: KVCache | None,
        estimate: Tensor | None = None,
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """Final features ``[B, L, d_model]`` and each layer's ``(k, v)`` of the given tokens.

        ``estimate [B, L, d_embed]`` is the self-conditioning input (``None``: zero; read only
        with ``config.self_condition``, and only for live tokens).
        """
        self._check(z, t, o, cache)
        b, n = t.shape
        past = 0 if cache is None else cache.length
        positions = self._positions(positions, b, n, past, z.device)
        o = o.long()
        dtype = self.in_proj.weight.dtype
        # rows that share their positions (an expanded [L]) share one rotary table
        rope_pos = positions[:1] if positions.stride(0) == 0 else positions
        rope = rotary(rope_pos, self.config.head_dim, self.config.rope_base, dtype)

        # times shared by all rows and/or along each row: conditioning once per distinct time
        c = self.time_embed(_distinct_times(t))
        c_act = F.silu(c)
        noise = (t == 1)[..., None]
        z = z.to(dtype).masked_fill(noise, 0.0)  # a t = 1 token's z is never read, not even NaN
        x = torch.where(noise, self.null, self.in_proj(z)) + self.time_in(c)
        if self.config.self_condition:  # always in the graph: DDP expects a gradient for it
            est = z.new_zeros(z.shape) if estimate is None else estimate.to(dtype)
            # committed tokens get none: their keys never depend on live tokens (cacheable)
            x = x + F.linear(est.masked_fill((t == 0)[..., None], 0.0), self.self_cond_proj)
        x = self.drop(x)

        if cache is None:
            t_k, o_k = t, o
        else:
            t_k = torch.cat([t.new_zeros(b, past), t], dim=1)
            o_k = torch.cat([cache.orders, o], dim=1)
        # the token vectors' attention work (mask or tile summaries), once for every layer
        plan = plan_attention(t, o, t_k, o_k, backend=self.config.attention_backend)
        inputs = LayerInputs(rope, t, o, t_k, o_k, plan)
        kv = []
        for i, block in enumerate(self.blocks):
            layer_past = None if cache is None else (cache.keys[i], cache.values[i])
            x, layer_kv = block(x, c_act, inputs, layer_past)
            kv.append(layer_kv)
        shift, scale = self.final_modulation(c_act)
        return modulate(x, shift, scale), kv


def _distinct_times(t: Tensor) -> Tensor:
    """``t`` ``[B, L]`` cut to the dimensions it varies along, for broadcasting (one sync).

    ``[1, 1]`` when every token shares one time (a clean stream), ``[1, L]`` when every row has
    the same times (an exact bound's grid, the two-stream AR layout), ``[B, 1]`` when each row
    has one time (synchronous diffusion), else ``t`` itself.
    """
    same_rows, same_in_row = torch.stack([(t == t[:1]).all(), (t == t[:, :1]).all()]).tolist()
    return t[: 1 if same_rows else None, : 1 if same_in_row else None]
