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
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowtext.attention import plan_attention
from flowtext.errors import ShapeError
from flowtext.nn.backbone import FlowBackbone, FlowOutput, Trunk
from flowtext.nn.cache import KVCache
from flowtext.nn.config import FlowTransformerConfig
from flowtext.nn.latents import _describe, _is_int
from flowtext.nn.layers import (
    Block,
    LayerInputs,
    LowRankModulation,
    TimeEmbedding,
    modulate,
    rotary,
)
from flowtext.visibility import check_times

__all__ = ["FlowOutput", "FlowTransformer"]


class FlowTransformer(FlowBackbone[KVCache]):
    """Compact Transformer with per-token time conditioning, the shared denoiser of flowtext.

    Every token ``i`` carries a latent ``z_i`` ``[d_embed]``, a progression time ``t_i`` in
    ``[0, 1]`` (0 = committed, 1 = pure noise) and an integer order ``o_i`` (commit order if
    committed, group id if live, see :mod:`flowtext.attention.reference`). Attention always goes
    through :func:`flowtext.attention.attention`, so the visibility rules hold by construction.

    The readout is *not* tied to the embedding table: ``d_embed`` is the (typically small)
    dimension of the diffusion latent, and tying would cap the rank of the logits at ``d_embed``.

    :meth:`forward`, :meth:`commit`, :meth:`commit_forward` and :meth:`new_cache` are
    :class:`~flowtext.nn.backbone.FlowBackbone`'s, around this class's trunk and heads.

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

    _cache_type = KVCache
    _max_len_advice: ClassVar[str] = "crop the input or raise max_len in FlowTransformerConfig"

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

    # ------------------------------------------------------------------ the null query

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

    # ------------------------------------------------------------------ internals

    def _logits(self, h: Tensor) -> Tensor:
        return self.readout(h)

    def _kv_shape(self) -> tuple[int, int]:
        return self.config.n_heads, self.config.head_dim

    def _heads(self, h: Tensor, z: Tensor, t: Tensor) -> FlowOutput:
        def difficulty() -> Tensor:  # only when read: no cost where nothing trains or reads it
            feats = h.detach() if self.config.difficulty_detach else h
            return F.softplus(self.difficulty_head(feats)).squeeze(-1)

        logits, prior = self.readout(h), self.prior(z, t)  # prior: None unless output_prior
        logits = logits if prior is None else logits + prior
        return FlowOutput(logits=logits, difficulty=difficulty, hidden=h)

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
    ) -> Trunk:
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
        return modulate(x, shift, scale), kv, {}  # a KVCache keeps no other per-token field


def _distinct_times(t: Tensor) -> Tensor:
    """``t`` ``[B, L]`` cut to the dimensions it varies along, for broadcasting (one sync).

    ``[1, 1]`` when every token shares one time (a clean stream), ``[1, L]`` when every row has
    the same times (an exact bound's grid, the two-stream AR layout), ``[B, 1]`` when each row
    has one time (synchronous diffusion), else ``t`` itself.
    """
    same_rows, same_in_row = torch.stack([(t == t[:1]).all(), (t == t[:, :1]).all()]).tolist()
    return t[: 1 if same_rows else None, : 1 if same_in_row else None]
