"""Checkpoints are data: read them without running code, rebuild a model and its tokenizer.

A Lightning ``.ckpt`` is a pickle, and an ordinary unpickler runs whatever code the file names.
flowtext therefore reads every checkpoint with ``torch.load(..., weights_only=True)``, PyTorch's
restricted unpickler, which rebuilds tensors and plain containers (dicts, lists, strings,
numbers) and refuses everything else. A genuine flowtext checkpoint holds nothing else, so it
loads; a file that would import or call anything is refused with :class:`CheckpointError`, and
nothing in it runs. Configs are different: a ``class_path`` in a YAML config imports code by
design, so configs are trusted input (see ``docs/errors.md``).
"""

from __future__ import annotations

import inspect
import pickle
import re
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from flowtext.data import ByteTokenizer, tokenizer_from_state
from flowtext.errors import CheckpointError, FlowtextError
from flowtext.lm import FlowLM
from flowtext.regime import TrainingRegime

__all__ = ["RawBytes", "load_checkpoint", "read_checkpoint"]


class RawBytes:
    """Fallback tokenizer for 256-id models: id = byte value, no special tokens."""

    vocab_size = 256
    eos_id = None

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes of ``text``."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of byte ids (invalid UTF-8 becomes U+FFFD)."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


def _checked_path(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("**/last.ckpt"))
        hint = f" (it holds {found[-1]})" if found else ""
        raise CheckpointError(f"{path} is a directory; pass the .ckpt file itself{hint}")
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not exist; pass --ckpt PATH to a .ckpt"
        )
    if path.stat().st_size == 0:
        raise CheckpointError(
            f"{path} is empty (0 bytes): the write was cut off; use an earlier one"
        )
    return path


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The raw contents of a Lightning checkpoint, read as data (no code runs).

    Args:
        path: ``.ckpt`` file.
        map_location: Device for the tensors.

    Returns:
        The checkpoint dictionary (``state_dict``, ``hyper_parameters``, ...).

    Raises:
        CheckpointError: Missing, a directory, empty, corrupt or truncated, not a Lightning
            checkpoint, or holding objects other than tensors and plain data (refused unread).
    """
    path = _checked_path(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found is None:  # not a pickle of plain data at all: garbage or a damaged file
            raise CheckpointError(
                f"{path} is corrupt or not a checkpoint and cannot be read"
            ) from None
        raise CheckpointError(
            f"refused to load {path}: it names the Python object {found.group(1)}, which could "
            "run code; flowtext reads checkpoints as data (tensors, numbers, strings, lists, "
            "dicts) and never unpickles code — load only checkpoints written by flowtext"
        ) from None
    except Exception as err:  # noqa: BLE001 - code was refused above; the rest is bad bytes
        # (malformed pickles raise IndexError, KeyError, TypeError, ... from the unpickler)
        raise CheckpointError(
            f"{path} is corrupt or truncated and cannot be read "
            f"({type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''})"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    return ckpt


def _regime_hparams(hp: dict[str, Any]) -> dict[str, Any]:
    """Checkpoints written before :class:`TrainingRegime` keep its fields at the top level."""
    names = {f.name for f in fields(TrainingRegime)} | {"train_block_sizes"}
    old = {k: hp.pop(k) for k in list(hp) if k in names}
    if old and "regime" not in hp:
        old["block_sizes"] = old.pop("train_block_sizes", old.get("block_sizes", (1,)))
        hp["regime"] = old
    return hp


def _build_module(ckpt: dict[str, Any], path: Path) -> FlowLM:
    hp = _regime_hparams(dict(ckpt.get("hyper_parameters") or {}))
    allowed = set(inspect.signature(FlowLM.__init__).parameters) - {"self", "optimizer"}
    try:
        lm = FlowLM(**{k: v for k, v in hp.items() if k in allowed})
    except (FlowtextError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path} records an unusable model configuration: {err}") from None
    try:
        lm.load_state_dict(ckpt["state_dict"])
        lm.on_load_checkpoint(ckpt)  # a fitted schedule's state
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]
        raise CheckpointError(
            f"{path}: its weights do not match the model configuration it records ({detail})"
        ) from None
    bad = next(
        (
            n
            for n, p in lm.state_dict().items()
            if p.is_floating_point() and not bool(torch.isfinite(p).all())
        ),
        None,
    )
    if bad is not None:
        raise CheckpointError(
            f"{path} holds non-finite (NaN or infinite) weights, first in {bad!r}: the run "
            "diverged before it was saved; use an earlier checkpoint"
        )
    return lm.eval()


def _tokenizer(ckpt: dict[str, Any], vocab: int) -> tuple[Any, str]:
    state = ckpt.get("flowtext_tokenizer")
    if state is not None:
        try:
            tok = tokenizer_from_state(state)
        except (FlowtextError, KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"the checkpoint's tokenizer state is unusable: {err}") from None
        return tok, f"tokenizer from the checkpoint ({type(tok).__name__})"
    if vocab == 256:
        return RawBytes(), "no tokenizer in the checkpoint: assuming raw bytes (ids 0-255)"
    return ByteTokenizer(), "no tokenizer in the checkpoint: assuming the byte tokenizer"


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[FlowLM, Any, str]:
    """Rebuild a :class:`~flowtext.lm.FlowLM` and its tokenizer from a Lightning checkpoint.

    The module is rebuilt from the checkpoint's ``hyper_parameters`` (Evo, AR and diffusion LMs
    are configurations of :class:`~flowtext.lm.FlowLM`, so one class reads them all), the
    checkpoint is read with :func:`read_checkpoint` (as data), and the tokenizer comes from
    ``checkpoint["flowtext_tokenizer"]``; without it the byte tokenizer is assumed
    (:class:`~flowtext.data.ByteTokenizer` for 259 ids, :class:`RawBytes` for 256).

    Args:
        path: ``.ckpt`` file.
        map_location: Device to load onto.

    Returns:
        ``(module in eval mode, tokenizer, note)``; ``note`` says where the tokenizer came from.

    Raises:
        CheckpointError: As :func:`read_checkpoint`, or weights that do not fit the recorded
            configuration, non-finite weights, or a vocabulary that differs from the
            tokenizer's.
    """
    path = Path(path)
    ckpt = read_checkpoint(path, map_location)
    lm = _build_module(ckpt, path)
    vocab = lm.net.config.vocab_size
    tok, note = _tokenizer(ckpt, vocab)
    if tok.vocab_size != vocab:
        raise CheckpointError(
            f"{path}: the model has vocab_size={vocab} but the tokenizer ({note}) has "
            f"{tok.vocab_size} ids; the checkpoint was trained with another vocabulary"
        )
    return lm, tok, note
