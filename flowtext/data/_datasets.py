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
from typing import Any, cast

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from flowtext.data._cache import open_tokens
from flowtext.data._tasks import Task
from flowtext.data._tokenizers import Tokenizer
from flowtext.errors import ConfigError, DataError

__all__ = ["EpochSampler", "ResumableLoader", "TaskDataset", "TokenWindows"]


class EpochSampler(DistributedSampler):
    """Training indices ``epoch * num_samples + i``, sharded over ranks, resumable mid-epoch.

    With one rank it yields ``epoch * n + i`` for ``i = 0 .. n - 1`` (``n = num_samples``).
    With ``W`` ranks the epoch is cut into blocks of ``batch_size`` consecutive indices and rank
    ``r`` takes blocks ``r, r + W, r + 2W, ...`` (a trailing part that cannot give every rank a
    full block is dropped). Rank ``r``'s ``k``-th batch is therefore global block ``k W + r``:
    ``W`` ranks with batch ``b`` see exactly the batches of one process with batch ``b`` and
    ``accumulate_grad_batches = W`` (see ``docs/scale.md``), and no index is seen twice.

    The epoch is the last value given to :meth:`set_epoch` (Lightning calls it at the start of
    each training epoch, also when resuming); without calls, it counts iterations. Being a
    :class:`~torch.utils.data.DistributedSampler`, Lightning does not wrap it again.
    :meth:`resume` makes the next iteration of a given epoch start after the items already
    consumed (see :class:`ResumableLoader`).

    Args:
        num_samples: Items per epoch over all ranks ``n``.
        batch_size: Items per batch on each rank ``b`` (the sharding block).
        num_replicas: Number of ranks ``W``.
        rank: This rank ``r`` in ``[0, W)``.

    Raises:
        ConfigError: Non-positive sizes, a rank outside ``[0, W)``, or fewer than ``b W``
            items per epoch with several ranks.
    """

    def __init__(
        self, num_samples: int, batch_size: int = 1, num_replicas: int = 1, rank: int = 0
    ) -> None:
        for name, value in (
            ("num_samples", num_samples),
            ("batch_size", batch_size),
            ("num_replicas", num_replicas),
        ):
            if int(value) < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if not 0 <= rank < num_replicas:
            raise ConfigError(f"rank must lie in [0, {num_replicas}), got {rank}")
        super().__init__(
            # only len() of the dataset is used; torch's stub asks for a Dataset
            cast(Dataset, range(int(num_samples))),
            num_replicas=int(num_replicas),
            rank=int(rank),
            shuffle=False,
            drop_last=True,
        )
        self.epoch_size = int(num_samples)
        self.batch_size = int(batch_size)
        if self.num_replicas == 1:
            per_rank = self.epoch_size
        else:
            per_rank = self.epoch_size // (self.batch_size * self.num_replicas) * self.batch_size
            if per_rank == 0:
                raise ConfigError(
                    f"{self.epoch_size} training items per epoch cannot give each of "
                    f"{self.num_replicas} ranks a batch of {self.batch_size}; raise "
                    "train_samples_per_epoch or lower batch_size"
                )
        self.num_samples = per_rank
        self.total_size = per_rank * self.num_replicas
        self.epoch = 0
        self.current_epoch = 0
        self.start = 0
        self._explicit = False
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` for the next iteration."""
        self.epoch = int(epoch)
        self._explicit = True

    def resume(self, epoch: int, consumed: int) -> None:
        """Make the next iteration of ``epoch`` skip the first ``consumed`` items of the epoch.

        Args:
            epoch: The epoch that was interrupted.
            consumed: Items of that epoch already trained on, over all ranks.
        """
        self.epoch = int(epoch)
        self._resume = (int(epoch), int(consumed) // self.num_replicas)

    def index(self, epoch: int, i: int) -> int:
        """The dataset index of this rank's ``i``-th item of ``epoch``."""
        block = (i // self.batch_size) * self.num_replicas + self.rank
        return epoch * self.epoch_size + block * self.batch_size + i % self.batch_size

    def __iter__(self) -> Iterator[int]:
        epoch = self.epoch
        if not self._explicit:
            self.epoch += 1
        self._explicit = False
        start = 0
        if self._resume is not None and self._resume[0] == epoch:
            start = min(self._resume[1], self.num_samples)
        self._resume = None
        self.current_epoch, self.start = epoch, start
        return (self.index(epoch, i) for i in range(start, self.num_samples))

    def __len__(self) -> int:
        return self.num_samples


class ResumableLoader(DataLoader):
    """A training :class:`~torch.utils.data.DataLoader` whose position is saved in checkpoints.

    Lightning stores the :meth:`state_dict` of stateful training loaders in every checkpoint and
    calls :meth:`load_state_dict` on resume, before the first batch. The state is the epoch and
    the number of items (over all ranks) handed out in it, counted per batch as Lightning takes
    them, so worker prefetching does not count. The sampler must be an :class:`EpochSampler`.
    """

    sampler: EpochSampler
    batch_size: int

    # a counting generator over the base iterator (Lightning only iterates it)
    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        sampler = self.sampler
        batches = 0

        def counted() -> Iterator[Any]:
            nonlocal batches
            for batch in it:
                batches += 1
                self._position = (
                    sampler.current_epoch,
                    (sampler.start + batches * self.batch_size) * sampler.num_replicas,
                )
                yield batch

        it = super().__iter__()
        self._position = (sampler.current_epoch, sampler.start * sampler.num_replicas)
        return counted()

    def state_dict(self) -> dict[str, int]:
        """``{"epoch": e, "consumed": items of epoch e trained on, over all ranks}``."""
        epoch, consumed = getattr(self, "_position", (self.sampler.epoch, 0))
        return {"epoch": int(epoch), "consumed": int(consumed)}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Resume the sampler where :meth:`state_dict` was taken."""
        self.sampler.resume(state_dict["epoch"], state_dict["consumed"])


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

    Items are ``{"tokens": LongTensor[L]}``; training items also carry ``"index"`` (the
    item's ``idx``, a global sample number that keys its noise, see
    :meth:`flowtext.lm.FlowLM.batch_generators`).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        seq_len: int,
        train: bool,
        num_samples: int | None = None,
        seed: int = 0,
        tokenizer: Tokenizer | None = None,
    ) -> None:
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
            pick = (
                np.linspace(0, n_win - 1, k).round().astype(np.int64)
                if k < n_win
                else np.arange(n_win)
            )
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
        window = np.asarray(self.tokens[s : s + self.seq_len], dtype=np.int64)
        item = {"tokens": torch.from_numpy(window)}
        if self.train:
            item["index"] = torch.tensor(int(idx))
        return item


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

    Items are ``{"tokens": LongTensor[L], "answer_mask": BoolTensor[L]}``, plus ``"index"``
    (``idx``, the global sample number) in the training split.

    Raises:
        DataError: ``seq_len`` too short for the task.
    """

    def __init__(
        self,
        task: Task,
        tokenizer: Tokenizer,
        split: str,
        seq_len: int,
        num_samples: int,
        seed: int = 0,
    ) -> None:
        _check_seq_len(seq_len)
        if seq_len < task.min_seq_len():
            raise DataError(
                f"task {task.name!r} needs seq_len >= {task.min_seq_len()}, got "
                f"{seq_len}; raise seq_len or use smaller problems"
            )
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
        item = self.task.encode(self.example(idx), self.tokenizer, self.seq_len)
        if self.split == "train":
            item["index"] = torch.tensor(int(idx))
        return item


def _check_seq_len(seq_len: int) -> None:
    if not isinstance(seq_len, int) or seq_len < 2:
        raise DataError(f"seq_len must be an int >= 2, got {seq_len!r}")
