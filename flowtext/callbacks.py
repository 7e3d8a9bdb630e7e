"""Lightning callbacks of the training CLI.

* :class:`SampleCallback`: print a sample and the validation bits per byte at every validation.
* :class:`OptimizerOverrides`: on resume, this run's optimizer hyper-parameters (learning rate,
  weight decay, ...) win over the restored optimizer and scheduler state, logged.
* :class:`SaveOnSigterm`: on SIGTERM, save ``last.ckpt`` before Lightning stops the run.
* :class:`ProgressBar`: the rich progress bar, without ``Epoch 0/-2`` for step-bounded runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.utilities import rank_zero_info
from rich.console import Console, Group
from rich.panel import Panel
from rich.text import Text

from flowtext.lm import FlowLM

__all__ = ["OptimizerOverrides", "ProgressBar", "SampleCallback", "SaveOnSigterm"]


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
        self.prompt, self.length, self.seed = prompt, length, seed
        self.decoding: dict[str, Any] = dict(policy=policy, steps=steps, temperature=temperature)
        """The other ``generate`` settings."""
        self.console = Console()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        # Lightning sets trainer.datamodule at run time; the Trainer class does not declare it
        tok = getattr(getattr(trainer, "datamodule", None), "tokenizer", None)
        if tok is None or not isinstance(pl_module, FlowLM):
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
                    **self.decoding,
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
        body = Group(  # Text: a sample is never read as rich markup
            Text(text), Text(f"validation bits/byte: {scores}", style="dim")
        )
        title = f"step {trainer.global_step}: sample ({self.decoding['policy']})"
        self.console.print(Panel(body, title=title, title_align="left", expand=False))


class ProgressBar(RichProgressBar):
    """The rich progress bar, reading ``Epoch N`` when no epoch limit is set.

    Lightning's bar shows ``Epoch N/-2`` for ``max_epochs=-1`` (runs bounded by steps or time).
    """

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """Lightning's metrics without ``v_num`` (the log folder's number, shown as ``0.000``)."""
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items

    def _get_train_description(self, current_epoch: int) -> str:  # overrides a private hook
        epochs = self.trainer.max_epochs
        text = f"Epoch {current_epoch}" + (f"/{epochs - 1}" if epochs and epochs > 0 else "")
        return f"{text:{len(self.validation_description)}}"


_HYPER = (int, float)


def _is_hyper(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (tuple, list)):
        return bool(value) and all(_is_hyper(v) for v in value)
    return isinstance(value, _HYPER)


class OptimizerOverrides(L.Callback):
    """Make this run's optimizer hyper-parameters win over a restored optimizer state.

    Resuming restores each optimizer's ``param_groups`` (and the scheduler's ``base_lrs``)
    from the checkpoint, so ``--ckpt_path last --model.init_args.optimizer.init_args.lr 1e-4``
    would keep the old rate. At the start of training this callback builds the configured
    optimizer afresh (``pl_module.optimizer_factory``, on a dummy parameter), and every
    numeric hyper-parameter that differs from the restored one (``lr``, ``weight_decay``,
    ``betas``, ``eps``, ...) is set in the restored optimizer and logged. A learning rate goes
    into the scheduler's base rate, and the current rate keeps the schedule's factor.
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        factory = getattr(pl_module, "optimizer_factory", None)
        if trainer.ckpt_path is None or factory is None or len(trainer.optimizers) != 1:
            return
        wanted = factory([torch.nn.Parameter(torch.zeros(1))]).defaults
        opt = trainer.optimizers[0]
        scheds = [c.scheduler for c in trainer.lr_scheduler_configs if c.scheduler.optimizer is opt]
        for key, new in wanted.items():
            if _is_hyper(new):
                self._apply(opt, scheds, key, new)

    @staticmethod
    def _apply(opt: torch.optim.Optimizer, scheds: list, key: str, new: Any) -> None:
        for i, group in enumerate(opt.param_groups):
            old = group.get("initial_lr", group.get("lr")) if key == "lr" else group.get(key)
            if old is None or list(map(float, _flat(old))) == list(map(float, _flat(new))):
                continue
            if key == "lr":
                factor = group["lr"] / old if old else 1.0
                group["initial_lr"], group["lr"] = new, new * factor
                for sched in scheds:
                    if hasattr(sched, "base_lrs"):
                        sched.base_lrs[i] = new
            else:
                group[key] = type(old)(new) if isinstance(old, (tuple, list)) else new
            rank_zero_info(
                f"resume: optimizer {key} = {new} from this run's config "
                f"(the checkpoint had {old}; the restored state is overridden)"
            )


def _flat(value: Any) -> list:
    return list(value) if isinstance(value, (tuple, list)) else [value]


class SaveOnSigterm(L.Callback):
    """On SIGTERM, write ``last.ckpt`` at the end of the current batch, before Lightning stops.

    Lightning notices a SIGTERM (what schedulers send before killing a job) after the current
    batch and raises :class:`~lightning.pytorch.utilities.exceptions.SIGTERMException`, which
    ``flowtext fit`` turns into exit code 143. This callback saves ``last.ckpt`` first, at an
    optimizer-step boundary and on a single process; otherwise (mid gradient accumulation,
    several ranks) the last periodic ``last.ckpt`` is kept, intact.
    """

    def __init__(self) -> None:
        self.saved: Path | None = None

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:  # noqa: D102
        if not trainer.received_sigterm or self.saved is not None or trainer.world_size != 1:
            return
        progress = trainer.fit_loop.epoch_loop.batch_progress
        if progress.current.ready % trainer.accumulate_grad_batches and not progress.is_last_batch:
            return
        targets = {
            Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}"
            for cb in trainer.checkpoint_callbacks
            if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.dirpath
        }
        for path in sorted(targets):
            trainer.save_checkpoint(path, weights_only=False)  # the full state: resumable
            self.saved = path
            rank_zero_info(f"SIGTERM: saved {path} at step {trainer.global_step}")
