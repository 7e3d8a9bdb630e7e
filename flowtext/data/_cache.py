"""Token caches: one memory-mapped ``uint16`` array per (corpus, tokenizer, split, cap).

Layout under the cache folder (argument, else ``$FLOWTEXT_CACHE``, else ``~/.cache/flowtext``)::

    tokens/<corpus>-<split>-<key>.bin    # uint16 ids, documents joined by EOS (one after each)
    tokens/<corpus>-<split>-<key>.json   # meta: n_tokens, n_bytes, documents, tokenizer, ...
    vocab/<corpus>-<key>.json            # char vocabularies built from a corpus

``key`` is the SHA-1 of the corpus identity (file listing with sizes and modification times),
the tokenizer state, the split and ``max_bytes``. Both files are written to a temporary name
in the same folder, flushed to disk, then renamed with :func:`os.replace`, the ``.bin`` first:
an interrupted prepare leaves at most a stray ``*.tmp`` file, never a final file with half its
content, and a ``.bin`` counts only once its ``.json`` exists and the sizes agree.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from flowtext.data._corpora import Corpus
from flowtext.data._tokenizers import CharTokenizer, Tokenizer
from flowtext.errors import DataError

__all__ = [
    "build_char_tokenizer",
    "default_cache_dir",
    "open_tokens",
    "prepare_tokens",
    "write_atomic",
]

FORMAT = 1
DTYPE = np.uint16


def default_cache_dir() -> Path:
    """``$FLOWTEXT_CACHE`` if set, else ``~/.cache/flowtext``."""
    env = os.environ.get("FLOWTEXT_CACHE")
    return Path(env).expanduser() if env else Path("~/.cache/flowtext").expanduser()


def _key(*parts: Any) -> str:
    blob = json.dumps([FORMAT, *parts], sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:16]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:40] or "corpus"


def write_atomic(path: str | os.PathLike[str], chunks: Iterable[bytes]) -> int:
    """Write ``chunks`` to ``path`` atomically: temp file in the same folder, fsync, rename.

    If writing fails (an exception, or the process dies) ``path`` is left as it was: absent or
    the previous complete file. The temp file is removed on exceptions.

    Args:
        path: Final file path (its folder is created).
        chunks: Byte strings, written in order.

    Returns:
        Bytes written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        n = 0
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
                n += len(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return n


def _write_json(path: Path, obj: Any) -> None:
    write_atomic(path, [json.dumps(obj, indent=1, sort_keys=True).encode()])


def _paths(
    corpus: Corpus, tokenizer: Tokenizer, split: str, cache_dir: Path, max_bytes: int | None
) -> tuple[Path, Path]:
    key = _key(corpus.identity(), tokenizer.state_dict(), split, max_bytes)
    stem = cache_dir / "tokens" / f"{_slug(corpus.describe())}-{split}-{key}"
    # not with_suffix: a corpus named "notes.txt" would lose "-split-key" and share one file
    return stem.with_name(stem.name + ".bin"), stem.with_name(stem.name + ".json")


def _read_meta(bin_path: Path) -> dict[str, Any] | None:
    meta_path = bin_path.with_suffix(".json")
    try:
        meta = json.loads(meta_path.read_text())
        size = bin_path.stat().st_size
    except (OSError, ValueError):
        return None
    if meta.get("format") != FORMAT or size != meta.get("n_tokens", -1) * np.dtype(DTYPE).itemsize:
        return None
    return meta


def prepare_tokens(
    corpus: Corpus,
    tokenizer: Tokenizer,
    split: str,
    cache_dir: str | os.PathLike[str] | None = None,
    max_bytes: int | None = None,
) -> Path:
    """Tokenize one split of ``corpus`` into the cache (if not there yet); stream, low memory.

    Documents are encoded one at a time, each followed by EOS, and appended to the ``.bin``.

    Args:
        corpus: The corpus.
        tokenizer: The tokenizer (ids must fit ``uint16``).
        split: ``"train"``, ``"val"`` or ``"test"``.
        cache_dir: Cache folder; ``None``: :func:`default_cache_dir`.
        max_bytes: Cap on the whole corpus (see :class:`~flowtext.data.Corpus`).

    Returns:
        Path of the ``.bin`` file (its meta is the same path with ``.json``).

    Raises:
        DataError: The split holds no text (the message names the fix), or the vocabulary does
            not fit ``uint16``.
    """
    if tokenizer.vocab_size > np.iinfo(DTYPE).max + 1:
        raise DataError(f"vocabulary of {tokenizer.vocab_size} ids does not fit uint16")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    bin_path, meta_path = _paths(corpus, tokenizer, split, cache, max_bytes)
    if _read_meta(bin_path) is not None:
        return bin_path
    docs: list[str] = []
    stats = {"n_bytes": 0}
    eos = np.array([tokenizer.eos_id], dtype=DTYPE).tobytes()

    def chunks() -> Iterator[bytes]:
        for name, data in corpus.documents(split, max_bytes):
            if isinstance(tokenizer, CharTokenizer):
                ids = tokenizer.encode_bytes(data, where=name)
            else:
                ids = tokenizer.encode_bytes(data)
            docs.append(name)
            stats["n_bytes"] += len(data)
            yield ids.astype(DTYPE).tobytes()
            yield eos

    nbytes = write_atomic(bin_path, chunks())
    if not docs:
        bin_path.unlink(missing_ok=True)
        if hasattr(corpus, "check_readable"):
            corpus.check_readable()  # a better message when nothing at all is text
        raise DataError(
            f"split {split!r} of corpus {corpus.describe()!r} is empty; add files, "
            "raise max_bytes or change the split fractions"
        )
    meta = {
        "format": FORMAT,
        "dtype": np.dtype(DTYPE).name,
        "n_tokens": nbytes // np.dtype(DTYPE).itemsize,
        "n_bytes": stats["n_bytes"],
        "n_documents": len(docs),
        "documents": docs,
        "split": split,
        "max_bytes": max_bytes,
        "corpus": corpus.identity(),
        "tokenizer": tokenizer.state_dict(),
    }
    _write_json(meta_path, meta)
    return bin_path


def open_tokens(
    path: str | os.PathLike[str], tokenizer: Tokenizer | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Open a prepared token file read-only.

    Args:
        path: The ``.bin`` from :func:`prepare_tokens`.
        tokenizer: If given, checked against the tokenizer the file was made with.

    Returns:
        ``(tokens, meta)``: a read-only ``uint16`` memmap ``[n_tokens]`` (an empty array for
        an empty file, which cannot be mapped) and the meta dict.

    Raises:
        DataError: Missing or incomplete file, or a tokenizer mismatch.
    """
    path = Path(path)
    meta = _read_meta(path)
    if meta is None:
        raise DataError(
            f"token cache {path} is missing or incomplete; run prepare_data() "
            "(or delete the cache folder to rebuild it)"
        )
    if tokenizer is not None:
        tokenizer.check_state(meta["tokenizer"])
    if meta["n_tokens"] == 0:
        return np.zeros(0, dtype=DTYPE), meta
    return np.memmap(path, dtype=DTYPE, mode="r", shape=(meta["n_tokens"],)), meta


def build_char_tokenizer(
    corpus: Corpus, cache_dir: str | os.PathLike[str] | None = None, max_bytes: int | None = None
) -> CharTokenizer:
    """The character vocabulary of all splits of ``corpus`` (cached as JSON).

    Args:
        corpus: The corpus (must be UTF-8 text).
        cache_dir: Cache folder; ``None``: :func:`default_cache_dir`.
        max_bytes: Cap on the corpus, as in :func:`prepare_tokens`.

    Raises:
        DataError: Non-UTF-8 bytes (the message names the file and suggests the byte
            tokenizer) or an empty corpus.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = cache / "vocab" / f"{_slug(corpus.describe())}-{_key(corpus.identity(), max_bytes)}.json"
    try:
        state = json.loads(path.read_text())
        return CharTokenizer(state["chars"], bytes_per_token=state["bytes_per_token"])
    except (OSError, ValueError, KeyError, DataError):
        pass
    seen: set[str] = set()
    n_chars = n_bytes = 0
    for split in ("train", "val", "test"):
        for name, data in corpus.documents(split, max_bytes):
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"non-UTF-8 bytes in {name} (byte offset {err.start}); a char vocabulary "
                    "needs UTF-8 text: use the byte tokenizer (tokenizer='byte') or re-encode "
                    "the corpus as UTF-8"
                ) from err
            seen.update(text)
            n_chars += len(text)
            n_bytes += len(data)
    if not n_chars:
        if hasattr(corpus, "check_readable"):
            corpus.check_readable()
        raise DataError(f"corpus {corpus.describe()!r} is empty; give it some text")
    tok = CharTokenizer(sorted(seen), bytes_per_token=n_bytes / n_chars)
    _write_json(path, tok.state_dict())
    return tok
