"""A pretrained Hugging Face causal LM's trunk as the flow backbone (optional ``hf`` extra).

:class:`PretrainedBackbone` has the interface of :class:`~flowtext.nn.FlowTransformer`
(``embed``, ``embedding_table``, ``x0_hat``, ``forward(z, t, o, positions, cache)``, ``commit``,
``commit_forward``, ``new_cache``, ``config``), so the objectives, the Lightning modules and the
decoder use it unchanged. Every weight of the pretrained model is reused; the flow adds, on top:

* a latent table ``e(v)`` ``[V, d_embed]`` (a random projection of the pretrained input
  embeddings, so that similar tokens start with similar latents);
* a noisy-input projection ``W_in z_i`` and a time conditioning ``W_t c(t_i)`` at the input and
  a low-rank shift ``U_l c(t_i)`` before every layer, all **zero at initialization**;
* a progression-time (difficulty) head whose output layer starts at zero.

**How the AR special case reproduces the pretrained model.** A causal LM reads token ``x_j`` at
position ``j`` and predicts ``x_{j+1}`` there; a flow token ``i`` must predict its own ``x_i``.
So every token is run as one pretrained position:

* a committed token (``t_i = 0``) is the pretrained model at position ``i`` reading ``x_i``
  (recovered exactly from ``z_i = e(x_i)``), and attends to the committed tokens the visibility
  rule allows (commit order ``<=`` its own: causal when orders follow positions);
* a live token (``t_i > 0``) whose left neighbour ``i - 1`` is committed *and visible to it*
  becomes a replica of that neighbour: it reads ``x_{i-1}`` at position ``i - 1`` and does not
  attend to itself (its own key would duplicate the neighbour's). Otherwise it reads a learned
  null input at position ``max(i - 1, 0)`` and attends to itself as usual.

In the AR two-stream layout the noisy token ``i`` (``t = 1``, group ``i``) sees the clean tokens
``0..i-1``; it is the replica of clean token ``i - 1``, so by induction over layers its
features equal the pretrained model's at position ``i - 1`` reading ``x_{0..i-1}``, and its logits
are the pretrained next-token logits for ``x_i``, exactly, while the adapters are zero. (Token
0 has no left neighbour: the pretrained model, without a BOS, does not predict it either.)
Attention is SDPA under :func:`flowtext.attention.visibility_mask` minus the replicas' own keys:
never more than the visibility rule allows, so committed tokens stay cacheable (theory §2).

Supported families: GPT-2 (learned positions) and Llama, Mistral, Qwen2, Qwen3 (rotary). Nothing
is downloaded: models load from a local directory (``local_files_only``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowtext.attention import visibility_mask
from flowtext.errors import ConfigError, ShapeError
from flowtext.nn.backbone import FlowBackbone, FlowOutput, Trunk
from flowtext.nn.cache import LayerCache
from flowtext.nn.layers import LowRankModulation, TimeEmbedding
from flowtext.visibility import check_times

__all__ = [
    "SUPPORTED_FAMILIES",
    "AdapterConfig",
    "PretrainedBackbone",
    "PretrainedCache",
    "PretrainedFlowConfig",
    "require_transformers",
]

SUPPORTED_FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "qwen3")
"""``config.model_type`` values whose trunk :class:`PretrainedBackbone` knows how to run."""

_ATTENTION = "flowtext_visibility"
_DROPOUTS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout", "hidden_dropout")


def require_transformers() -> Any:
    """The ``transformers`` module, or a :class:`ConfigError` naming the extra to install."""
    try:
        import transformers
    except ImportError as err:
        raise ConfigError(
            f"pretrained backbones need the Hugging Face extra: pip install 'flowtext[hf]' ({err})"
        ) from None
    transformers.AttentionInterface.register(_ATTENTION, _visibility_attention)
    return transformers


@dataclass
class AdapterConfig:
    """What the flow adds on top of a pretrained trunk (all of it zero-initialized)."""

    d_embed: int = 64
    """Dimension of the token latent ``z``; latents have norm ``sqrt(d_embed)``."""
    cond_dim: int = 128
    """Width of the per-token time conditioning (and of its sinusoidal features)."""
    cond_rank: int = 16
    """Rank of each layer's time shift ``cond_dim -> cond_rank -> d_model``."""
    max_len: int | None = None
    """Context length; ``None``: the pretrained model's ``max_position_embeddings``."""
    seed: int = 0
    """Seed of the random projection that initializes the latent table."""
    output_prior: bool = False
    """Add each token's Bayes posterior logits under a learned unigram prior to the readout."""

    def __post_init__(self) -> None:
        for name in ("d_embed", "cond_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.cond_dim, int) or self.cond_dim < 2 or self.cond_dim % 2:
            raise ConfigError(f"cond_dim must be an even integer >= 2, got {self.cond_dim!r}")
        if self.max_len is not None and (not isinstance(self.max_len, int) or self.max_len < 2):
            raise ConfigError(f"max_len must be an integer >= 2 or None, got {self.max_len!r}")


@dataclass(frozen=True)
class PretrainedFlowConfig:
    """The sizes the objectives, Lightning modules and decoder read from ``net.config``.

    Attributes:
        vocab_size: Ids ``V`` (the pretrained output layer's size).
        max_len: Context length (at most the pretrained one, and its sliding window if any).
        d_embed: Latent dimension.
        d_model: Width of the pretrained residual stream.
        n_layers: Pretrained layers.
        model_type: The Hugging Face ``model_type`` (``gpt2``, ``llama``, ...).
        dropout: The pretrained model's largest dropout rate (the flow's own parts have none);
            non-zero makes training seed the global generator per batch, for exact resumes.
        difficulty_detach: The difficulty head reads detached features.
        output_prior: The readout adds the output prior (``AdapterConfig.output_prior``).
    """

    vocab_size: int
    max_len: int
    d_embed: int
    d_model: int
    n_layers: int
    model_type: str
    dropout: float = 0.0
    difficulty_detach: bool = True
    output_prior: bool = False


@dataclass(frozen=True, eq=False)
class PretrainedCache(LayerCache):
    """Keys and values of committed tokens, plus what replicas need: their ids.

    Attributes:
        keys: One tensor per layer, ``[B, H_kv, Lc, Dh]`` (positions already applied).
        values: One tensor per layer, ``[B, H_kv, Lc, Dh]``.
        orders: Commit orders ``[B, Lc]`` (int64); ``LIVE`` marks padding.
        positions: Positions ``[B, Lc]`` (int64).
        ids: Token ids ``[B, Lc]`` (int64), read by live tokens to their right.
    """

    ids: Tensor

    def append(
        self, kv: list[tuple[Tensor, Tensor]], orders: Tensor, positions: Tensor, ids: Tensor
    ) -> PretrainedCache:
        """A new cache with ``n`` more tokens per row (``kv`` per layer ``[B, H_kv, n, Dh]``)."""
        return self._extended(kv, orders, positions, ids=ids)


@dataclass
class _Pass:
    """What the attention function of one trunk pass reads and records."""

    mask: Tensor  # [B, 1, Lq, Lk] bool
    past: PretrainedCache | None
    new_kv: list[tuple[Tensor, Tensor] | None]


def _visibility_attention(
    module: Any,  # a transformers attention module (its layer_idx is a plain int)
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    flow_pass: _Pass | None = None,
    **_: Any,
) -> tuple[Tensor, None]:
    """Attention of one pretrained layer under the flow's mask (a Hugging Face interface).

    ``query`` ``[B, H, Lq, Dh]``; ``key``, ``value`` ``[B, H_kv, Lq, Dh]`` of the given tokens;
    the cached keys are prepended. Returns ``[B, Lq, H, Dh]`` as the interface expects.
    """
    if flow_pass is None:
        raise ConfigError("the flowtext attention runs only inside PretrainedBackbone")
    layer = module.layer_idx
    flow_pass.new_kv[layer] = (key, value)
    if flow_pass.past is not None:
        key = torch.cat([flow_pass.past.keys[layer], key], 2)
        value = torch.cat([flow_pass.past.values[layer], value], 2)
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=flow_pass.mask,
        dropout_p=dropout,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


def _first_id(value: Any) -> int | None:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return value if isinstance(value, int) else None


class PretrainedBackbone(FlowBackbone[PretrainedCache]):
    """A Hugging Face causal LM's trunk as the time-conditioned flow denoiser.

    Build one with :meth:`from_pretrained` (a local model directory) or :meth:`from_config`
    (a config dict, random weights: how checkpoints are rebuilt). See the module docstring for
    how the AR case equals the pretrained model at initialization. The passes are
    :class:`~flowtext.nn.backbone.FlowBackbone`'s; committed latents must be table rows
    ``e(x_i)`` (their ids are read back from them), and a commit pass's ``next_logits`` are the
    pretrained next-token logits at the read-out token's position.

    Args:
        model: A ``transformers`` causal LM of a family in :data:`SUPPORTED_FAMILIES`.
        adapter: Sizes of the flow's additions.

    Raises:
        ConfigError: An unsupported model family or bad adapter sizes.
    """

    lm: Any
    """The wrapped ``transformers`` model (typed ``Any``: its submodules vary by family)."""
    _cache_type = PretrainedCache

    def __init__(self, model: Any, adapter: AdapterConfig | None = None) -> None:
        super().__init__()
        require_transformers()
        adapter = adapter if adapter is not None else AdapterConfig()
        hf = model.config
        if hf.model_type not in SUPPORTED_FAMILIES:
            raise ConfigError(
                f"model type {hf.model_type!r} is not supported; supported: "
                f"{', '.join(SUPPORTED_FAMILIES)}"
            )
        model.config._attn_implementation = _ATTENTION
        self.lm = model
        self.adapter = adapter
        base = model.base_model
        self._learned_positions = hasattr(base, "wpe")
        d_model = model.get_input_embeddings().weight.shape[1]
        n_pos = int(getattr(hf, "max_position_embeddings", 0) or getattr(hf, "n_positions", 0))
        window = getattr(hf, "sliding_window", None)
        if window and getattr(hf, "use_sliding_window", True):  # beyond it the masks differ
            n_pos = min(n_pos, int(window)) if n_pos else int(window)
        max_len = min(adapter.max_len or n_pos, n_pos) if n_pos else adapter.max_len or 2048
        self.config = PretrainedFlowConfig(
            vocab_size=model.get_output_embeddings().weight.shape[0],
            max_len=max_len,
            d_embed=adapter.d_embed,
            d_model=d_model,
            n_layers=len(self._layers()),
            model_type=hf.model_type,
            dropout=max(float(getattr(hf, name, 0.0) or 0.0) for name in _DROPOUTS),
            output_prior=adapter.output_prior,
        )
        c, d = adapter.cond_dim, d_model
        self.embedding = nn.Parameter(torch.empty(self.config.vocab_size, adapter.d_embed))
        self.null = nn.Parameter(torch.empty(d))
        self.in_proj = nn.Linear(adapter.d_embed, d)
        self.time_embed = TimeEmbedding(c)
        self.time_in = nn.Linear(c, d)
        self.time_shift = nn.ModuleList(
            LowRankModulation(c, adapter.cond_rank, d, n_chunks=1) for _ in self._layers()
        )
        self.difficulty_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, 1))
        self._init_prior()  # prior_logits [V] when adapter.output_prior
        self.reset_adapters()
        self.to(model.get_input_embeddings().weight.dtype)
        self.train()  # from_pretrained returns eval mode; a module starts in train mode

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        adapter: AdapterConfig | None = None,
        *,
        dtype: torch.dtype = torch.float32,
    ) -> PretrainedBackbone:
        """Load a local Hugging Face causal-LM directory (never downloads).

        Args:
            path: A folder with ``config.json`` and weights (``save_pretrained`` output).
            adapter: Sizes of the flow's additions.
            dtype: Dtype of every parameter.

        Raises:
            ConfigError: Not a directory, no ``config.json``, not a causal LM, an unsupported
                family, or unreadable weights.
        """
        tf = require_transformers()
        path = Path(path).expanduser()
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ConfigError(
                f"{str(path)!r} is not a Hugging Face model directory (no config.json); give "
                "a local folder written by save_pretrained"
            )
        try:
            config = tf.AutoConfig.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError) as err:
            raise ConfigError(f"{path}/config.json is not a usable model config: {err}") from None
        _check_causal(tf, config, path)
        try:
            model = tf.AutoModelForCausalLM.from_pretrained(
                path, local_files_only=True, dtype=dtype
            )
        except (OSError, ValueError, RuntimeError) as err:
            first = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
            raise ConfigError(f"cannot load causal-LM weights from {path}: {first}") from None
        return cls(model, adapter)

    @classmethod
    def from_config(
        cls, hf_config: dict[str, Any], adapter: AdapterConfig | dict | None = None
    ) -> PretrainedBackbone:
        """Build the architecture from a config dict with random weights (then load a state).

        Args:
            hf_config: ``model.config.to_dict()`` of a supported family.
            adapter: Sizes of the flow's additions (an :class:`AdapterConfig` or its dict).

        Raises:
            ConfigError: Not a causal-LM config of a supported family.
        """
        tf = require_transformers()
        hf_config = dict(hf_config)
        model_type = hf_config.pop("model_type", None)
        if model_type not in SUPPORTED_FAMILIES:
            raise ConfigError(
                f"model type {model_type!r} is not supported; supported: "
                f"{', '.join(SUPPORTED_FAMILIES)}"
            )
        config = tf.AutoConfig.for_model(model_type, **hf_config)
        model = tf.AutoModelForCausalLM.from_config(config)
        if isinstance(adapter, dict):
            adapter = AdapterConfig(**adapter)
        return cls(model, adapter)

    def describe(self) -> dict[str, Any]:
        """Plain data to rebuild this architecture: ``{"hf_config": ..., "adapter": ...}``."""
        hf = self.lm.config.to_dict()
        hf.pop("_attn_implementation_autoset", None)
        hf["_attn_implementation"] = "sdpa"
        return {"hf_config": hf, "adapter": asdict(self.adapter)}

    def reset_adapters(self) -> None:
        """Initialize the flow's additions: zero projections and shifts, latent table, null."""
        table = self.lm.get_input_embeddings().weight.detach().float()
        gen = torch.Generator().manual_seed(self.adapter.seed)
        proj = torch.randn(table.shape[1], self.adapter.d_embed, generator=gen)
        last = self.difficulty_head[-1]
        assert isinstance(last, nn.Linear)  # the head's output layer
        with torch.no_grad():
            self.embedding.copy_(table[: self.config.vocab_size] @ proj)
            start = _first_id(self.lm.config.bos_token_id)
            start = start if start is not None else _first_id(self.lm.config.eos_token_id)
            ok = start is not None and 0 <= start < table.shape[0]
            self.null.copy_(table[start] if ok else table.mean(0))
            for layer in (self.in_proj, self.time_in, last):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
            for shift in self.time_shift:
                assert isinstance(shift, LowRankModulation)  # built so in __init__
                shift.reset_parameters()
            if self.config.output_prior:
                nn.init.zeros_(self.prior_logits)  # uniform: the pretrained readout unchanged

    def _layers(self) -> nn.ModuleList:
        base = self.lm.base_model
        return base.h if self._learned_positions else base.layers

    # ------------------------------------------------------------------ internals

    def _logits(self, h: Tensor) -> Tensor:
        return self.lm.get_output_embeddings()(h)

    def _kv_shape(self) -> tuple[int, int]:
        hf = self.lm.config
        n_heads = getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or self.config.d_model // hf.num_attention_heads
        return n_heads, head_dim

    def _heads(self, h: Tensor, z: Tensor, t: Tensor) -> FlowOutput:
        feats = h.detach() if self.config.difficulty_detach else h
        difficulty = F.softplus(self.difficulty_head(feats)).squeeze(-1)
        logits, prior = self._logits(h), self.prior(z, t)
        logits = logits if prior is None else logits + prior
        return FlowOutput(logits=logits, difficulty=difficulty, hidden=h)

    def _check(self, z: Tensor, t: Tensor, o: Tensor, cache: PretrainedCache | None) -> None:
        d = self.config.d_embed
        if not isinstance(z, Tensor) or z.ndim != 3 or z.shape[-1] != d or z.shape[1] == 0:
            raise ShapeError(f"z must be a non-empty [B, L, d_embed={d}] tensor")
        if not isinstance(t, Tensor) or t.shape != z.shape[:2]:
            raise ShapeError(f"t must have shape [B, L] = {tuple(z.shape[:2])}")
        check_times(t)
        if not isinstance(o, Tensor) or o.shape != t.shape or o.is_floating_point():
            raise ShapeError(f"o must be an integer tensor [B, L] = {tuple(t.shape)}")
        if cache is not None and (
            not isinstance(cache, PretrainedCache) or cache.batch_size != z.shape[0]
        ):
            raise ShapeError("cache must be a PretrainedCache of this model with B rows")

    def _layout(
        self, t: Tensor, o: Tensor, pos: Tensor, ids: Tensor, cache: PretrainedCache | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Attention mask ``[B, 1, L, Lk]``, input ids ``[B, L]`` and replica flags ``[B, L]``.

        A live token's replica source is the committed key at position ``p - 1`` that the
        visibility rule lets it see; a replica does not attend to itself.
        """
        b, n = t.shape
        past = 0 if cache is None else cache.length
        if cache is None:
            t_k, o_k, p_k, id_k = t, o, pos, ids
        else:
            t_k = torch.cat([t.new_zeros(b, past), t], 1)
            o_k = torch.cat([cache.orders, o], 1)
            p_k = torch.cat([cache.positions, pos], 1)
            id_k = torch.cat([cache.ids, ids], 1)
        visible = visibility_mask(t, o, t_k, o_k)
        left = (t_k == 0)[:, None, :] & (p_k[:, None, :] == pos[:, :, None] - 1)
        source = visible & left & (t > 0)[:, :, None]
        replica = source.any(-1)
        source_id = torch.gather(id_k, 1, source.to(torch.int8).argmax(-1))
        is_self = torch.arange(past, past + n, device=t.device)[:, None] == torch.arange(
            past + n, device=t.device
        )
        mask = visible & ~(replica[:, :, None] & is_self)
        return mask[:, None], torch.where(t == 0, ids, source_id), replica

    def _trunk(
        self,
        z: Tensor,
        t: Tensor,
        o: Tensor,
        positions: Tensor | None,
        cache: PretrainedCache | None,
        estimate: None = None,
    ) -> Trunk:
        """Final features ``[B, L, d_model]``, each layer's ``(k, v)`` and the tokens' ids.

        ``estimate`` is always ``None``: this backbone has no self-conditioning input.
        """
        self._check(z, t, o, cache)
        b, n = t.shape
        past = 0 if cache is None else cache.length
        pos = self._positions(positions, b, n, past, z.device)
        o = o.long()
        table = self.embedding_table()
        z = z.to(table.dtype).masked_fill((t == 1)[..., None], 0.0)  # t = 1: z is never read
        ids = (z @ table.T).argmax(-1)  # exact for committed latents (table rows)
        mask, in_ids, replica = self._layout(t, o, pos, ids, cache)
        live = t > 0
        x = self.lm.get_input_embeddings()(in_ids)
        x = torch.where((live & ~replica)[..., None], self.null.to(x.dtype), x)
        c = self.time_embed(t)
        x = x + self.in_proj(z).masked_fill((t == 1)[..., None], 0.0) + self.time_in(c)
        hf_pos = torch.where(live, (pos - 1).clamp_min(0), pos)
        base = self.lm.base_model
        extra: dict[str, Any] = {}
        if self._learned_positions:
            x = base.drop(x + base.wpe(hf_pos))
        else:
            extra["position_embeddings"] = base.rotary_emb(x, hf_pos)
        flow_pass = _Pass(mask=mask, past=cache, new_kv=[None] * self.config.n_layers)
        c_act = F.silu(c)
        for layer, shift in zip(self._layers(), self.time_shift):
            x = x + shift(c_act)[0]
            out = layer(x, attention_mask=None, flow_pass=flow_pass, **extra)
            x = out[0] if isinstance(out, tuple) else out
        norm = base.ln_f if self._learned_positions else base.norm
        return norm(x), flow_pass.new_kv, {"ids": ids}  # type: ignore[return-value]


def _check_causal(tf: Any, config: Any, path: Path) -> None:
    """Raise unless ``config`` describes a causal LM of a supported family."""
    causal = tf.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if config.model_type not in causal:
        raise ConfigError(
            f"{path} holds a {config.model_type!r} model, which is not a causal language model; "
            f"give a causal LM of a supported family ({', '.join(SUPPORTED_FAMILIES)})"
        )
    if config.model_type not in SUPPORTED_FAMILIES:
        raise ConfigError(
            f"{path} holds a {config.model_type!r} causal LM; supported families: "
            f"{', '.join(SUPPORTED_FAMILIES)}"
        )
