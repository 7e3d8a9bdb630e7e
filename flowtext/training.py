"""Training from YAML through LightningCLI: ``flowtext fit --config experiments/configs/NAME.yaml``.

The model is any :class:`~flowtext.lm.FlowLM` subclass given by ``class_path`` (``flowtext.Evo``,
``flowtext.AutoregressiveLM``, ``flowtext.DiffusionLM``); the data is
:class:`~flowtext.data.FlowTextDataModule`. The tokenizer's vocabulary size and bytes per token
are linked into the model, so a config never repeats them. Defaults: TensorBoard logs under
``default_root_dir``, a rich progress bar, a sample printed at every validation, a ``last.ckpt``
checkpoint (rewritten every ``--checkpoint.every_n_train_steps`` steps and at each validation)
plus the best one by validation bits per byte under AR, all written atomically
(:class:`AtomicCheckpointIO`). ``--print_config`` prints the full config; ``--ckpt_path last``
resumes an interrupted run exactly (same weights, optimizer, data order and noise), also after a
``kill -9``. Distributed training, precision and determinism are Trainer options
(``--trainer.strategy ddp``, ``--trainer.precision bf16-mixed``, ``--trainer.deterministic
true``); see ``docs/scale.md``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from jsonargparse import set_parsing_settings
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins import TorchCheckpointIO

from flowtext.callbacks import SampleCallback
from flowtext.data import FlowTextDataModule
from flowtext.errors import ConfigError, FlowtextError
from flowtext.lm import FlowLM

__all__ = [
    "TINY_OVERRIDES",
    "AtomicCheckpointIO",
    "FlowCLI",
    "cli_main",
    "latest_checkpoint",
    "trainer_defaults",
]

TINY_OVERRIDES = [
    "--model.init_args.net.max_len=32",
    "--model.init_args.net.d_model=32",
    "--model.init_args.net.n_layers=1",
    "--model.init_args.net.n_heads=2",
    "--model.init_args.net.d_embed=8",
    "--model.init_args.net.cond_dim=16",
    "--model.init_args.net.cond_rank=4",
    "--model.init_args.val_steps_per_block=4",
    "--model.init_args.val_block_size=4",
    "--data.seq_len=32",
    "--data.batch_size=4",
    "--data.max_bytes=200000",
    "--data.eval_samples=8",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_model_summary=false",
]
"""CLI overrides shrinking any config to a seconds-long smoke run (tests, ``--quick``)."""

CHECKPOINT_EVERY_N_STEPS = 100
"""Default of ``--checkpoint.every_n_train_steps``."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint writer that never leaves a partial file under the checkpoint's name.

    Lightning's own writer goes through an fsspec transaction; whether that is a rename on the
    same filesystem depends on the fsspec version, and nothing is flushed to disk. This one
    writes local checkpoints to a hidden temporary file in the target folder, flushes it to
    disk and moves it over the target with ``os.replace`` (atomic on POSIX and Windows), so a
    crash, a ``kill -9`` or an exception during the save leaves the previous ``last.ckpt``
    intact. Remote paths (``s3://...``) fall back to Lightning's writer.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        """Write ``checkpoint`` to ``path`` atomically.

        Args:
            checkpoint: The state Lightning dumps.
            path: Target file.
            storage_options: Not supported (as for :class:`TorchCheckpointIO`).
        """
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
            fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def trainer_defaults() -> dict[str, Any]:
    """Trainer defaults of the CLI (each can be overridden in YAML or on the command line).

    Lightning's own default logger is TensorBoard (under ``default_root_dir``).

    Returns:
        Keyword arguments for :class:`lightning.pytorch.Trainer`.
    """
    return {
        "callbacks": [
            RichProgressBar(),
            SampleCallback(),
            LearningRateMonitor(logging_interval="step"),
            ModelCheckpoint(
                save_last=True,
                monitor="val/bpb_ar",
                mode="min",
                save_top_k=1,
                filename="best-{step}",
                enable_version_counter=False,  # last.ckpt is shared with --checkpoint
            ),
        ],
        "log_every_n_steps": 10,
    }


def latest_checkpoint(*roots: str | os.PathLike[str]) -> Path | None:
    """The most recently written ``last*.ckpt`` under the given folders (searched recursively).

    Args:
        *roots: Folders, e.g. the trainer's ``default_root_dir``.

    Returns:
        The path, or ``None`` when there is none.
    """
    found = [p for r in roots if Path(r).is_dir() for p in Path(r).rglob("last*.ckpt")]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


class FlowCLI(LightningCLI):
    """LightningCLI with the data -> model links of flowtext and atomic checkpoint writes."""

    def before_fit(self) -> None:
        """Resolve ``--ckpt_path last`` to the newest ``last.ckpt`` of any earlier version.

        Lightning only looks in this run's checkpoint folder, which the logger puts under a new
        ``version_N``; resuming an interrupted run should find the previous version's file.
        """
        cfg = self.config_init[self.subcommand]
        if cfg.get("ckpt_path") != "last":
            return
        roots = [self.trainer.default_root_dir]
        roots += [cb.dirpath for cb in self.trainer.checkpoint_callbacks if cb.dirpath]
        found = latest_checkpoint(*roots)
        if found is not None:
            cfg.ckpt_path = str(found)

    def instantiate_trainer(self, **kwargs: Any):  # noqa: D102
        trainer = super().instantiate_trainer(**kwargs)
        # Lightning's default writer becomes the atomic one; a writer the user chose stays
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def add_arguments_to_parser(self, parser) -> None:  # noqa: D102
        # the periodic last.ckpt that resume uses: --checkpoint.every_n_train_steps N
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.every_n_train_steps": CHECKPOINT_EVERY_N_STEPS,
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": 0,
                "checkpoint.enable_version_counter": False,
            }
        )
        parser.link_arguments(
            "data.vocab_size", "model.init_args.net.vocab_size", apply_on="instantiate"
        )
        parser.link_arguments(
            "data.bytes_per_token", "model.init_args.bytes_per_token", apply_on="instantiate"
        )


def cli_main(argv: Sequence[str] | None = None, **kwargs: Any) -> FlowCLI:
    """Run the training CLI.

    Args:
        argv: Command-line arguments (``fit --config ...``); ``None`` reads ``sys.argv``.
        **kwargs: Extra :class:`FlowCLI` arguments (e.g. ``run=False`` in tests).

    Returns:
        The CLI object (its ``model``, ``datamodule`` and ``trainer``).

    Raises:
        ConfigError: The model rejected its configuration (the message names the fix).
    """
    try:  # field docstrings of the config dataclasses become --help text
        set_parsing_settings(docstring_parse_attribute_docstrings=True)
    except (TypeError, ValueError):  # older jsonargparse: help falls back to the class docstring
        pass
    try:
        return FlowCLI(
            FlowLM,
            FlowTextDataModule,
            subclass_mode_model=True,
            trainer_defaults=trainer_defaults(),
            args=list(argv) if argv is not None else None,
            save_config_kwargs={"overwrite": True},
            **kwargs,
        )
    except ValueError as err:
        # jsonargparse reports a model that refused its arguments (our ConfigError) as "does not
        # validate against any of the Union subtypes"; surface the model's own message
        text = str(err)
        reasons = [
            line.strip()[2:]
            for line in text.splitlines()
            if line.strip().startswith("- ") and "NoneType" not in line
        ]
        if isinstance(err, FlowtextError) or "Union subtypes" not in text or not reasons:
            raise
        raise ConfigError("invalid model configuration: " + "; ".join(reasons)) from err
