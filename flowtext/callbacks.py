"""Lightning callbacks: print samples-so-far and bits per byte at every validation."""

from __future__ import annotations

import lightning as L
import torch
from rich.console import Console
from rich.panel import Panel

__all__ = ["SampleCallback"]


class SampleCallback(L.Callback):
    """After each validation, decode a short sample and print it with the validation scores.

    Args:
        prompt: Text the sample continues.
        length: Tokens to generate.
        policy: Decoding policy name (any registered policy, ``adaptive`` included).
        steps: Global steps for static policies (``None``: the policy's default).
        temperature: Sampling temperature of the commits.
        seed: Seed of the sampling generator (the same every time, so samples are comparable).
    """

    def __init__(
        self,
        prompt: str = "def ",
        length: int = 64,
        policy: str = "autoregressive",
        steps: int | None = None,
        temperature: float = 0.8,
        seed: int = 0,
    ) -> None:
        self.prompt = prompt
        self.length = length
        self.policy = policy
        self.steps = steps
        self.temperature = temperature
        self.seed = seed
        self.console = Console()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        tok = getattr(trainer.datamodule, "tokenizer", None)
        if tok is None or not hasattr(pl_module, "generate"):
            return
        ids = tok.encode(self.prompt)
        room = pl_module.net.config.max_len - len(ids)
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():
                out = pl_module.generate(
                    prompt=[ids],
                    length=max(1, min(self.length, room)),
                    policy=self.policy,
                    steps=self.steps,
                    temperature=self.temperature,
                    tokenizer=tok,
                    generator=torch.Generator().manual_seed(self.seed),
                )
        finally:
            pl_module.train(was_training)
        scores = "  ".join(
            f"{k.split('/')[-1]}={float(v):.3f}"
            for k, v in sorted(trainer.callback_metrics.items())
            if k.startswith("val/")
        )
        text = self.prompt + (out.text[0] if out.text else "")
        self.console.print(
            Panel(
                text,
                title=f"step {trainer.global_step}: sample ({self.policy})",
                subtitle=f"validation bits/byte: {scores}",
                expand=False,
            )
        )
