"""A plain causal GPT in bare PyTorch: the baseline flowtext's AR special case is held to.

Nothing here is tuned; it is what a new user would write first. Token and learned position
embeddings, pre-norm blocks (LayerNorm, causal ``F.scaled_dot_product_attention``, LayerNorm,
GELU MLP), a final LayerNorm and an output head tied to the token embedding (GPT-2's choice:
fewer parameters, and with a 259-id byte vocabulary the head is small either way). Trained with
AdamW (lr 1e-3, PyTorch's default weight decay 0.01), constant learning rate, gradient norm
clipped at 1.0, no dropout.

Every window of ``L`` tokens is scored in full, as flowtext's AR bound scores it: the model
reads ``[BOS, x_0, ..., x_{L-2}]`` and predicts ``x_0, ..., x_{L-1}``, so the first token is
predicted from BOS alone and the context never exceeds ``L``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class GPTConfig:
    """Sizes of :class:`PlainGPT` (defaults: the issue's reference, 4 layers of width 256)."""

    vocab_size: int = 259
    max_len: int = 128
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: float = 4.0


class Block(nn.Module):
    """Pre-norm Transformer block: causal self-attention, then a GELU MLP, each residual."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        hidden = int(cfg.mlp_ratio * cfg.d_model)
        self.n_heads = cfg.n_heads
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, hidden), nn.GELU(), nn.Linear(hidden, cfg.d_model)
        )

    def forward(self, x: Tensor) -> Tensor:
        """``[B, L, d] -> [B, L, d]``."""
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.ln2(x))


class PlainGPT(nn.Module):
    """Causal Transformer LM: ``tokens [B, L] -> logits [B, L, V]`` (position i sees <= i)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits ``[B, L, V]`` of the next token at every position of ``tokens [B, L]``."""
        h = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            h = block(h)
        return self.ln_f(h) @ self.tok.weight.T  # head tied to the token embedding


def token_nats(model: PlainGPT, tokens: Tensor, bos_id: int) -> Tensor:
    """Per-token negative log-likelihood ``[B, L]`` in nats, every token of the window scored.

    Args:
        model: The GPT.
        tokens: ``[B, L]`` with ``L <= max_len``.
        bos_id: Token the model reads before ``x_0``.
    """
    inputs = torch.cat([torch.full_like(tokens[:, :1], bos_id), tokens[:, :-1]], 1)
    logits = model(inputs)
    return F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none")


def batches_forever(loader: Iterable) -> Iterator[Tensor]:
    """Token batches ``[B, L]`` of a loader, epoch after epoch (dicts give their ``tokens``)."""
    while True:
        for batch in loader:
            yield batch["tokens"] if isinstance(batch, dict) else batch


def make_step(
    loss_fn: Callable[[Tensor], Tensor],
    params: list[nn.Parameter],
    *,
    lr: float = 1e-3,
    clip: float = 1.0,
) -> Callable[[Tensor], Tensor]:
    """One optimizer step as a function of the batch: loss, backward, clip, AdamW.

    Args:
        loss_fn: Scalar loss of a batch ``[B, L]``.
        params: Parameters to train (one AdamW over them, constant learning rate).
        lr: Learning rate.
        clip: Gradient norm clip.

    Returns:
        ``step(batch) -> loss`` (the loss before the update).
    """
    opt = torch.optim.AdamW(params, lr=lr)

    def step(batch: Tensor) -> Tensor:
        loss = loss_fn(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        return loss

    return step


def train_for(
    loss_fn: Callable[[Tensor], Tensor],
    params: list[nn.Parameter],
    batches: Iterator[Tensor],
    seconds: float,
    *,
    lr: float = 1e-3,
    clip: float = 1.0,
) -> dict[str, float]:
    """Train with AdamW for a wall-clock budget (data loading included in the clock).

    Args:
        loss_fn: Scalar loss of a batch ``[B, L]``.
        params: Parameters to train.
        batches: Endless iterator of token batches.
        seconds: Budget; the step that crosses it is the last.
        lr: Constant learning rate.
        clip: Gradient norm clip.

    Returns:
        ``steps``, ``tokens`` (trained on), ``seconds`` (elapsed), ``cpu_seconds`` (this
        process's CPU time: less than ``seconds`` on a busy machine), ``tokens_per_s`` and
        ``last_loss``.
    """
    step = make_step(loss_fn, params, lr=lr, clip=clip)
    steps = tokens = 0
    loss = torch.tensor(float("nan"))
    t0, c0 = time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        batch = next(batches)
        loss = step(batch)
        steps, tokens = steps + 1, tokens + batch.numel()
    elapsed = time.perf_counter() - t0
    return {
        "steps": steps,
        "tokens": tokens,
        "seconds": elapsed,
        "cpu_seconds": time.process_time() - c0,
        "tokens_per_s": tokens / elapsed,
        "last_loss": loss.item(),
    }
