"""Hugging Face tokenizers and corpora (the optional ``hf`` extra; nothing is downloaded).

* ``bpe`` (or ``bpe:N`` for ``N`` ids): a byte-level BPE vocabulary trained with Hugging Face
  ``tokenizers`` on the train split of the chosen corpus, cached by the corpus identity. Ids
  0, 1, 2 are PAD, BOS, EOS; every other token stands for a fixed byte string, so
  :attr:`~flowtext.data.Tokenizer.token_bytes` is exact.
* any ``tokenizer.json`` on disk (a path to the file or to a model folder holding one): its
  special tokens are read from a ``tokenizer_config.json`` beside it, or found by their usual
  names (``<|endoftext|>``, ``</s>``, ...).
* :class:`HFCorpus`: JSON Lines, Parquet, or a ``datasets`` dataset written by
  ``save_to_disk``, streamed document by document (one row = one document, its ``text_field``)
  into the token cache with a progress bar.

Every tokenizer here carries its whole ``tokenizer.json`` in its state, so a checkpoint decodes
on its own; ``bytes_per_token`` is the mean UTF-8 bytes per token on the corpus's train split.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flowtext.data._cache import _key, _slug, _write_json, default_cache_dir
from flowtext.data._corpora import (
    DEFAULT_FRACTIONS,
    SPLITS,
    Corpus,
    _check_split,
    _utf8_cut,
    split_of,
)
from flowtext.data._tokenizers import STATE_LOADERS, Tokenizer, _check_text, _ids_array
from flowtext.errors import ConfigError, DataError

__all__ = [
    "BPE_DEFAULT_VOCAB",
    "HFCorpus",
    "HFTokenizer",
    "build_bpe_tokenizer",
    "hf_corpus_for",
    "is_tokenizer_spec",
    "load_tokenizer_json",
    "require",
    "tokenizer_for",
]

BPE_DEFAULT_VOCAB = 1024
"""Ids of the ``bpe`` tokenizer when no size is given (``bpe:N`` sets it)."""

SPECIALS = ("<|pad|>", "<|bos|>", "<|eos|>")
_EOS_NAMES = ("<|eos|>", "<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "[SEP]")
_BOS_NAMES = ("<|bos|>", "<s>", "<|begin_of_text|>", "<bos>", "[CLS]")
_PAD_NAMES = ("<|pad|>", "<pad>", "[PAD]", "<|padding|>")
_SAMPLE_BYTES = 2_000_000


def require(module: str) -> Any:
    """Import an optional Hugging Face package, or raise :class:`ConfigError` naming the extra.

    Args:
        module: ``"tokenizers"``, ``"datasets"``, ``"transformers"``, ``"safetensors"`` ...
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(
            f"this needs the Hugging Face extra ({module} is missing): pip install "
            f"'flowtext[hf]' ({err})"
        ) from None


