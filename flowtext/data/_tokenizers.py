"""Tokenizers: bytes (the default, nothing to download) and a character vocabulary from a corpus.

Both map text to ids in ``[0, vocab_size)`` and carry three special tokens, PAD, BOS and EOS.
EOS separates documents in a corpus and ends a task example; PAD fills a task example up to the
sequence length; BOS is reserved (nothing in :mod:`flowtext.data` inserts it).

* ``byte``: ids ``0..255`` are the byte values of the UTF-8 encoding, PAD = 256, BOS = 257,
  EOS = 258, ``vocab_size = 259``. Every non-special token is exactly one byte.
* ``char``: ids ``0..2`` are PAD, BOS, EOS, then one id per distinct character of the corpus
  in code-point order. Tokens can stand for 1 to 4 UTF-8 bytes, so bits per byte uses
  :attr:`Tokenizer.token_bytes` (per id) or :attr:`Tokenizer.bytes_per_token` (corpus mean).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import numpy as np

from flowtext.errors import DataError

__all__ = ["ByteTokenizer", "CharTokenizer", "Tokenizer", "tokenizer_from_state"]

SPECIALS = ("<|pad|>", "<|bos|>", "<|eos|>")


class Tokenizer(ABC):
    """Base class: text <-> ids, special ids, byte counts for bits per byte, and a state dict.

    Attributes:
        pad_id: Padding id (fills task examples up to the sequence length).
        bos_id: Beginning-of-sequence id (reserved).
        eos_id: End-of-sequence id (separates documents, ends task examples).
        bytes_per_token: Mean UTF-8 bytes per token, for bits per byte
            (``bpb = nats / ln 2 / bytes_per_token``); 1.0 for bytes.
    """

    kind: ClassVar[str]
    pad_id: int
    bos_id: int
    eos_id: int
    bytes_per_token: float

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""

    @property
    def special_ids(self) -> tuple[int, int, int]:
        """``(pad_id, bos_id, eos_id)``."""
        return (self.pad_id, self.bos_id, self.eos_id)

    @abstractmethod
    def encode_bytes(self, data: bytes) -> np.ndarray:
        """Encode raw corpus bytes.

        Args:
            data: Bytes of one document.

        Returns:
            Ids ``[n]`` as ``uint16``; no special tokens are added.

        Raises:
            DataError: The bytes cannot be represented (e.g. non-UTF-8 for ``char``).
        """

    @abstractmethod
    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Decode ids to text; invalid UTF-8 becomes U+FFFD (``errors="replace"``).

        Args:
            ids: Token ids ``[n]`` (list, array or 1-D tensor).
            skip_special: Drop PAD/BOS/EOS (default) or render them as ``<|pad|>`` etc.

        Returns:
            The text.
        """

    @property
    @abstractmethod
    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each id stands for, ``[vocab_size]`` int64 (0 for special ids)."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """A JSON-able description; :func:`tokenizer_from_state` rebuilds an equal tokenizer."""

    def encode(self, text: str) -> list[int]:
        """Encode text.

        Args:
            text: Any string. Undecodable bytes that Python kept as lone surrogates (a
                non-UTF-8 command-line argument, ``surrogateescape``) are encoded as the raw
                bytes they stand for.

        Returns:
            Ids ``[n]``; no special tokens are added.

        Raises:
            DataError: ``text`` is not a string.
        """
        _check_text(text)
        return self.encode_bytes(text.encode("utf-8", errors="surrogateescape")).tolist()

    def count_bytes(self, ids: Iterable[int]) -> int:
        """UTF-8 bytes that ``ids`` stand for (special ids count 0), for exact bits per byte."""
        arr = np.asarray(list(ids) if not hasattr(ids, "__array__") else ids, dtype=np.int64)
        return int(self.token_bytes[arr].sum())

    def check_state(self, state: dict[str, Any]) -> None:
        """Check that ``state`` (e.g. from a checkpoint) describes this same tokenizer.

        Raises:
            DataError: The tokenizers differ; the message says how.
        """
        mine = self.state_dict()
        if state != mine:
            raise DataError(
                f"tokenizer mismatch: checkpoint/cache has {_summary(state)}, the data uses "
                f"{_summary(mine)}{_difference(state, mine)}; use the same tokenizer (and corpus, "
                "for 'char') as in training"
            )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and self.state_dict() == other.state_dict()

    def __hash__(self) -> int:
        return hash(repr(self.state_dict()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


def _summary(state: dict[str, Any]) -> str:
    kind = state.get("kind", "?")
    if kind == "char":
        return f"a char vocabulary of {len(state.get('chars', ''))} characters"
    return f"a {kind!r} tokenizer"


def _difference(theirs: dict[str, Any], mine: dict[str, Any]) -> str:
    """How two char vocabularies differ, when their sizes alone do not tell."""
    if theirs.get("kind") != "char" or mine.get("kind") != "char":
        return ""
    a, b = str(theirs.get("chars", "")), str(mine.get("chars", ""))
    only_a, only_b = sorted(set(a) - set(b))[:5], sorted(set(b) - set(a))[:5]
    parts = [f"only in the checkpoint/cache: {only_a!r}"] if only_a else []
    parts += [f"only in the data: {only_b!r}"] if only_b else []
    if not parts and a != b:
        parts = ["the same characters in another order"]
    if not parts:
        parts = [
            f"bytes_per_token {theirs.get('bytes_per_token')} vs {mine.get('bytes_per_token')}"
        ]
    return " (" + "; ".join(parts) + ")"


def _check_text(text: object) -> None:
    if not isinstance(text, str):
        raise DataError(
            f"encode takes text (str), got {type(text).__name__}; decode bytes first or pass ids"
        )


def _ids_array(ids: Iterable[int]) -> np.ndarray:
    if hasattr(ids, "detach"):  # torch tensor
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids if hasattr(ids, "__len__") else list(ids), dtype=np.int64)
    return arr.reshape(-1)


class ByteTokenizer(Tokenizer):
    """Byte-level tokenizer: id = byte value, then PAD = 256, BOS = 257, EOS = 258.

    Example:
        >>> tok = ByteTokenizer()
        >>> tok.encode("hé")
        [104, 195, 169]
        >>> tok.decode([104, 195, 169, tok.eos_id])
        'hé'
    """

    kind = "byte"
    pad_id = 256
    bos_id = 257
    eos_id = 258
    bytes_per_token = 1.0

    @property
    def vocab_size(self) -> int:  # noqa: D102
        return 259

    @property
    def token_bytes(self) -> np.ndarray:  # noqa: D102
        out = np.ones(self.vocab_size, dtype=np.int64)
        out[256:] = 0
        return out

    def encode_bytes(self, data: bytes) -> np.ndarray:  # noqa: D102
        return np.frombuffer(bytes(data), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:  # noqa: D102
        arr = _ids_array(ids)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise DataError(f"ids outside [0, {self.vocab_size}) for the byte tokenizer")
        if skip_special:
            return arr[arr < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")
        parts: list[str] = []
        start = 0
        for pos in np.flatnonzero(arr >= 256).tolist() + [arr.size]:
            parts.append(arr[start:pos].astype(np.uint8).tobytes().decode("utf-8", "replace"))
            if pos < arr.size:
                parts.append(SPECIALS[int(arr[pos]) - 256])
            start = pos + 1
        return "".join(parts)

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {"kind": "byte", "vocab_size": self.vocab_size}


class CharTokenizer(Tokenizer):
    """Character vocabulary: PAD = 0, BOS = 1, EOS = 2, then ``chars`` in the given order.

    Build one from a corpus with :meth:`from_texts` (or let
    :class:`~flowtext.data.FlowTextDataModule` do it with ``tokenizer="char"``).

    Args:
        chars: The distinct characters, in id order (ids ``3, 4, ...``).
        bytes_per_token: Mean UTF-8 bytes per character of the corpus; ``None`` uses the mean
            over the vocabulary's own characters.

    Raises:
        DataError: Repeated characters or an empty vocabulary.

    Example:
        >>> tok = CharTokenizer.from_texts(["abc cab"])
        >>> tok.vocab_size, tok.encode("cab")
        (7, [6, 4, 5])
    """

    kind = "char"
    pad_id = 0
    bos_id = 1
    eos_id = 2

    def __init__(self, chars: Sequence[str] | str, bytes_per_token: float | None = None) -> None:
        chars = "".join(chars)
        if not chars:
            raise DataError("a char vocabulary needs at least one character; the corpus is empty")
        if len(set(chars)) != len(chars):
            raise DataError("a char vocabulary must not repeat characters")
        self.chars = chars
        self._codepoints = np.array([ord(c) for c in chars], dtype=np.int64)
        self._order = np.argsort(self._codepoints, kind="stable")
        self._sorted = self._codepoints[self._order]
        self._lens = np.array([len(c.encode("utf-8")) for c in chars], dtype=np.int64)
        if bytes_per_token is None:
            bytes_per_token = float(self._lens.mean())
        self.bytes_per_token = float(bytes_per_token)

    @classmethod
    def from_texts(cls, texts: Iterable[str | bytes]) -> CharTokenizer:
        """Build the vocabulary of ``texts`` (characters in code-point order).

        Args:
            texts: Documents, as ``str`` or UTF-8 ``bytes``.

        Raises:
            DataError: A document is not valid UTF-8 (the message names the fix), or no text.
        """
        seen: set[str] = set()
        n_chars = 0
        n_bytes = 0
        for text in texts:
            if isinstance(text, bytes):
                text = _utf8(text)
            seen.update(text)
            n_chars += len(text)
            n_bytes += len(text.encode("utf-8"))
        if not n_chars:
            raise DataError("cannot build a char vocabulary from an empty corpus")
        return cls(sorted(seen), bytes_per_token=n_bytes / n_chars)

    @property
    def vocab_size(self) -> int:  # noqa: D102
        return len(self.chars) + 3

    @property
    def token_bytes(self) -> np.ndarray:  # noqa: D102
        return np.concatenate([np.zeros(3, dtype=np.int64), self._lens])

    def encode_bytes(self, data: bytes, where: str = "") -> np.ndarray:  # noqa: D102
        return self._encode_str(_utf8(bytes(data), where))

    def encode(self, text: str) -> list[int]:  # noqa: D102
        _check_text(text)
        return self._encode_str(text).tolist()

    def _encode_str(self, text: str) -> np.ndarray:
        if not text:
            return np.zeros(0, dtype=np.uint16)
        cps = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
        cps = cps.astype(np.int64)
        pos = np.searchsorted(self._sorted, cps).clip(0, len(self._sorted) - 1)
        bad = self._sorted[pos] != cps
        if bad.any():
            missing = sorted({chr(c) for c in cps[bad].tolist()})[:10]
            raise DataError(
                f"characters {missing!r} are not in the char vocabulary; build the vocabulary "
                "from a corpus that contains them, or use the byte tokenizer (tokenizer='byte')"
            )
        return (self._order[pos] + 3).astype(np.uint16)

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:  # noqa: D102
        arr = _ids_array(ids)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise DataError(f"ids outside [0, {self.vocab_size}) for this char vocabulary")
        out = []
        for i in arr.tolist():
            if i >= 3:
                out.append(self.chars[i - 3])
            elif not skip_special:
                out.append(SPECIALS[i])
        return "".join(out)

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {
            "kind": "char",
            "vocab_size": self.vocab_size,
            "chars": self.chars,
            "bytes_per_token": self.bytes_per_token,
        }


def _utf8(data: bytes, where: str = "") -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        loc = f" in {where}" if where else ""
        raise DataError(
            f"non-UTF-8 bytes{loc} (byte offset {err.start}); a char vocabulary needs UTF-8 "
            "text: use the byte tokenizer (tokenizer='byte') or re-encode the corpus as UTF-8"
        ) from err


STATE_LOADERS: dict[str, Callable[[dict[str, Any]], Tokenizer]] = {}
"""Tokenizer kinds defined in other modules (``bpe``, ``hf``) -> their state loader."""


def tokenizer_from_state(state: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer from :meth:`Tokenizer.state_dict` (e.g. stored in a checkpoint).

    Raises:
        DataError: Unknown or malformed state.
    """
    kind = state.get("kind") if isinstance(state, dict) else None
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char" and isinstance(state.get("chars"), str):
        return CharTokenizer(state["chars"], bytes_per_token=state.get("bytes_per_token"))
    if kind in STATE_LOADERS:
        return STATE_LOADERS[kind](state)
    raise DataError(f"not a flowtext tokenizer state: {state!r:.200}")
