"""Evo from a pretrained causal LM: ``flowtext adapt`` and :func:`adapt` (``hf`` extra).

:func:`adapt` wraps a local Hugging Face causal-LM directory as the flow backbone
(:class:`~flowtext.nn.hf_backbone.PretrainedBackbone`: pretrained weights everywhere, zero-init
time conditioning, noisy-input projection and progression-time head) in an :class:`AdaptedLM`, a
:class:`~flowtext.lm.FlowLM` trained under a :class:`~flowtext.regime.TrainingRegime` (Evo's by
default). At initialization its AR special case *is* the pretrained model. ``flowtext adapt``
does the same from the command line: it fine-tunes on a corpus for a few steps, reports bits per
byte before and after, and writes a checkpoint (``flowtext export`` turns it into safetensors).

Example:
    >>> lm = adapt("path/to/tiny-llama")  # doctest: +SKIP
    >>> lm.net.config.model_type  # doctest: +SKIP
    'llama'
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

from flowtext.data import FlowTextDataModule
from flowtext.data._hf import load_tokenizer_json
from flowtext.errors import ConfigError, FlowtextError
from flowtext.lm import FlowLM
from flowtext.nn import FlowNetwork, FlowTransformerConfig
from flowtext.nn.hf_backbone import AdapterConfig, PretrainedBackbone
from flowtext.regime import TrainingRegime

__all__ = ["REGIMES", "AdaptedLM", "adapt", "adapt_main", "check_tokenizer"]

REGIMES = {
    "evo": TrainingRegime.evo,
    "ar": TrainingRegime.autoregressive,
    "diffusion": TrainingRegime.diffusion,
}
"""Named training regimes of ``flowtext adapt --regime``."""

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


class AdaptedLM(FlowLM):
    """A :class:`~flowtext.lm.FlowLM` whose backbone is a pretrained causal LM.

    Give ``pretrained`` (a local model directory) to start from its weights, or ``backbone``
    (the :meth:`PretrainedBackbone.describe` dict a checkpoint records) to rebuild the
    architecture before loading a state dict. The checkpoint's hyper-parameters hold the
    ``backbone`` description, so it reloads without the original directory.

    Args:
        pretrained: A Hugging Face causal-LM directory (never downloaded).
        backbone: ``{"hf_config": ..., "adapter": ...}`` from a checkpoint.
        adapter: Sizes of the flow's additions (with ``pretrained``).
        dtype: ``"float32"`` (default), ``"bfloat16"`` or ``"float64"``.
        regime: What to train on (default: Evo's mixture).
        **kwargs: The other :class:`~flowtext.lm.FlowLM` arguments, as there (``schedule``,
            ``schedule_kwargs``, ``val_block_size``, ``val_steps_per_block``, ``val_policies``,
            ``bytes_per_token``, ``optimizer``, ``warmup_steps``, ``max_lr_steps``, ``seed``).

    Raises:
        ConfigError: Neither or both of ``pretrained`` and ``backbone``, or a directory that
            is not a supported causal LM.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        backbone: dict[str, Any] | None = None,
        adapter: AdapterConfig | dict | None = None,
        dtype: str = "float32",
        regime: TrainingRegime | dict | None = None,
        **kwargs: Any,
    ) -> None:
        net = _backbone(pretrained, backbone, adapter, dtype)
        if isinstance(regime, dict):  # from a checkpoint's hyper-parameters
            regime = TrainingRegime(**regime)
        stand_in = FlowTransformerConfig(  # FlowLM builds a FlowTransformer: make it tiny
            vocab_size=net.config.vocab_size, max_len=net.config.max_len, d_model=4, n_layers=1,
            n_heads=2, d_embed=2, cond_dim=2, cond_rank=1, mlp_ratio=1.0,
        )  # fmt: skip
        regime = regime if regime is not None else TrainingRegime.evo()
        super().__init__(net=stand_in, regime=regime, **kwargs)
        self.net = net
        for key in ("net", "pretrained", "adapter"):
            self.hparams.pop(key, None)
        self.hparams["backbone"] = net.describe()  # plain data: rebuilds without the folder

    def setup(self, stage: str) -> None:
        """Check the data's sequence length and tokenizer against the pretrained model."""
        context = f"pretrained context {self.net.config.max_len}"
        dm = self._checked_datamodule(context, "lower seq_len")
        tokenizer = getattr(dm, "tokenizer", None)
        if tokenizer is not None:
            check_tokenizer(tokenizer, self.net)


def _backbone(
    pretrained: str | None,
    backbone: dict[str, Any] | None,
    adapter: AdapterConfig | dict | None,
    dtype: str,
) -> PretrainedBackbone:
    if (pretrained is None) == (backbone is None):
        raise ConfigError(
            "give exactly one of pretrained (a causal-LM directory) or backbone (the description "
            "a checkpoint records)"
        )
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    if isinstance(adapter, dict):
        adapter = AdapterConfig(**adapter)
    if pretrained is not None:
        return PretrainedBackbone.from_pretrained(pretrained, adapter, dtype=_DTYPES[dtype])
    if not isinstance(backbone, dict) or "hf_config" not in backbone:
        raise ConfigError("backbone must be the dict PretrainedBackbone.describe() returns")
    net = PretrainedBackbone.from_config(backbone["hf_config"], backbone.get("adapter"))
    return net.to(_DTYPES[dtype])


