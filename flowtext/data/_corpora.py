"""Text corpora: the Python standard library (default) and plain text files or folders.

A corpus yields its documents for one split (``train``, ``val`` or ``test``). Splits are by
*file*: a file's split is a pure function of its relative path (see :func:`split_of`), so it
never changes when other files are added or removed, and no file is in two splits. A corpus of
one single file is split by contiguous byte ranges instead (first 90% train, next 5% val, last
5% test with the default fractions).

``max_bytes`` caps the corpus: each split gets its fraction of it. Files are taken in the order
of their path hash (a fixed shuffle) until the split's budget is met, the last one cut at a
UTF-8 character boundary; a single file is cut to its first ``max_bytes`` bytes, then split.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import sys
import sysconfig
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

from flowtext._registry import Registry
from flowtext.errors import ConfigError, DataError

__all__ = [
    "SPLITS",
    "Corpus",
    "Document",
    "StdlibCorpus",
    "TextCorpus",
    "get",
    "names",
    "register",
    "registry",
    "resolve_corpus",
    "split_of",
]

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.9, 0.05, 0.05)
"""The default ``(train, val, test)`` split fractions of every corpus, task and data module."""
Document = tuple[str, bytes]
"""``(name, data)``: a document's relative path (or ``file[start:end]``) and its bytes."""

