"""Training from YAML through LightningCLI: ``flowtext fit --config experiments/configs/NAME.yaml``.

The model is any :class:`~flowtext.lm.FlowLM` subclass given by ``class_path`` (``flowtext.Evo``,
``flowtext.AutoregressiveLM``, ``flowtext.DiffusionLM``); the data is
:class:`~flowtext.data.FlowTextDataModule`. The tokenizer's vocabulary size and bytes per token
are linked into the model, so a config never repeats them. Defaults: TensorBoard logs under
``default_root_dir``, a rich progress bar, a sample printed at every validation, a ``last.ckpt``
checkpoint plus the best one by validation bits per byte under AR. ``--print_config`` prints
the full config; ``--ckpt_path last`` resumes an interrupted run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jsonargparse import set_parsing_settings
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningCLI

from flowtext.callbacks import SampleCallback
from flowtext.data import FlowTextDataModule
from flowtext.lm import FlowLM

__all__ = ["FlowCLI", "cli_main", "trainer_defaults"]


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
            ),
        ],
        "log_every_n_steps": 10,
    }


class FlowCLI(LightningCLI):
    """LightningCLI with the data -> model links of flowtext."""

    def add_arguments_to_parser(self, parser) -> None:  # noqa: D102
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
    """
    try:  # field docstrings of the config dataclasses become --help text
        set_parsing_settings(docstring_parse_attribute_docstrings=True)
    except (TypeError, ValueError):  # older jsonargparse: help falls back to the class docstring
        pass
    return FlowCLI(
        FlowLM,
        FlowTextDataModule,
        subclass_mode_model=True,
        trainer_defaults=trainer_defaults(),
        args=list(argv) if argv is not None else None,
        save_config_kwargs={"overwrite": True},
        **kwargs,
    )
