"""The LightningDataModule: a corpus or task by name or path, tokenized into memmaps."""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from flowtext.data import _hf
from flowtext.data._cache import build_char_tokenizer, prepare_tokens
from flowtext.data._corpora import (
    DEFAULT_FRACTIONS,
    SPLITS,
    Corpus,
    check_fractions,
    resolve_corpus,
)
from flowtext.data._datasets import (
    EpochSampler,
    ResumableLoader,
    TaskDataset,
    TokenWindows,
    _check_seq_len,
)
from flowtext.data._tasks import Task
from flowtext.data._tokenizers import ByteTokenizer, Tokenizer, tokenizer_from_state
from flowtext.errors import ConfigError, DataError

__all__ = ["TOKENIZERS", "FlowTextDataModule"]

TOKENIZERS = ("byte", "char", "bpe")

COUNT_TOKENS = 1 << 20
"""Default cap on the tokens :meth:`FlowTextDataModule.token_counts` reads."""

COUNT_CHUNKS = 64
"""Evenly spaced runs :meth:`FlowTextDataModule.token_counts` reads from a larger split."""


def _spread_sample(tokens: np.ndarray, max_tokens: int) -> np.ndarray:
    """All of ``tokens``, or :data:`COUNT_CHUNKS` evenly spaced runs totalling ``<= max_tokens``."""
    n = len(tokens)
    if n <= max_tokens:
        return np.asarray(tokens)
    size = max(1, max_tokens // COUNT_CHUNKS)
    starts = np.linspace(0, n - size, min(COUNT_CHUNKS, max_tokens)).round().astype(np.int64)
    return np.concatenate([np.asarray(tokens[s : s + size]) for s in starts])


class FlowTextDataModule(L.LightningDataModule):
    """Data for the flow LMs: a text corpus or a synthetic task, in batches of token windows.

    ``prepare_data`` tokenizes the three splits of a text corpus into the cache (once; later
    runs reuse it); ``setup`` opens the memmaps. Tasks need no preparation. Batches are dicts
    with ``tokens`` (LongTensor ``[B, L]``) and, for tasks, ``answer_mask`` (BoolTensor
    ``[B, L]``). The tokenizer is saved in checkpoints (:meth:`state_dict`) and checked on load.

    Args:
        corpus: A registered name (``"stdlib"``: the Python standard library, the default;
            ``"addition"``, ``"reverse"``, ``"copy"``: synthetic tasks) or the path of a text
            file or folder, a JSON Lines or Parquet file, or a ``datasets`` folder written by
            ``save_to_disk`` (``hf`` extra; ``corpus_options: {text_field: NAME}``).
        tokenizer: ``"byte"`` (bytes + PAD/BOS/EOS, 259 ids), ``"char"`` (the characters of
            the corpus; needs UTF-8 text), ``"bpe"`` or ``"bpe:N"`` (byte-level BPE with ``N``
            ids trained on the corpus, ``hf`` extra) or the path of a ``tokenizer.json``; only
            ``byte`` for tasks.
        seq_len: Tokens per example ``L`` (>= 2).
        batch_size: Examples per batch ``B``.
        num_workers: DataLoader worker processes.
        max_bytes: Cap on the text corpus in bytes, shared among the splits by their fractions
            (``None``: everything).
        train_samples_per_epoch: Random training windows (or task examples) per epoch.
        eval_samples: Validation/test windows (evenly spaced; ``None``: all non-overlapping
            windows) or task examples (``None``: 512).
        splits: ``(train, val, test)`` fractions, summing to 1.
        pattern: Glob pattern for files when ``corpus`` is a folder.
        corpus_options: Extra corpus/task arguments, e.g. ``{"digits": 5}`` for addition,
            ``{"include_tests": true}`` for stdlib.
        seed: Seed of the training windows and task examples.
        cache_dir: Token cache folder (``None``: ``$FLOWTEXT_CACHE`` or ``~/.cache/flowtext``).

    Raises:
        ConfigError: Unknown corpus name or tokenizer, or bad sizes.
        DataError: Missing path, ``seq_len < 2``, or a task that does not fit ``seq_len``.
    """

    # the training sampler, made on first use and kept (see _train_sampler)
    _sampler: EpochSampler
    _sampler_key: tuple[int, int, int, int]

    def __init__(
        self,
        corpus: str = "stdlib",
        tokenizer: str = "byte",
        seq_len: int = 256,
        batch_size: int = 32,
        num_workers: int = 0,
        max_bytes: int | None = None,
        train_samples_per_epoch: int = 10_000,
        eval_samples: int | None = None,
        splits: tuple[float, float, float] = DEFAULT_FRACTIONS,
        pattern: str = "*",
        corpus_options: dict[str, Any] | None = None,
        seed: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        _check_seq_len(seq_len)
        if tokenizer not in TOKENIZERS and not _hf.is_tokenizer_spec(tokenizer):
            raise ConfigError(
                f"unknown tokenizer {tokenizer!r}; valid names: {', '.join(TOKENIZERS)}, "
                "bpe:N or the path of a tokenizer.json"
            )
        for name, value in (
            ("batch_size", batch_size),
            ("train_samples_per_epoch", train_samples_per_epoch),
        ):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError(f"num_workers must be a non-negative int, got {num_workers!r}")
        if max_bytes is not None and max_bytes < 1:
            raise ConfigError(f"max_bytes must be positive or None, got {max_bytes!r}")
        if eval_samples is not None and eval_samples < 1:
            raise ConfigError(f"eval_samples must be positive or None, got {eval_samples!r}")
        # saved in checkpoints, not logged: the logger merges module and data hyper-parameters
        # and refuses keys both have with different values (``seed``); config.yaml keeps them
        self.save_hyperparameters(logger=False)
        self.corpus_name, self.tokenizer_name = corpus, tokenizer  # what is read
        self.max_bytes, self.splits = max_bytes, check_fractions(splits)
        self.seq_len, self.batch_size, self.num_workers = seq_len, batch_size, num_workers
        self.train_samples_per_epoch, self.eval_samples = train_samples_per_epoch, eval_samples
        self.seed, self.cache_dir = seed, cache_dir
        options = corpus_options or {}
        self.source: Corpus | Task = _hf.hf_corpus_for(
            corpus, fractions=self.splits, **options
        ) or resolve_corpus(corpus, fractions=self.splits, pattern=pattern, **options)
        if isinstance(self.source, Task):
            if tokenizer != "byte":
                raise ConfigError(f"task {corpus!r} uses the byte tokenizer; set tokenizer='byte'")
            need = self.source.min_seq_len()
            if seq_len < need:
                raise DataError(
                    f"task {corpus!r} needs seq_len >= {need}, got {seq_len}; "
                    "raise seq_len or use smaller problems"
                )
        self._tokenizer: Tokenizer | None = None
        self.datasets: dict[str, Any] = {}

    @property
    def is_task(self) -> bool:
        """Whether the source is a synthetic task (else a text corpus)."""
        return isinstance(self.source, Task)

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer (a ``char`` vocabulary is built from the corpus on first use)."""
        if self._tokenizer is None:
            if self.tokenizer_name == "byte":
                self._tokenizer = ByteTokenizer()
            elif self.tokenizer_name == "char":
                self._tokenizer = build_char_tokenizer(self._corpus, self.cache_dir, self.max_bytes)
            else:
                self._tokenizer = _hf.tokenizer_for(
                    self.tokenizer_name, self._corpus, self.cache_dir, self.max_bytes
                )
        return self._tokenizer

    @property
    def _corpus(self) -> Corpus:
        # the source of a non-byte tokenizer or of token files: never a task (__init__ checks)
        assert not isinstance(self.source, Task)
        return self.source

    @property
    def vocab_size(self) -> int:
        """Vocabulary size of :attr:`tokenizer` (special tokens included)."""
        return self.tokenizer.vocab_size

    @property
    def bytes_per_token(self) -> float:
        """Mean UTF-8 bytes per token, for bits per byte (1.0 for the byte tokenizer)."""
        return self.tokenizer.bytes_per_token

    def prepare_data(self) -> None:
        """Tokenize every split of a text corpus into the cache (no-op when cached or a task)."""
        if self.is_task:
            return
        for split in SPLITS:
            if self.splits[SPLITS.index(split)] > 0:
                self._prepare(split)

    def _prepare(self, split: str):  # noqa: ANN202
        return prepare_tokens(self._corpus, self.tokenizer, split, self.cache_dir, self.max_bytes)

    def _dataset(self, split: str) -> TokenWindows | TaskDataset:
        train = split == "train"
        if self.splits[SPLITS.index(split)] == 0:
            raise DataError(f"split {split!r} has fraction 0; change `splits`")
        if isinstance(self.source, Task):
            n = self.train_samples_per_epoch if train else (self.eval_samples or 512)
            return TaskDataset(self.source, self.tokenizer, split, self.seq_len, n, self.seed)
        n_windows = self.train_samples_per_epoch if train else self.eval_samples
        return TokenWindows(
            self._prepare(split), self.seq_len, train, n_windows, self.seed, self.tokenizer
        )

    def setup(self, stage: str | None = None) -> None:
        """Open the datasets a stage needs.

        ``fit``: train and val; ``validate``: val; ``test`` and ``predict``: test; ``None``: all.

        Raises:
            DataError: A split shorter than one window.
        """
        wanted = {
            "fit": ("train", "val"),
            "validate": ("val",),
            "test": ("test",),
            "predict": ("test",),
        }.get(stage or "", SPLITS)
        for split in wanted:
            if split not in self.datasets:
                self.datasets[split] = self._dataset(split)

    def _get(self, split: str) -> TokenWindows | TaskDataset:
        if split not in self.datasets:
            self.datasets[split] = self._dataset(split)
        return self.datasets[split]

    def _loader(self, split: str) -> DataLoader:
        ds = self._get(split)
        train = split == "train"
        return (ResumableLoader if train else DataLoader)(
            ds,
            batch_size=self.batch_size,
            sampler=self._train_sampler(len(ds)) if train else None,
            shuffle=False,
            drop_last=train and len(ds) >= self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _train_sampler(self, n: int) -> EpochSampler:
        # one sampler for the module's life, so a re-created loader still moves on per epoch;
        # under distributed training each rank takes its own blocks of batch_size items
        trainer = getattr(self, "trainer", None)
        world = int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1
        rank = int(getattr(trainer, "global_rank", 0) or 0) if trainer is not None else 0
        key = (n, self.batch_size, world, rank)
        sampler: EpochSampler | None = getattr(self, "_sampler", None)
        if sampler is None or self._sampler_key != key:
            sampler = EpochSampler(n, batch_size=self.batch_size, num_replicas=world, rank=rank)
            self._sampler, self._sampler_key = sampler, key
        return sampler

    def train_dataloader(self) -> DataLoader:
        """Random training windows, ``train_samples_per_epoch`` per epoch.

        The loader is a :class:`~flowtext.data.ResumableLoader`: its position in the epoch is
        saved in Lightning checkpoints, so a run resumed mid-epoch sees the same batches as an
        uninterrupted one. Under distributed training each rank gets its own batches
        (:class:`~flowtext.data.EpochSampler`); ``batch_size`` is per rank.
        """
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        """Fixed validation windows (or task examples), in order."""
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        """Fixed test windows (or task examples), in order."""
        return self._loader("test")

    def token_counts(self, max_tokens: int = COUNT_TOKENS) -> torch.Tensor:
        """How often each token id occurs in the training split (on a bounded sample).

        A text corpus counts its whole prepared training split when it holds at most
        ``max_tokens`` tokens, else :data:`COUNT_CHUNKS` evenly spaced runs of
        ``max_tokens // COUNT_CHUNKS`` tokens; a task counts its first
        ``max(1, max_tokens // seq_len)`` training examples (at most an epoch), padding
        included: the tokens the model trains on. Deterministic, and cheap next to a fit.

        Args:
            max_tokens: Cap on the tokens read (``>= 1``).

        Returns:
            ``[vocab_size]`` int64 counts, summing to the tokens read.

        Raises:
            ConfigError: ``max_tokens < 1``.
            DataError: The training split is empty (fraction 0) or shorter than one window.
        """
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ConfigError(f"max_tokens must be a positive int, got {max_tokens!r}")
        ds = self._get("train")
        if isinstance(ds, TaskDataset):
            n = min(len(ds), max(1, max_tokens // self.seq_len))
            ids = torch.cat([ds[i]["tokens"] for i in range(n)])
        else:
            ids = torch.from_numpy(_spread_sample(ds.tokens, max_tokens).astype(np.int64))
        return torch.bincount(ids, minlength=self.vocab_size)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint stores: the tokenizer state."""
        return {"tokenizer": self.tokenizer.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Check that a checkpoint's tokenizer is this one.

        Raises:
            DataError: The checkpoint was trained with another tokenizer.
        """
        if "tokenizer" in state_dict:
            self.tokenizer.check_state(tokenizer_from_state(state_dict["tokenizer"]).state_dict())
