"""Map-style datasets over token files and tasks, and a sampler that moves on every epoch.

Training windows are random but reproducible: item ``idx`` is drawn from a generator seeded
with ``(seed, idx)``, and :class:`EpochSampler` hands out ``idx = epoch * n + i`` for
``i < n``, so every epoch sees new windows while any run with the same seed sees the same ones.
Evaluation windows are fixed and non-overlapping.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from flowtext.data._cache import open_tokens
from flowtext.data._tasks import Task
from flowtext.data._tokenizers import Tokenizer
from flowtext.errors import ConfigError, DataError

__all__ = ["EpochSampler", "TaskDataset", "TokenWindows"]


class EpochSampler(Sampler[int]):
    """Yields ``epoch * num_samples + i`` for ``i = 0 .. num_samples - 1``.

    The epoch is the last value given to :meth:`set_epoch` (Lightning calls it at the start of
    each training epoch, also when resuming); without calls, it counts iterations. Under
    distributed training Lightning wraps this sampler and shards its indices across ranks.

    Args:
        num_samples: Items per epoch.
    """

    def __init__(self, num_samples: int) -> None:
        if num_samples < 1:
            raise ConfigError(f"num_samples must be >= 1, got {num_samples}")
        self.num_samples = int(num_samples)
        self.epoch = 0
        self._explicit = False

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` for the next iteration."""
        self.epoch = int(epoch)
        self._explicit = True

    def __iter__(self) -> Iterator[int]:
        epoch = self.epoch
        if not self._explicit:
            self.epoch += 1
        self._explicit = False
        base = epoch * self.num_samples
        return iter(range(base, base + self.num_samples))

    def __len__(self) -> int:
        return self.num_samples


class TokenWindows(Dataset):
    """Windows of ``seq_len`` tokens from a prepared token file (opened lazily per worker).

    Args:
        path: ``.bin`` file from :func:`~flowtext.data.prepare_tokens`.
        seq_len: Window length ``L`` (>= 2).
        train: Random windows (``len = num_samples``; any ``idx >= 0`` is valid) or the fixed
            non-overlapping windows ``[k L, (k + 1) L)`` (evenly thinned to ``num_samples`` if
            that is smaller).
        num_samples: Items per epoch (train) or cap on the windows (eval; ``None``: all).
        seed: Seed of the training windows.
        tokenizer: If given, checked against the file's tokenizer.

    Raises:
        DataError: ``seq_len < 2`` or fewer tokens than one window.

    Items are ``{"tokens": LongTensor[L]}``.
    """

    def __init__(self, path: str | os.PathLike[str], seq_len: int, train: bool,
                 num_samples: int | None = None, seed: int = 0,
                 tokenizer: Tokenizer | None = None) -> None:
        _check_seq_len(seq_len)
        self.path = Path(path)
        arr, meta = open_tokens(self.path, tokenizer)
        self.n_tokens = int(meta["n_tokens"])
        self.meta = meta
        self.seq_len, self.train, self.seed = int(seq_len), bool(train), int(seed)
        if self.n_tokens < self.seq_len:
            raise DataError(
                f"the {meta['split']!r} split has {self.n_tokens} tokens, fewer than one window "
                f"of seq_len={seq_len}; lower seq_len, raise max_bytes or use a larger corpus"
            )
        self._arr: np.ndarray | None = None
        if train:
            if num_samples is None or num_samples < 1:
                raise ConfigError(f"training needs num_samples >= 1, got {num_samples!r}")
            self._len = int(num_samples)
            self._starts = None
        else:
            n_win = self.n_tokens // self.seq_len
            k = n_win if num_samples is None else max(1, min(n_win, int(num_samples)))
            pick = np.linspace(0, n_win - 1, k).round().astype(np.int64) if k < n_win \
                else np.arange(n_win)
            self._starts = pick * self.seq_len
            self._len = len(self._starts)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_arr"] = None  # reopen the memmap in each worker instead of pickling the data
        return state

    @property
    def tokens(self) -> np.ndarray:
        """The whole split as a read-only ``uint16`` memmap ``[n_tokens]``."""
        if self._arr is None:
            self._arr = open_tokens(self.path)[0]
        return self._arr

    def __len__(self) -> int:
        return self._len

    def start(self, idx: int) -> int:
        """First token of item ``idx``."""
        if self._starts is not None:
            return int(self._starts[idx])
        if idx < 0:
            raise IndexError(idx)
        rng = np.random.default_rng([self.seed, int(idx)])
        return int(rng.integers(0, self.n_tokens - self.seq_len + 1))

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        s = self.start(idx)
        window = np.asarray(self.tokens[s:s + self.seq_len], dtype=np.int64)
        return {"tokens": torch.from_numpy(window)}


class TaskDataset(Dataset):
    """Encoded examples of a synthetic task.

    Args:
        task: The task.
        tokenizer: Tokenizer for the examples.
        split: ``"train"``, ``"val"`` or ``"test"``.
        seq_len: Sequence length ``L`` (at least ``task.min_seq_len()``).
        num_samples: Items per epoch; for training any ``idx >= 0`` is valid (see
            :class:`EpochSampler`).
        seed: Generator seed.

    Items are ``{"tokens": LongTensor[L], "answer_mask": BoolTensor[L]}``.

    Raises:
        DataError: ``seq_len`` too short for the task.
    """

    def __init__(self, task: Task, tokenizer: Tokenizer, split: str, seq_len: int,
                 num_samples: int, seed: int = 0) -> None:
        _check_seq_len(seq_len)
        if seq_len < task.min_seq_len():
            raise DataError(f"task {task.name!r} needs seq_len >= {task.min_seq_len()}, got "
                            f"{seq_len}; raise seq_len or use smaller problems")
        if num_samples < 1:
            raise ConfigError(f"num_samples must be >= 1, got {num_samples}")
        self.task, self.tokenizer, self.split = task, tokenizer, split
        self.seq_len, self.num_samples, self.seed = int(seq_len), int(num_samples), int(seed)

    def __len__(self) -> int:
        return self.num_samples

    def example(self, idx: int):  # noqa: ANN201
        """The :class:`~flowtext.data.TaskExample` behind item ``idx``."""
        return self.task.example(self.split, idx, self.seed)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        if idx < 0:
            raise IndexError(idx)
        return self.task.encode(self.example(idx), self.tokenizer, self.seq_len)


def _check_seq_len(seq_len: int) -> None:
    if not isinstance(seq_len, int) or seq_len < 2:
        raise DataError(f"seq_len must be an int >= 2, got {seq_len!r}")