# ----------------------------------------------------------------------------------- tokenizers


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers.Tokenizer`` behind flowtext's :class:`Tokenizer` interface.

    Args:
        tokenizer_json: The serialized tokenizer (``tokenizer.json`` content).
        specials: ``(pad_id, bos_id, eos_id)``.
        bytes_per_token: Mean UTF-8 bytes per token on the corpus (``None``: the mean of
            :attr:`token_bytes` over the non-special ids).
        kind: ``"bpe"`` (trained here) or ``"hf"`` (loaded from a file).

    Raises:
        DataError: An unreadable tokenizer, or special ids outside the vocabulary.
    """

    def __init__(
        self,
        tokenizer_json: str,
        specials: Sequence[int],
        bytes_per_token: float | None = None,
        kind: str = "hf",
    ) -> None:
        tk = require("tokenizers")
        try:
            self._tok = tk.Tokenizer.from_str(tokenizer_json)
        except Exception as err:  # the Rust side raises its own exception type
            raise DataError(f"not a usable tokenizer.json: {err}") from None
        self._json = json.dumps(json.loads(self._tok.to_str()), sort_keys=True)
        self.kind = kind  # type: ignore[misc]  # per instance here: 'bpe' or 'hf'
        self.pad_id, self.bos_id, self.eos_id = (int(i) for i in specials)
        v = self._tok.get_vocab_size(with_added_tokens=True)
        if not all(0 <= i < v for i in self.special_ids):
            raise DataError(f"special ids {tuple(self.special_ids)} outside a vocabulary of {v}")
        self._token_bytes = _token_bytes(self._tok, v, self.special_ids)
        if bytes_per_token is None:
            normal = self._token_bytes[self._token_bytes > 0]
            bytes_per_token = float(normal.mean()) if normal.size else 1.0
        self.bytes_per_token = float(bytes_per_token)

    @property
    def vocab_size(self) -> int:  # noqa: D102
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def token_bytes(self) -> np.ndarray:  # noqa: D102
        return self._token_bytes

    @property
    def backend(self) -> Any:
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._tok

    def encode(self, text: str) -> list[int]:  # noqa: D102
        _check_text(text)
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_bytes(self, data: bytes) -> np.ndarray:  # noqa: D102
        text = bytes(data).decode("utf-8", errors="replace")
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts at once (in parallel in the Rust backend)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:  # noqa: D102
        arr = _ids_array(ids)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise DataError(f"ids outside [0, {self.vocab_size}) for this tokenizer")
        return self._tok.decode(arr.tolist(), skip_special_tokens=skip_special)

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "specials": list(self.special_ids),
            "bytes_per_token": self.bytes_per_token,
            "json": self._json,
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write ``tokenizer.json`` (loadable by ``tokenizers`` and ``transformers``)."""
        self._tok.save(str(path))

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> HFTokenizer:
        """Rebuild from :meth:`state_dict` (e.g. a checkpoint's)."""
        try:
            return cls(state["json"], state["specials"], state["bytes_per_token"], state["kind"])
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"not a Hugging Face tokenizer state ({err})") from None


def _token_bytes(tok: Any, vocab: int, specials: Sequence[int]) -> np.ndarray:
    """UTF-8 bytes per id: exact for byte-level vocabularies, else from decoding each id."""
    out = np.zeros(vocab, dtype=np.int64)
    byte_level = _byte_level_map()
    for token, i in tok.get_vocab(with_added_tokens=True).items():
        if i in specials or i >= vocab:
            continue
        if _is_byte_level(tok) and all(ch in byte_level for ch in token):
            out[i] = len(token)
        else:
            out[i] = len(tok.decode([i], skip_special_tokens=False).encode("utf-8"))
    return out


def _byte_level_map() -> set[str]:
    from tokenizers.pre_tokenizers import ByteLevel  # the optional hf extra

    return set(ByteLevel.alphabet())


def _is_byte_level(tok: Any) -> bool:
    return "ByteLevel" in type(tok.decoder).__name__ if tok.decoder is not None else False


def _corpus_texts(corpus: Corpus, split: str, max_bytes: int | None) -> Iterator[str]:
    for _, data in corpus.documents(split, max_bytes):
        yield data.decode("utf-8", errors="replace")


def _mean_bytes_per_token(tok: HFTokenizer, corpus: Corpus, max_bytes: int | None) -> float:
    """Mean UTF-8 bytes per token on (up to 2 MB of) the train split."""
    n_bytes = n_tokens = 0
    for text in _corpus_texts(corpus, "train", max_bytes):
        ids = tok.encode(text)
        n_bytes += len(text.encode("utf-8"))
        n_tokens += len(ids)
        if n_bytes >= _SAMPLE_BYTES:
            break
    if not n_tokens:
        raise DataError(f"corpus {corpus.describe()!r} has no text to measure the tokenizer on")
    return n_bytes / n_tokens


