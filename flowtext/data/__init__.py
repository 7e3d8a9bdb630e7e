"""Data for flowtext: tokenizers, corpora, synthetic tasks, memmapped token caches, a DataModule.

* Tokenizers: :class:`ByteTokenizer` (default; 256 bytes + PAD/BOS/EOS),
  :class:`CharTokenizer` (the characters of a UTF-8 corpus) and, with the ``hf`` extra,
  :class:`HFTokenizer` (``bpe`` trained on the corpus by :func:`build_bpe_tokenizer`, or any
  ``tokenizer.json`` via :func:`load_tokenizer_json`).
* Corpora: ``stdlib`` (:class:`StdlibCorpus`, the running interpreter's standard library) and
  any text file or folder (:class:`TextCorpus`); split by file with :func:`split_of`. With the
  ``hf`` extra: JSON Lines, Parquet and ``save_to_disk`` datasets (:class:`HFCorpus`).
* Tasks: ``addition`` (:class:`AdditionTask`), ``reverse`` (:class:`ReversalTask`) and ``copy``
  (:class:`CopyTask`), with :meth:`Task.exact_match`.
* Caching: :func:`prepare_tokens` writes ``uint16`` memmaps atomically; :func:`open_tokens`
  reads them.
* :class:`FlowTextDataModule` ties it together for Lightning and the CLI.

Example:
    >>> from flowtext.data import FlowTextDataModule
    >>> dm = FlowTextDataModule("addition", seq_len=16, batch_size=4)
    >>> dm.setup("fit")
    >>> batch = next(iter(dm.train_dataloader()))
    >>> batch["tokens"].shape, batch["answer_mask"].dtype
    (torch.Size([4, 16]), torch.bool)
"""

from __future__ import annotations

from flowtext.data._cache import (
    build_char_tokenizer,
    default_cache_dir,
    open_tokens,
    prepare_tokens,
    write_atomic,
)
from flowtext.data._corpora import (
    SPLITS,
    Corpus,
    StdlibCorpus,
    TextCorpus,
    get,
    names,
    register,
    registry,
    resolve_corpus,
    split_of,
)
from flowtext.data._datasets import EpochSampler, ResumableLoader, TaskDataset, TokenWindows
from flowtext.data._hf import HFCorpus, HFTokenizer, build_bpe_tokenizer, load_tokenizer_json
from flowtext.data._module import TOKENIZERS, FlowTextDataModule
from flowtext.data._tasks import AdditionTask, CopyTask, ReversalTask, Task, TaskExample
from flowtext.data._tokenizers import (
    ByteTokenizer,
    CharTokenizer,
    Tokenizer,
    tokenizer_from_state,
)

__all__ = [
    "SPLITS",
    "TOKENIZERS",
    "AdditionTask",
    "ByteTokenizer",
    "CharTokenizer",
    "CopyTask",
    "Corpus",
    "EpochSampler",
    "FlowTextDataModule",
    "HFCorpus",
    "HFTokenizer",
    "ResumableLoader",
    "ReversalTask",
    "StdlibCorpus",
    "Task",
    "TaskDataset",
    "TaskExample",
    "TextCorpus",
    "TokenWindows",
    "Tokenizer",
    "build_bpe_tokenizer",
    "build_char_tokenizer",
    "default_cache_dir",
    "get",
    "load_tokenizer_json",
    "names",
    "open_tokens",
    "prepare_tokens",
    "register",
    "registry",
    "resolve_corpus",
    "split_of",
    "tokenizer_from_state",
    "write_atomic",
]
