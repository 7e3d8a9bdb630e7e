"""Configuration of the time-conditioned Transformer backbone."""

from __future__ import annotations

from dataclasses import dataclass

from flowtext.attention import BACKENDS, Backend
from flowtext.errors import ConfigError

__all__ = ["FlowTransformerConfig"]


@dataclass
class FlowTransformerConfig:
    """Hyperparameters of :class:`~flowtext.nn.FlowTransformer`.

    Every field has a one-line docstring so ``jsonargparse`` can show it in ``--help``. Invalid
    combinations raise :class:`~flowtext.errors.ConfigError` at construction.
    """

    vocab_size: int = 256
    """Number of token ids ``V`` (256 for the byte-level tokenizer)."""
    max_len: int = 256
    """Context length: every position must lie in ``[0, max_len)``."""
    d_model: int = 256
    """Width of the residual stream."""
    n_layers: int = 4
    """Number of Transformer blocks."""
    n_heads: int = 4
    """Attention heads; ``d_model / n_heads`` must be an even integer (rotary embeddings)."""
    d_embed: int = 64
    """Dimension of the token latent ``z``; embeddings have norm ``sqrt(d_embed)`` (unit RMS)."""
    cond_dim: int = 128
    """Width of the per-token time conditioning vector (and of its sinusoidal features)."""
    cond_rank: int = 16
    """Rank of each block's adaLN projection ``cond_dim -> cond_rank -> 6 * d_model``."""
    mlp_ratio: float = 4.0
    """Hidden width of each block's MLP as a multiple of ``d_model``."""
    dropout: float = 0.0
    """Dropout on the input and on each residual branch."""
    attention_backend: Backend = "auto"
    """Attention backend: ``sdpa`` (dense-mask reference), ``triton`` (fused kernel), ``auto``."""
    rope_base: float = 10000.0
    """Base of the rotary position embedding frequencies."""
    difficulty_detach: bool = True
    """Feed the difficulty head detached features, so its regression does not shape the trunk."""
    compile: bool = False
    """Compile each block with ``torch.compile`` (one graph shared by all layers; same weights)."""
    output_prior: bool = False
    """Add each token's Bayes posterior logits under a learned unigram prior to the readout."""
    self_condition: bool = False
    """Self-conditioning: the denoiser runs twice, live tokens seeing their first-pass estimate."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_len", "d_model", "n_layers", "n_heads", "d_embed"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                "choose n_heads dividing d_model"
            )
        if (self.d_model // self.n_heads) % 2:
            raise ConfigError(
                f"head dimension d_model / n_heads = {self.d_model // self.n_heads} must be even "
                "for rotary embeddings"
            )
        if not isinstance(self.cond_dim, int) or self.cond_dim < 2 or self.cond_dim % 2:
            raise ConfigError(f"cond_dim must be an even integer >= 2, got {self.cond_dim!r}")
        if not isinstance(self.cond_rank, int) or self.cond_rank < 1:
            raise ConfigError(f"cond_rank must be a positive integer, got {self.cond_rank!r}")
        if not self.mlp_ratio > 0 or int(self.mlp_ratio * self.d_model) < 1:
            raise ConfigError(f"mlp_ratio must be positive, got {self.mlp_ratio!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must lie in [0, 1), got {self.dropout!r}")
        if self.attention_backend not in BACKENDS:
            raise ConfigError(
                f"unknown attention_backend {self.attention_backend!r}; "
                f"valid: {', '.join(BACKENDS)}"
            )
        for name in ("compile", "output_prior", "self_condition"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if not self.rope_base > 1:
            raise ConfigError(f"rope_base must be > 1, got {self.rope_base!r}")

    @property
    def head_dim(self) -> int:
        """Per-head width ``d_model / n_heads``."""
        return self.d_model // self.n_heads

    @property
    def mlp_hidden(self) -> int:
        """Hidden width of each block's MLP."""
        return int(self.mlp_ratio * self.d_model)