def check_tokenizer(tokenizer: Any, net: FlowNetwork, model_dir: str | Path | None = None) -> None:
    """Raise unless ``tokenizer`` fits the pretrained model's vocabulary.

    A tokenizer may have fewer ids than the model's output layer (models pad their vocabulary
    to a round size), but not more, and not far fewer: that is another model's tokenizer. When
    ``model_dir`` holds the model's own ``tokenizer.json``, the token-to-id maps must agree too.

    Raises:
        ConfigError: The vocabularies disagree; the message says how.
    """
    ours, theirs = int(tokenizer.vocab_size), net.config.vocab_size
    if ours > theirs or theirs - ours > max(128, theirs // 64):
        raise ConfigError(
            f"the tokenizer has {ours} ids but the pretrained model's vocabulary has {theirs}: "
            "they disagree; use the model's own tokenizer.json (--tokenizer MODEL_DIR)"
        )
    if model_dir is None:
        return
    own = Path(model_dir) / "tokenizer.json"
    if not own.is_file():
        return
    backend = getattr(tokenizer, "backend", None)
    mine = backend.get_vocab(with_added_tokens=True) if backend is not None else None
    if mine != load_tokenizer_json(own).backend.get_vocab(with_added_tokens=True):
        raise ConfigError(
            f"the tokenizer ({type(tokenizer).__name__}, {ours} ids) disagrees with the model's "
            f"own {own}: the ids would mean other tokens; use --tokenizer {Path(model_dir)}"
        )


def adapt(
    pretrained: str | Path,
    *,
    adapter: AdapterConfig | None = None,
    regime: TrainingRegime | None = None,
    tokenizer: Any = None,
    **kwargs: Any,
) -> AdaptedLM:
    """A flow LM whose backbone is the pretrained causal LM in ``pretrained``.

    Args:
        pretrained: A local Hugging Face causal-LM directory.
        adapter: Sizes of the flow's additions.
        regime: Training regime (default :meth:`TrainingRegime.evo`).
        tokenizer: If given, checked against the model's vocabulary (:func:`check_tokenizer`).
        **kwargs: Further :class:`AdaptedLM` arguments (``schedule``, ``dtype``, ...).

    Returns:
        The :class:`AdaptedLM`; train it with a Lightning ``Trainer`` and a
        :class:`~flowtext.data.FlowTextDataModule`.

    Raises:
        ConfigError: Not a supported causal LM, or a tokenizer that does not fit it.
    """
    lm = AdaptedLM(pretrained=str(pretrained), adapter=adapter, regime=regime, **kwargs)
    if tokenizer is not None:
        check_tokenizer(tokenizer, lm.net, pretrained)
        lm.bytes_per_token = float(tokenizer.bytes_per_token)
    return lm


# ----------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flowtext adapt",
        description="Adapt a local Hugging Face causal LM into a flow LM, fine-tune it briefly "
        "and write a checkpoint.",
    )
    p.add_argument("model", help="Hugging Face causal-LM directory (config.json + weights)")
    p.add_argument("--tokenizer", help="tokenizer.json or its folder (default: the model's)")
    p.add_argument("--corpus", default="stdlib", help="corpus name or path (text/JSONL/...)")
    p.add_argument("--text-field", default=None, help="text column of a JSONL/Parquet corpus")
    p.add_argument("--regime", default="evo", choices=sorted(REGIMES), help="training regime")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per training window")
    p.add_argument("--batch-size", type=int, default=8, help="windows per batch")
    p.add_argument("--max-steps", type=int, default=100, help="optimizer steps (0: no training)")
    p.add_argument("--max-bytes", type=int, default=2_000_000, help="cap on the corpus bytes")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    p.add_argument("--d-embed", type=int, default=64, help="latent dimension of the flow")
    p.add_argument("--dtype", default="float32", choices=sorted(_DTYPES), help="parameter dtype")
    p.add_argument("--out", default="runs/adapt", help="output folder")
    return p


def adapt_main(argv: Sequence[str]) -> int:
    """``flowtext adapt``: adapt, fine-tune, validate and save; returns the exit code."""
    args = _parser().parse_args(list(argv))
    try:
        summary = _run_adapt(args)
    except (FlowtextError, OSError) as err:
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    for key, value in summary.items():
        print(f"{key}: {value}")
    return 0


def _run_adapt(args: argparse.Namespace) -> dict[str, Any]:
    options = {"text_field": args.text_field} if args.text_field else None
    dm = FlowTextDataModule(
        args.corpus, tokenizer=args.tokenizer or args.model, seq_len=args.seq_len,
        batch_size=args.batch_size, max_bytes=args.max_bytes, eval_samples=4 * args.batch_size,
        corpus_options=options, train_samples_per_epoch=max(1, args.max_steps) * args.batch_size,
    )  # fmt: skip
    lm = adapt(
        args.model,
        adapter=AdapterConfig(d_embed=args.d_embed),
        regime=REGIMES[args.regime](),
        tokenizer=dm.tokenizer,
        dtype=args.dtype,
        optimizer=lambda params: torch.optim.AdamW(params, lr=args.lr),
        warmup_steps=min(100, args.max_steps // 10),
        val_steps_per_block=8,
    )
    out = Path(args.out)
    trainer = L.Trainer(
        max_steps=args.max_steps, default_root_dir=out, logger=False, enable_checkpointing=False,
        limit_val_batches=2, num_sanity_val_steps=0, enable_model_summary=False,
        gradient_clip_val=1.0,
    )  # fmt: skip
    before = trainer.validate(lm, datamodule=dm, verbose=False)[0]
    if args.max_steps > 0:
        trainer.fit(lm, datamodule=dm)
    after = trainer.validate(lm, datamodule=dm, verbose=False)[0]
    ckpt = out / "adapted.ckpt"
    trainer.save_checkpoint(ckpt, weights_only=False)
    keys = sorted(k for k in after if k.startswith("val/bpb"))
    return {
        **{f"{k} (before -> after)": f"{before[k]:.4f} -> {after[k]:.4f}" for k in keys},
        "checkpoint": ckpt,
        "export it with": f"flowtext export {ckpt} {out / 'export'}",
    }