def build_bpe_tokenizer(
    corpus: Corpus,
    vocab_size: int = BPE_DEFAULT_VOCAB,
    cache_dir: str | os.PathLike[str] | None = None,
    max_bytes: int | None = None,
) -> HFTokenizer:
    """Train (or load from the cache) a byte-level BPE vocabulary on the corpus's train split.

    Args:
        corpus: The corpus.
        vocab_size: Ids in all, the three specials included (``>= 260``: 256 bytes + specials).
        cache_dir: Cache folder; ``None``: :func:`~flowtext.data.default_cache_dir`.
        max_bytes: Cap on the corpus, as for the token cache.

    Returns:
        The tokenizer (``kind == "bpe"``).

    Raises:
        ConfigError: ``vocab_size`` too small or above ``uint16``.
        DataError: An empty corpus.
    """
    if not isinstance(vocab_size, int) or not 260 <= vocab_size <= 65536:
        raise ConfigError(f"bpe vocab_size must be an int in [260, 65536], got {vocab_size!r}")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = _key(corpus.identity(), "bpe", vocab_size, max_bytes)
    path = cache / "vocab" / f"{_slug(corpus.describe())}-bpe{vocab_size}-{key}.json"
    try:
        return HFTokenizer.from_state(json.loads(path.read_text()))
    except (OSError, ValueError, DataError):
        pass
    tk = require("tokenizers")
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = _corpus_texts(corpus, "train", max_bytes)
    first = next(texts, None)
    if first is None:
        raise DataError(f"corpus {corpus.describe()!r} has no training text to learn BPE from")
    tok.train_from_iterator(_chain(first, texts), trainer=trainer)
    out = HFTokenizer(tok.to_str(), (0, 1, 2), kind="bpe")
    out.bytes_per_token = _mean_bytes_per_token(out, corpus, max_bytes)
    _write_json(path, out.state_dict())
    return out


