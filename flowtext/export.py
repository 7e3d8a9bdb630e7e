"""Export any flowtext checkpoint as ``safetensors`` + config + tokenizer, and load it back.

An export is a folder::

    model.safetensors         # the backbone's weights (no pickle: loading runs no code)
    config.json               # what rebuilds the module: its class and hyper-parameters
    flowtext_tokenizer.json   # the tokenizer's state (tokenizer_from_state rebuilds it)
    tokenizer.json            # for Hugging Face tokenizers: the standard file, for other tools

:func:`load_export` rebuilds the module (a :class:`~flowtext.lm.FlowLM`, or an
:class:`~flowtext.adapt.AdaptedLM` for adapted models) and its tokenizer; decoding with it gives
the same tokens as the checkpoint. Needs the ``hf`` extra (``safetensors``).
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flowtext.adapt import AdaptedLM, adapt_main
from flowtext.checkpoint import load_checkpoint, read_checkpoint
from flowtext.data import tokenizer_from_state
from flowtext.data._hf import require
from flowtext.errors import CheckpointError, FlowtextError
from flowtext.lm import FlowLM

__all__ = [
    "FORMAT",
    "export_checkpoint",
    "export_main",
    "export_module",
    "hf_main",
    "load_export",
]

FORMAT = "flowtext-export/1"
"""The ``format`` field of ``config.json``."""

_CLASSES = {"FlowLM": FlowLM, "AdaptedLM": AdaptedLM}


def _arguments(cls: type[FlowLM]) -> set[str]:
    """Constructor arguments of ``cls`` (``**kwargs`` go on to FlowLM's), but the optimizer."""
    names: set[str] = set()
    for klass in (cls, FlowLM):
        names |= set(inspect.signature(klass.__init__).parameters)
    return names - {"self", "optimizer", "kwargs"}


def _plain_hparams(lm: FlowLM) -> dict[str, Any]:
    """The module's constructor arguments that are plain data (what ``config.json`` keeps)."""
    allowed = _arguments(AdaptedLM if isinstance(lm, AdaptedLM) else FlowLM)
    out = {k: v for k, v in dict(lm.hparams).items() if k in allowed}
    json.dumps(out)  # raises TypeError on anything that is not plain data
    return out


def export_module(lm: FlowLM, tokenizer: Any, out: str | Path) -> Path:
    """Write ``lm``'s backbone weights, its config and ``tokenizer`` to the folder ``out``.

    Args:
        lm: A :class:`~flowtext.lm.FlowLM` (or :class:`~flowtext.adapt.AdaptedLM`).
        tokenizer: A flowtext tokenizer (anything with ``state_dict``), or ``None``.
        out: Output folder (created).

    Returns:
        The folder.
    """
    st = require("safetensors.torch")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    st.save_model(lm.net, str(out / "model.safetensors"))
    config = {
        "format": FORMAT,
        "class": "AdaptedLM" if isinstance(lm, AdaptedLM) else "FlowLM",
        "hyper_parameters": _plain_hparams(lm),
    }
    (out / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True))
    if tokenizer is not None and hasattr(tokenizer, "state_dict"):
        state = tokenizer.state_dict()
        (out / "flowtext_tokenizer.json").write_text(json.dumps(state))
        if "json" in state:
            (out / "tokenizer.json").write_text(state["json"])
    return out


def _module_from_checkpoint(ckpt: dict[str, Any], path: Path) -> FlowLM:
    hp = dict(ckpt.get("hyper_parameters") or {})
    allowed = _arguments(AdaptedLM)
    try:
        lm = AdaptedLM(**{k: v for k, v in hp.items() if k in allowed})
        lm.load_state_dict(ckpt["state_dict"])
    except (FlowtextError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: cannot rebuild the adapted model ({err})") from None
    return lm.eval()


def export_checkpoint(ckpt_path: str | Path, out: str | Path) -> Path:
    """Export a Lightning checkpoint (of any flowtext LM) to ``out``.

    Raises:
        CheckpointError: As :func:`flowtext.checkpoint.read_checkpoint`, or weights that do not
            fit the recorded configuration.
    """
    path = Path(ckpt_path)
    ckpt = read_checkpoint(path)  # as data: no code runs
    if "backbone" in (ckpt.get("hyper_parameters") or {}):
        lm = _module_from_checkpoint(ckpt, path)
        state = ckpt.get("flowtext_tokenizer")
        tokenizer = tokenizer_from_state(state) if state is not None else None
    else:
        lm, tokenizer, _ = load_checkpoint(path)
    return export_module(lm, tokenizer, out)


def load_export(path: str | Path) -> tuple[FlowLM, Any]:
    """Rebuild the module (eval mode) and tokenizer of an export folder.

    Returns:
        ``(module, tokenizer or None)``.

    Raises:
        CheckpointError: Not an export folder, or weights that do not fit its config.
    """
    st = require("safetensors.torch")
    folder = Path(path)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{folder} is not a flowtext export ({err})") from None
    if config.get("format") != FORMAT or config.get("class") not in _CLASSES:
        raise CheckpointError(f"{folder}/config.json is not a {FORMAT} config")
    try:
        lm = _CLASSES[config["class"]](**config["hyper_parameters"])
        st.load_model(lm.net, str(folder / "model.safetensors"))
    except (FlowtextError, TypeError, ValueError, RuntimeError, OSError) as err:
        raise CheckpointError(f"{folder}: the weights do not fit the config ({err})") from None
    tok_file = folder / "flowtext_tokenizer.json"
    tokenizer = (
        tokenizer_from_state(json.loads(tok_file.read_text())) if tok_file.is_file() else None
    )
    return lm.eval(), tokenizer


def export_main(argv: Sequence[str]) -> int:
    """``flowtext export CKPT OUT``: returns the exit code."""
    p = argparse.ArgumentParser(
        prog="flowtext export",
        description="Save a flowtext checkpoint as safetensors + config.json + tokenizer.",
    )
    p.add_argument("checkpoint", help="a .ckpt written by flowtext fit or flowtext adapt")
    p.add_argument("out", help="output folder")
    args = p.parse_args(list(argv))
    try:
        out = export_checkpoint(args.checkpoint, args.out)
    except (FlowtextError, OSError) as err:
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    print(f"exported to {out}")
    return 0


def hf_main(argv: Sequence[str]) -> int:
    """Dispatch ``flowtext adapt ...`` and ``flowtext export ...`` (the Hugging Face commands)."""
    if argv and argv[0] == "export":
        return export_main(argv[1:])
    return adapt_main(argv[1:] if argv and argv[0] == "adapt" else argv)
