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

import errno
import json
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from jsonargparse import set_parsing_settings
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from flowtext.callbacks import (
    OptimizerOverrides,
    ProgressBar,
    SampleCallback,
    SaveOnSigterm,
)
from flowtext.checkpoint import read_checkpoint
from flowtext.data import FlowTextDataModule
from flowtext.errors import CheckpointError, ConfigError, FlowtextError
from flowtext.lm import FlowLM

__all__ = [
    "TINY_OVERRIDES",
    "AtomicCheckpointIO",
    "FlowCLI",
    "check_resume",
    "claim_version",
    "cli_main",
    "latest_checkpoint",
    "remove_orphaned_temporaries",
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
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as err:
            tmp.unlink(missing_ok=True)
            if isinstance(err, OSError) or (
                isinstance(err, RuntimeError) and "write" in str(err).lower()
            ):
                raise CheckpointError(_write_failure(path, err)) from None
            raise
        if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
            fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _write_failure(path: Path, err: BaseException) -> str:
    code = getattr(err, "errno", None)
    reason = os.strerror(code) if code else str(err).splitlines()[0]
    good = path if path.is_file() else latest_checkpoint(path.parent)
    kept = (
        f"the last good checkpoint {good} is intact"
        if good is not None
        else "no checkpoint of this run was written yet"
    )
    hint = (
        "free some disk space"
        if getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
        else "make the folder writable (or pick another --trainer.default_root_dir)"
    )
    return (
        f"could not write checkpoint {path} ({reason}); {kept} (only a temporary file was "
        f"being written, and it was removed): {hint}, then resume with --ckpt_path last"
    )


def remove_orphaned_temporaries(*roots: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files of checkpoint writes that a killed process left behind.

    :class:`AtomicCheckpointIO` names them ``.NAME.PID.tmp``; a file whose process is still
    alive (another run writing into the same folder) is left alone.

    Args:
        *roots: Folders searched recursively.

    Returns:
        The files removed.
    """
    removed = []
    for root in roots:
        if not Path(root).is_dir():
            continue
        for tmp in Path(root).rglob(".*.ckpt.*.tmp"):
            pid = tmp.name.rsplit(".", 2)[-2]
            if pid.isdigit() and not _alive(int(pid)):
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def claim_version(root: str | os.PathLike[str]) -> int:
    """Create ``root/version_N`` for the smallest free ``N`` above the existing ones.

    ``os.mkdir`` fails if the folder exists, so two runs starting at once into the same
    ``default_root_dir`` can never claim the same version (Lightning's logger only lists the
    folders and picks the next number, which races).

    Args:
        root: The logger's root folder (``save_dir/name``).

    Returns:
        The claimed version number ``N``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    taken = [
        int(p.name[len("version_") :])
        for p in root.glob("version_*")
        if p.name[len("version_") :].isdigit()
    ]
    version = max(taken, default=-1) + 1
    while True:
        try:
            (root / f"version_{version}").mkdir()
            return version
        except FileExistsError:
            version += 1


def _normalized(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def check_resume(ckpt_path: str | os.PathLike[str], model: Any) -> dict[str, Any]:
    """Refuse a checkpoint that cannot resume ``model`` before Lightning tries to load it.

    The checkpoint is read as data (:func:`~flowtext.checkpoint.read_checkpoint`); its
    network configuration must equal the model's. Other hyper-parameters may differ: this
    run's config wins, and each difference is logged.

    Args:
        ckpt_path: The ``.ckpt`` file.
        model: The configured module (its ``hparams["net"]`` is compared).

    Returns:
        The checkpoint dictionary.

    Raises:
        CheckpointError: Missing, corrupt or unsafe file, or another network size.
    """
    path = Path(ckpt_path)
    if not path.exists():
        raise CheckpointError(
            f"--ckpt_path {path} does not exist; pass a .ckpt written by flowtext fit, or "
            "--ckpt_path last for the newest one under default_root_dir"
        )
    ckpt = read_checkpoint(path)
    theirs = dict(ckpt.get("hyper_parameters") or {})
    mine = dict(getattr(model, "hparams", {}) or {})
    net_a, net_b = dict(theirs.get("net") or {}), dict(mine.get("net") or {})
    diff = [
        k
        for k in sorted(set(net_a) | set(net_b))
        if _normalized(net_a.get(k)) != _normalized(net_b.get(k))
    ]
    if diff:
        have = ", ".join(f"net.{k}={net_a.get(k)}" for k in diff)
        want = ", ".join(f"net.{k}={net_b.get(k)}" for k in diff)
        raise CheckpointError(
            f"{path} holds a model with {have}, but this run configures {want}; resume with "
            "the model settings the checkpoint was trained with (its config.yaml is in the run "
            "folder), or start a new run without --ckpt_path"
        )
    for key in sorted(set(theirs) & set(mine) - {"net"}):
        if _normalized(theirs[key]) != _normalized(mine[key]):
            rank_zero_info(
                f"resuming with {key}={mine[key]!r} from this run's config "
                f"(the checkpoint was trained with {theirs[key]!r})"
            )
    return ckpt


def trainer_defaults() -> dict[str, Any]:
    """Trainer defaults of the CLI (each can be overridden in YAML or on the command line).

    Lightning's own default logger is TensorBoard (under ``default_root_dir``).

    Returns:
        Keyword arguments for :class:`lightning.pytorch.Trainer`.
    """
    return {
        "callbacks": [
            ProgressBar(),
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
    """LightningCLI with flowtext's data -> model links, atomic checkpoints and safe resumes.

    On top of LightningCLI: atomic checkpoint writes, a version folder claimed atomically per
    run (:func:`claim_version`), ``--ckpt_path last`` across versions, checkpoints read as data
    and checked against the configured model before loading (:func:`check_resume`; this run's
    config wins over the checkpoint's hyper-parameters, also the optimizer's, see
    :class:`~flowtext.callbacks.OptimizerOverrides`), and the last checkpoint saved on SIGTERM.
    """

    def _parse_ckpt_path(self) -> None:
        """Keep this run's config: Lightning would overwrite it with the checkpoint's hparams.

        That silently trained the checkpoint's model size whatever the command line said, and
        read the file without checks; :meth:`before_fit` checks it instead.
        """

    def _resolve_checkpoint(self) -> None:
        cfg = self.config_init[self.subcommand]
        roots: list[str | Path] = [self.trainer.default_root_dir]
        roots += [
            cb.dirpath
            for cb in self.trainer.checkpoint_callbacks
            if isinstance(cb, ModelCheckpoint) and cb.dirpath
        ]
        if self.trainer.is_global_zero:
            for tmp in remove_orphaned_temporaries(*roots):
                rank_zero_info(f"removed {tmp}, left by a write that was killed")
        if cfg.get("ckpt_path") == "last":
            # Lightning only looks in this run's new version folder
            found = latest_checkpoint(*roots)
            if found is not None:
                cfg.ckpt_path = str(found)
        path = cfg.get("ckpt_path")
        if path and path not in ("last", "best", "hpc", "registry") and "://" not in str(path):
            check_resume(path, self.model)

    def before_fit(self) -> None:
        """Clean up, resolve ``--ckpt_path last`` and check the checkpoint against the model."""
        self._resolve_checkpoint()

    before_validate = before_test = before_fit

    def instantiate_trainer(self, **kwargs: Any):  # noqa: D102
        trainer = super().instantiate_trainer(**kwargs)
        # Lightning's default writer becomes the atomic one; a writer the user chose stays
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        # Lightning's CallbackConnector sets trainer.callbacks; Trainer does not declare it
        trainer.callbacks.extend([OptimizerOverrides(), SaveOnSigterm()])  # type: ignore[attr-defined]
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                # a private field: the version is otherwise picked lazily, by listing folders
                pinned = getattr(logger, "_version", 0) is not None
                if isinstance(logger, (TensorBoardLogger, CSVLogger)) and not pinned:
                    if "://" not in str(logger.root_dir):
                        logger._version = claim_version(logger.root_dir)
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
    _quiet_lightning()
    try:
        with warnings.catch_warnings():
            # an explicit argv (tests, `flowtext run`) is meant: nothing to warn about
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
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


class _DropAdverts(logging.Filter):
    """Drops Lightning's log lines that advertise services (nothing a user has to act on)."""

    def filter(self, record: logging.LogRecord) -> bool:  # noqa: D102
        return "💡 Tip" not in str(record.msg)


_UNACTIONABLE_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)",  # Lightning's use of a deprecated torch API
    r"The dirpath has changed from",  # a resumed run writes into its own version folder
    r"\s*skip_none parameter was deprecated",  # LightningCLI calling jsonargparse
)
"""Warnings from inside Lightning that a user of the CLI can do nothing about (filtered)."""


def _quiet_lightning() -> None:
    for message in _UNACTIONABLE_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)  # a logger's filters see every record logged through it
        if not any(isinstance(f, _DropAdverts) for f in logger.filters):
            logger.addFilter(_DropAdverts())