_SNIFF = 8192


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Validate split fractions ``(train, val, test)``: three numbers in ``[0, 1]`` summing to 1.

    NaN fails every comparison, so it is refused explicitly (``0 <= f <= 1``).

    Raises:
        ConfigError: Otherwise.
    """
    try:
        fr = tuple(float(f) for f in fractions)
    except (TypeError, ValueError):
        fr = ()
    if len(fr) != 3 or not all(0.0 <= f <= 1.0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise ConfigError(
            f"split fractions must be three non-negative numbers (train, val, test) summing to "
            f"1, got {tuple(fractions)!r}"
        )
    return fr


def _unit(key: str) -> float:
    """A uniform number in ``[0, 1)`` from the SHA-1 of ``key`` (platform independent)."""
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:13], 16) / 16**13


def split_of(relpath: str, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> str:
    """The split of a file, from the SHA-1 of its relative path (``/``-separated).

    ``u = int(sha1(relpath)[:13], 16) / 16**13`` is uniform in ``[0, 1)``; the file is ``train``
    if ``u < f_train``, ``val`` if ``u < f_train + f_val``, else ``test``.

    Args:
        relpath: Path relative to the corpus root, with ``/`` separators.
        fractions: ``(train, val, test)`` fractions, summing to 1.

    Returns:
        ``"train"``, ``"val"`` or ``"test"``.
    """
    f_train, f_val, _ = check_fractions(fractions)
    u = _unit(relpath)
    if u < f_train:
        return "train"
    return "val" if u < f_train + f_val else "test"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")


def _utf8_cut(data: bytes, n: int) -> bytes:
    """The first ``<= n`` bytes of ``data``, not ending inside a UTF-8 multi-byte character."""
    if n >= len(data):
        return data
    if n <= 0:
        return b""
    end = n
    while end > 0 and n - end < 3 and (data[end] & 0xC0) == 0x80:
        end -= 1
    if (data[end] & 0xC0) == 0x80:  # not UTF-8 here anyway: cut at n
        return data[:n]
    return data[:end]


class Corpus(ABC):
    """Base class of text corpora: documents per split plus an identity for the cache key.

    Args:
        fractions: ``(train, val, test)`` split fractions, summing to 1.
    """

    name: ClassVar[str]
    kind: ClassVar[str] = "text"

    def __init__(self, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> None:
        self.fractions = check_fractions(fractions)

    @abstractmethod
    def documents(self, split: str, max_bytes: int | None = None) -> Iterator[Document]:
        """The documents of ``split``, in a fixed order.

        Args:
            split: ``"train"``, ``"val"`` or ``"test"``.
            max_bytes: Cap on the whole corpus (this split gets its fraction); ``None``: all.

        Yields:
            ``(name, data)`` pairs.

        Raises:
            DataError: Missing, empty, unreadable or binary-only corpus.
        """

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """JSON-able description that changes whenever the corpus content may have changed."""

    def describe(self) -> str:
        """A short human-readable name (used in cache folder names and messages)."""
        return self.name


class _FileCorpus(Corpus):
    """Shared logic of corpora made of files under a root folder."""

    root: Path

    @abstractmethod
    def _files(self) -> list[Path]:
        """Candidate files (absolute), before binary/readability checks."""

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def _listing(self) -> list[tuple[str, int, int]]:
        out = []
        for p in self._files():
            try:
                st = p.stat()
            except OSError:
                continue
            out.append((self._rel(p), st.st_size, st.st_mtime_ns))
        return sorted(out)

    def identity(self) -> dict[str, Any]:  # noqa: D102
        listing = self._listing()
        digest = hashlib.sha1(repr(listing).encode()).hexdigest()
        return {
            "root": str(self.root),
            "files": len(listing),
            "listing_sha1": digest,
            "fractions": list(self.fractions),
        }

    def _read(self, path: Path) -> bytes | None:
        """Bytes of a text file; ``None`` (with a warning) for unreadable or binary files."""
        try:
            data = path.read_bytes()
        except OSError as err:
            warnings.warn(f"skipping unreadable file {path}: {err}", stacklevel=3)
            return None
        if b"\x00" in data[:_SNIFF]:
            warnings.warn(f"skipping binary file {path} (NUL bytes)", stacklevel=3)
            return None
        return data

    def documents(self, split: str, max_bytes: int | None = None) -> Iterator[Document]:  # noqa: D102
        _check_split(split)
        files = self._files()
        if not files:
            raise DataError(self._empty_message())
        mine = [p for p in files if split_of(self._rel(p), self.fractions) == split]
        mine.sort(key=lambda p: _unit("order:" + self._rel(p)))
        budget = None if max_bytes is None else int(max_bytes * self.fractions[SPLITS.index(split)])
        for p in mine:
            if budget is not None and budget <= 0:
                return
            data = self._read(p)
            if not data:
                continue
            if budget is not None:
                data = _utf8_cut(data, budget)
                budget -= len(data)
            yield self._rel(p), data

    def check_readable(self) -> None:
        """Raise if no file at all holds text (every file empty, unreadable or binary).

        Raises:
            DataError: The message names the fix.
        """
        files = self._files()
        if not files:
            raise DataError(self._empty_message())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if any(self._read(p) for p in files):
                return
        raise DataError(
            f"no text in corpus {self.describe()!r}: all {len(files)} files are empty, "
            "unreadable or binary; point the corpus at text files (or adjust the pattern)"
        )

    def _empty_message(self) -> str:
        return f"corpus {self.describe()!r} has no files; check the path and the pattern"


registry: Registry[Any] = Registry("corpus")
register = registry.register
names = registry.names


def get(name: str, **kwargs: Any) -> Any:
    """Build a registered corpus or task by name.

    Args:
        name: One of :func:`names` (``"stdlib"``, ``"addition"``, ``"reverse"``, ``"copy"``).
        **kwargs: Constructor arguments.

    Raises:
        ConfigError: Unknown name (the message lists the valid ones) or bad arguments.
    """
    return registry.get(name, **kwargs)


def resolve_corpus(
    spec: str, fractions: Sequence[float] = DEFAULT_FRACTIONS, pattern: str = "*", **options: Any
) -> Any:
    """A corpus or task from a registry name or a filesystem path.

    Names win over paths; anything else that exists on disk is a :class:`TextCorpus`.

    Args:
        spec: A name from :func:`names`, or a text file or folder.
        fractions: ``(train, val, test)`` split fractions.
        pattern: Glob pattern for folders (paths only).
        **options: Extra constructor arguments (e.g. ``digits=5`` for ``addition``).

    Returns:
        A :class:`Corpus` or a :class:`~flowtext.data.Task`.

    Raises:
        ConfigError: Neither a known name nor a path (the message lists the names).
        DataError: A path-like ``spec`` (with a separator, a suffix or ``~``) that does not exist.
    """
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"corpus must be a name or a path, got {spec!r}")
    if spec in registry.names():
        return registry.get(spec, fractions=fractions, **options)
    path = Path(spec).expanduser()
    if path.exists() or any(c in spec for c in "/\\~") or path.suffix:
        try:
            return TextCorpus(path, fractions=fractions, pattern=pattern, **options)
        except TypeError as err:
            raise ConfigError(f"bad arguments for a path corpus: {err}") from err
    raise ConfigError(
        f"unknown corpus {spec!r}; valid names: {', '.join(registry.names())}, "
        "or the path of a text file or folder"
    )


@register("stdlib")
class StdlibCorpus(_FileCorpus):
    """The running interpreter's standard library ``.py`` files (the default corpus).

    Root: ``sysconfig.get_paths()["stdlib"]``. Excluded: ``site-packages`` and
    ``dist-packages``, ``__pycache__``, and (unless ``include_tests``) test folders: any folder
    named ``test``, ``tests`` or ``idle_test``. Files are split by path hash
    (:func:`split_of`) and joined with EOS when tokenized. On CPython 3.11 this is about 12 MB.

    Args:
        fractions: ``(train, val, test)`` split fractions.
        include_tests: Also take the test-suite folders.
    """

    _EXCLUDE: ClassVar[frozenset[str]] = frozenset(
        {"site-packages", "dist-packages", "__pycache__"}
    )
    _TESTS: ClassVar[frozenset[str]] = frozenset({"test", "tests", "idle_test"})

    def __init__(
        self, fractions: Sequence[float] = DEFAULT_FRACTIONS, include_tests: bool = False
    ) -> None:
        super().__init__(fractions)
        self.include_tests = include_tests
        self.root = Path(sysconfig.get_paths()["stdlib"])
        if not self.root.is_dir():
            raise DataError(
                f"the standard library folder {self.root} does not exist; give a "
                "corpus path instead of 'stdlib'"
            )

    def _files(self) -> list[Path]:
        skip = self._EXCLUDE if self.include_tests else self._EXCLUDE | self._TESTS
        out: list[Path] = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if d not in skip)
            out.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
        return out

    def identity(self) -> dict[str, Any]:  # noqa: D102
        return {"python": sys.version, "include_tests": self.include_tests, **super().identity()}


class TextCorpus(_FileCorpus):
    """Plain text from a file or a folder (searched recursively with a glob pattern).

    Folders are split by file (:func:`split_of` on the path relative to the folder). A single
    file is split by contiguous byte ranges: ``[0, f_train)``, ``[f_train, f_train + f_val)``,
    the rest, as fractions of its (capped) length, each cut at UTF-8 boundaries. Hidden files
    and folders (name starting with ``.``) are skipped; binary files (a NUL byte in the first
    8 KiB) and unreadable files are skipped with a warning.

    Args:
        path: A text file or a folder (``~`` is expanded).
        fractions: ``(train, val, test)`` split fractions.
        pattern: Glob pattern for files under a folder, matched against the relative path
            (e.g. ``"*.txt"``, ``"**/*.md"``); ``"*"`` matches every file.

    Raises:
        DataError: The path does not exist, or a single file is empty.
    """

    name = "path"

    def __init__(
        self,
        path: str | os.PathLike[str],
        fractions: Sequence[float] = DEFAULT_FRACTIONS,
        pattern: str = "*",
    ) -> None:
        super().__init__(fractions)
        p = Path(path).expanduser()
        if not p.exists():
            raise DataError(
                f"corpus path {str(path)!r} does not exist; give an existing text "
                "file or folder, or a corpus name"
            )
        self.path = p.resolve()
        self.pattern = pattern
        self.single = self.path.is_file()
        self.root = self.path.parent if self.single else self.path
        if self.single and self.path.stat().st_size == 0:
            raise DataError(f"corpus file {str(path)!r} is empty; give a file with text")
        if not self.single and not self._files():
            raise DataError(
                f"corpus folder {str(path)!r} has no files matching {pattern!r}; "
                "put text files there or change the pattern"
            )

    def describe(self) -> str:  # noqa: D102
        return self.path.name or "path"

    def _files(self) -> list[Path]:
        if self.single:
            return [self.path]
        out = []
        pat = self.pattern.replace("**/", "")
        for dirpath, dirnames, filenames in os.walk(self.path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in sorted(filenames):
                full = Path(dirpath) / f
                rel = self._rel(full)
                if f.startswith(".") or not full.is_file():
                    continue
                if fnmatch.fnmatch(rel, self.pattern) or fnmatch.fnmatch(f, pat):
                    out.append(full)
        return out

    def identity(self) -> dict[str, Any]:  # noqa: D102
        return {"pattern": self.pattern, "single": self.single, **super().identity()}

    def documents(self, split: str, max_bytes: int | None = None) -> Iterator[Document]:  # noqa: D102
        if not self.single:
            yield from super().documents(split, max_bytes)
            return
        _check_split(split)
        data = self._read(self.path)
        if data is None:
            raise DataError(
                f"corpus file {str(self.path)!r} is binary or unreadable; give a text file"
            )
        if max_bytes is not None:
            data = _utf8_cut(data, max_bytes)
        n = len(data)
        cuts = [0]
        acc = 0.0
        for f in self.fractions[:2]:
            acc += f
            cuts.append(len(_utf8_cut(data, round(acc * n))))
        cuts.append(n)
        i = SPLITS.index(split)
        start, end = cuts[i], max(cuts[i], cuts[i + 1])
        if end > start:
            yield f"{self.path.name}[{start}:{end}]", data[start:end]