def _chain(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest


def _special_from_config(folder: Path, vocab: dict[str, int]) -> dict[str, int]:
    """Special ids named in a ``tokenizer_config.json`` beside the tokenizer, if any."""
    try:
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return {}
    out = {}
    for role in ("pad", "bos", "eos"):
        entry = cfg.get(f"{role}_token")
        name = entry.get("content") if isinstance(entry, dict) else entry
        if isinstance(name, str) and name in vocab:
            out[role] = vocab[name]
    return out


def load_tokenizer_json(
    path: str | os.PathLike[str],
    corpus: Corpus | None = None,
    max_bytes: int | None = None,
) -> HFTokenizer:
    """A ``tokenizer.json`` from disk (the file, or a folder holding one).

    Args:
        path: The file or its folder (e.g. a Hugging Face model directory).
        corpus: If given, ``bytes_per_token`` is measured on its train split.
        max_bytes: Cap on the corpus for that measurement.

    Raises:
        DataError: No such file, an unreadable tokenizer, or no end-of-sequence token.
    """
    p = Path(path).expanduser()
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        raise DataError(
            f"no tokenizer.json at {str(path)!r}; give the file or a folder holding one"
        )
    text = file.read_text(encoding="utf-8")
    tk = require("tokenizers")
    try:
        vocab = tk.Tokenizer.from_str(text).get_vocab(with_added_tokens=True)
    except Exception as err:  # the Rust side raises its own exception type
        raise DataError(f"{file} is not a usable tokenizer.json: {err}") from None
    roles = _special_from_config(file.parent, vocab)
    for role, names in (("eos", _EOS_NAMES), ("bos", _BOS_NAMES), ("pad", _PAD_NAMES)):
        if role not in roles:
            found = next((vocab[n] for n in names if n in vocab), None)
            if found is not None:
                roles[role] = found
    if "eos" not in roles:
        raise DataError(
            f"{file} has no end-of-sequence token (looked for {', '.join(_EOS_NAMES)} and "
            "tokenizer_config.json); flowtext separates documents with EOS: add one"
        )
    specials = (roles.get("pad", roles["eos"]), roles.get("bos", roles["eos"]), roles["eos"])
    tok = HFTokenizer(text, specials, kind="hf")
    if corpus is not None:
        tok.bytes_per_token = _mean_bytes_per_token(tok, corpus, max_bytes)
    return tok


def is_tokenizer_spec(spec: str) -> bool:
    """Whether ``spec`` names a tokenizer of this module (``bpe``, ``bpe:N`` or a path)."""
    if not isinstance(spec, str):
        return False
    if spec == "bpe" or spec.startswith("bpe:"):
        return True
    p = Path(spec).expanduser()
    return p.suffix == ".json" or (p / "tokenizer.json").is_file()


def tokenizer_for(
    spec: str, corpus: Corpus, cache_dir: str | None = None, max_bytes: int | None = None
) -> HFTokenizer:
    """The tokenizer a :class:`~flowtext.data.FlowTextDataModule` ``tokenizer=`` spec names.

    Args:
        spec: ``"bpe"``, ``"bpe:N"`` or a path to a ``tokenizer.json`` (or its folder).
        corpus: The corpus (BPE is trained on it; bytes per token are measured on it).
        cache_dir: Cache folder.
        max_bytes: Cap on the corpus.

    Raises:
        ConfigError: A malformed ``bpe:N``.
    """
    if spec == "bpe" or spec.startswith("bpe:"):
        size = spec.partition(":")[2]
        if size and not size.isdigit():
            raise ConfigError(f"tokenizer {spec!r}: write bpe:N with N an integer, e.g. bpe:4096")
        return build_bpe_tokenizer(corpus, int(size or BPE_DEFAULT_VOCAB), cache_dir, max_bytes)
    return load_tokenizer_json(spec, corpus, max_bytes)


# -------------------------------------------------------------------------------------- corpora

_SPLIT_NAMES = {
    "train": ("train",),
    "val": ("validation", "val", "valid", "dev"),
    "test": ("test",),
}


def _dataset_kind(path: Path) -> str | None:
    """``"jsonl"``, ``"parquet"``, ``"saved"`` (``save_to_disk``) or ``None``."""
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return "saved"
        return None
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson") or path.name.lower().endswith(".jsonl.gz"):
        return "jsonl"
    return "parquet" if suffix == ".parquet" else None


def hf_corpus_for(spec: str, **kwargs: Any) -> HFCorpus | None:
    """An :class:`HFCorpus` when ``spec`` is a JSONL/Parquet file or a saved dataset, else None."""
    if not isinstance(spec, str) or not spec:
        return None
    path = Path(spec).expanduser()
    if not path.exists() or _dataset_kind(path) is None:
        return None
    try:
        return HFCorpus(path, **kwargs)
    except TypeError as err:
        raise ConfigError(f"bad arguments for a dataset corpus: {err}") from None


class HFCorpus(Corpus):
    """Rows of a JSON Lines or Parquet file, or of a dataset saved with ``save_to_disk``.

    Each row's ``text_field`` is one document. A saved ``DatasetDict`` with train, validation
    (``validation``/``val``/``valid``/``dev``) and test splits keeps them; otherwise every row is
    assigned a split by the hash of ``"<file>:<row>"`` (:func:`~flowtext.data.split_of`), so
    adding rows never moves existing ones. Rows stream in order with a progress bar.

    Args:
        path: ``.jsonl`` (optionally ``.jsonl.gz``), ``.parquet``, or a ``save_to_disk`` folder.
        fractions: ``(train, val, test)`` fractions for hash-split rows.
        text_field: Column holding the text.
        progress: Show a progress bar while streaming (``None``: only on a terminal).

    Raises:
        DataError: Missing path, an unknown format, or a dataset without ``text_field``.
    """

    name = "hf"

    def __init__(
        self,
        path: str | os.PathLike[str],
        fractions: Sequence[float] = DEFAULT_FRACTIONS,
        text_field: str = "text",
        progress: bool | None = None,
    ) -> None:
        super().__init__(fractions)
        self.path = Path(path).expanduser().resolve()
        self.format = _dataset_kind(self.path) if self.path.exists() else None
        if self.format is None:
            raise DataError(
                f"{str(path)!r} is not a JSON Lines (.jsonl) or Parquet file or a dataset folder "
                "written by save_to_disk"
            )
        self.text_field = text_field
        self.progress = progress

    def describe(self) -> str:  # noqa: D102
        return self.path.name

    def identity(self) -> dict[str, Any]:  # noqa: D102
        files = [self.path] if self.path.is_file() else sorted(self.path.rglob("*"))
        listing = [
            (f.relative_to(self.path.parent).as_posix(), f.stat().st_size, f.stat().st_mtime_ns)
            for f in files
            if f.is_file()
        ]
        return {
            "path": str(self.path),
            "format": self.format,
            "text_field": self.text_field,
            "fractions": list(self.fractions),
            "listing_sha1": hashlib.sha1(repr(listing).encode()).hexdigest(),
        }

    def documents(self, split: str, max_bytes: int | None = None) -> Iterator[tuple[str, bytes]]:  # noqa: D102
        _check_split(split)
        if self.total_rows() == 0:
            raise DataError(f"dataset {str(self.path)!r} is empty: it has no rows")
        budget = None if max_bytes is None else int(max_bytes * self.fractions[SPLITS.index(split)])
        for name, text in self._rows(split):
            if budget is not None and budget <= 0:
                return
            data = text.encode("utf-8", errors="replace")
            if budget is not None:
                data = _utf8_cut(data, budget)
                budget -= len(data)
            if data:
                yield name, data

    # -- row sources -------------------------------------------------------------------------

    def total_rows(self) -> int:
        """Rows over all splits (for the progress bar and the empty-dataset check)."""
        return sum(n for _, n, _ in self._sources())

    def _sources(self) -> list[tuple[str, int, Any]]:
        """``(split name or "", rows, reader)`` of each part of the dataset."""
        if self.format == "jsonl":
            return [("", _count_lines(self.path), None)]
        if self.format == "parquet":
            pq = require("pyarrow.parquet")
            return [("", pq.ParquetFile(self.path).metadata.num_rows, None)]
        try:
            ds = require("datasets").load_from_disk(str(self.path))
        except (IndexError, ValueError, OSError) as err:  # datasets fails this way on 0 rows
            raise DataError(
                f"cannot read the dataset {str(self.path)!r}: it is empty or damaged ({err})"
            ) from None
        parts = ds.items() if hasattr(ds, "items") else [("", ds)]
        return [(name, len(part), part) for name, part in parts]

    def _rows(self, split: str) -> Iterator[tuple[str, str]]:
        sources = self._sources()
        named = {name for name, _, _ in sources}
        own = all(any(a in named for a in _SPLIT_NAMES[s]) for s in SPLITS)
        for part, n, reader in sources:
            if own and part not in _SPLIT_NAMES[split]:
                continue
            label = f"{self.path.name}{'/' + part if part else ''}"
            for i, text in enumerate(self._bar(self._texts(reader), n, f"{label} ({split})")):
                key = f"{label}:{i}"
                if own or split_of(key, self.fractions) == split:
                    yield key, text

    def _texts(self, reader: Any) -> Iterator[str]:
        field = self.text_field
        if self.format == "jsonl":
            yield from _jsonl_texts(self.path, field)
        elif self.format == "parquet":
            pq = require("pyarrow.parquet")
            f = pq.ParquetFile(self.path)
            if field not in f.schema_arrow.names:
                raise DataError(_no_field(self.path, field, f.schema_arrow.names))
            for batch in f.iter_batches(columns=[field], batch_size=1024):
                yield from (t or "" for t in batch.column(0).to_pylist())
        else:
            if field not in reader.column_names:
                raise DataError(_no_field(self.path, field, reader.column_names))
            for batch in reader.select_columns([field]).iter(batch_size=1024):
                yield from (t or "" for t in batch[field])

    def _bar(self, rows: Iterator[str], total: int, desc: str) -> Iterable[str]:
        if self.progress is False:
            return rows
        from tqdm.auto import tqdm  # comes with the optional hf extra

        disable = None if self.progress is None else False
        return tqdm(rows, total=total, desc=desc, unit=" docs", disable=disable, leave=False)


def _no_field(path: Path, field: str, names: Sequence[str]) -> str:
    return (
        f"{path} has no column {field!r} (columns: {', '.join(names)}); set "
        "corpus_options: {text_field: NAME}"
    )


def _count_lines(path: Path) -> int:
    with _open_text(path) as f:
        return sum(1 for line in f if line.strip())


def _open_text(path: Path) -> Any:
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _jsonl_texts(path: Path, field: str) -> Iterator[str]:
    with _open_text(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                raise DataError(f"{path}:{n} is not valid JSON ({err})") from None
            if not isinstance(row, dict) or field not in row:
                raise DataError(f"{path}:{n} has no field {field!r}; set text_field")
            yield str(row[field] or "")


STATE_LOADERS.update(bpe=HFTokenizer.from_state, hf=HFTokenizer.from_state)
