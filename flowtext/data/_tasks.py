"""Synthetic tasks that separate AR from diffusion behaviour.

* ``addition``: ``"123+456=579"``. Carries flow right to left, so writing the sum left to
  right needs planning; ``reverse_answer=True`` writes it least-significant digit first
  (``"123+456=975"``), which makes it easy for a left-to-right model.
* ``reverse``: ``"abcd>dcba"``; the first answer token depends on the last prompt token.
* ``copy``: ``"abcd>abcd"``; a purely left-to-right task.

Example ``i`` of a split is a pure function of ``(seed, split, i)``. Problems are assigned to
splits by the hash of their prompt (like files in a corpus, see
:func:`~flowtext.data.split_of`), so a validation problem never appears in training. An example
is encoded as prompt, answer, EOS, then PAD up to the sequence length; ``answer_mask`` marks
the answer tokens and the EOS.
"""

from __future__ import annotations

import string
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from flowtext.data._corpora import DEFAULT_FRACTIONS, SPLITS, check_fractions, registry, split_of
from flowtext.data._tokenizers import Tokenizer
from flowtext.errors import ConfigError, DataError

__all__ = ["AdditionTask", "CopyTask", "ReversalTask", "Task", "TaskExample"]


@dataclass(frozen=True)
class TaskExample:
    """One problem: the model sees ``prompt`` and must produce ``answer``.

    Attributes:
        prompt: The question, ending with its separator (``"123+456="``).
        answer: The expected answer (``"579"``).
    """

    prompt: str
    answer: str

    @property
    def text(self) -> str:
        """``prompt + answer``."""
        return self.prompt + self.answer


class Task(ABC):
    """Base class of synthetic tasks: deterministic examples, encoding with an answer mask.

    Args:
        fractions: ``(train, val, test)`` fractions of the problem space per split.
    """

    name: ClassVar[str]
    kind: ClassVar[str] = "task"
    separator: ClassVar[str]

    def __init__(self, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> None:
        self.fractions = check_fractions(fractions)

    @abstractmethod
    def _draw(self, rng: np.random.Generator) -> TaskExample:
        """One random problem (any split)."""

    @property
    @abstractmethod
    def max_chars(self) -> int:
        """Longest ``prompt + answer`` in characters (one byte each: the alphabets are ASCII)."""

    def identity(self) -> dict[str, Any]:
        """JSON-able description of the task and its options."""
        return {"task": self.name, "fractions": list(self.fractions), **self._options()}

    def _options(self) -> dict[str, Any]:
        return {}

    def min_seq_len(self) -> int:
        """Shortest sequence length that holds every example plus its EOS."""
        return self.max_chars + 1

    def example(self, split: str, index: int, seed: int = 0) -> TaskExample:
        """Example ``index`` of ``split``, a pure function of ``(seed, split, index)``.

        Args:
            split: ``"train"``, ``"val"`` or ``"test"``.
            index: Any non-negative integer.
            seed: Generator seed.

        Raises:
            DataError: The split has no problems (e.g. a zero fraction).
        """
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
        if self.fractions[SPLITS.index(split)] == 0:
            raise DataError(f"split {split!r} has fraction 0 in task {self.name!r}")
        rng = np.random.default_rng([int(seed), SPLITS.index(split), int(index)])
        for _ in range(100_000):
            ex = self._draw(rng)
            if split_of(f"{self.name}:{ex.prompt}", self.fractions) == split:
                return ex
        raise DataError(
            f"task {self.name!r} found no {split!r} problem; the problem space is "
            "too small for its split fraction: use larger problems or fractions"
        )

    def encode(
        self, example: TaskExample, tokenizer: Tokenizer, seq_len: int
    ) -> dict[str, torch.Tensor]:
        """Encode ``prompt + answer + EOS``, right-padded with PAD.

        Args:
            example: The problem.
            tokenizer: Any tokenizer whose vocabulary holds the task's characters.
            seq_len: Output length ``L``.

        Returns:
            ``tokens`` (LongTensor ``[L]``) and ``answer_mask`` (BoolTensor ``[L]``, true on the
            answer tokens and the EOS).

        Raises:
            DataError: The example does not fit in ``seq_len``.
        """
        prompt = tokenizer.encode(example.prompt)
        answer = tokenizer.encode(example.answer) + [tokenizer.eos_id]
        n = len(prompt) + len(answer)
        if n > seq_len:
            raise DataError(
                f"task {self.name!r} example needs {n} tokens but seq_len is "
                f"{seq_len}; raise seq_len to at least {self.min_seq_len()}"
            )
        tokens = torch.full((seq_len,), tokenizer.pad_id, dtype=torch.long)
        tokens[:n] = torch.tensor(prompt + answer, dtype=torch.long)
        mask = torch.zeros(seq_len, dtype=torch.bool)
        mask[len(prompt) : n] = True
        return {"tokens": tokens, "answer_mask": mask}

    def answer_of(self, pred_text: str, example: TaskExample) -> str:
        """The answer part of a prediction (the text after the prompt, or the text itself)."""
        text = pred_text
        if text.startswith(example.prompt):
            text = text[len(example.prompt) :]
        elif self.separator in text:
            text = text.split(self.separator, 1)[1]
        return text.strip()

    def exact_match(self, pred_text: str, example: TaskExample) -> bool:
        """Whether a prediction answers ``example`` exactly.

        Args:
            pred_text: The decoded model output: the full sequence (``"123+456=579"``) or only
                the answer (``"579"``); surrounding whitespace is ignored. Decode up to the
                first EOS (or use :meth:`exact_match_ids`).
            example: The problem.
        """
        return self.answer_of(pred_text, example) == example.answer

    def exact_match_ids(
        self, ids: Iterable[int], example: TaskExample, tokenizer: Tokenizer
    ) -> bool:
        """:meth:`exact_match` on token ids ``[L]``, cut at the first EOS."""
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        if tokenizer.eos_id in ids:
            ids = ids[: ids.index(tokenizer.eos_id)]
        return self.exact_match(tokenizer.decode(ids), example)


@registry.register("addition")
class AdditionTask(Task):
    """Multi-digit addition ``"a+b=c"`` with ``a, b`` uniform in ``[0, 10**digits)``.

    Args:
        digits: Maximum digits per operand (no leading zeros).
        reverse_answer: Write the sum least-significant digit first.
        fractions: ``(train, val, test)`` fractions of the problem space.

    Example:
        >>> task = AdditionTask(digits=3)
        >>> ex = task.example("train", 0)
        >>> int(ex.prompt[:-1].split("+")[0]) + int(ex.prompt[:-1].split("+")[1]) == int(ex.answer)
        True
    """

    separator = "="

    def __init__(
        self,
        digits: int = 3,
        reverse_answer: bool = False,
        fractions: Sequence[float] = DEFAULT_FRACTIONS,
    ) -> None:
        super().__init__(fractions)
        if not isinstance(digits, int) or not 1 <= digits <= 18:
            raise ConfigError(f"addition digits must be an int in [1, 18], got {digits!r}")
        self.digits = digits
        self.reverse_answer = bool(reverse_answer)

    def _options(self) -> dict[str, Any]:
        return {"digits": self.digits, "reverse_answer": self.reverse_answer}

    @property
    def max_chars(self) -> int:  # noqa: D102
        return 2 * self.digits + 2 + self.digits + 1

    def _draw(self, rng: np.random.Generator) -> TaskExample:
        a, b = (int(x) for x in rng.integers(0, 10**self.digits, size=2))
        c = str(a + b)
        return TaskExample(f"{a}+{b}=", c[::-1] if self.reverse_answer else c)


@registry.register("reverse")
class ReversalTask(Task):
    """String reversal ``"abcd>dcba"`` over an alphabet, lengths uniform in ``[min_len, max_len]``.

    Args:
        min_len: Shortest string.
        max_len: Longest string.
        alphabet: Characters to draw from (ASCII, without ``">"``).
        fractions: ``(train, val, test)`` fractions of the problem space.
    """

    separator = ">"
    reverse: ClassVar[bool] = True

    def __init__(
        self,
        min_len: int = 4,
        max_len: int = 12,
        alphabet: str = string.ascii_lowercase,
        fractions: Sequence[float] = DEFAULT_FRACTIONS,
    ) -> None:
        super().__init__(fractions)
        if not (isinstance(min_len, int) and isinstance(max_len, int) and 1 <= min_len <= max_len):
            raise ConfigError(f"need 1 <= min_len <= max_len, got {min_len!r}, {max_len!r}")
        if not alphabet or self.separator in alphabet or not alphabet.isascii():
            raise ConfigError(f"alphabet must be non-empty ASCII without {self.separator!r}")
        if len(set(alphabet)) != len(alphabet):
            raise ConfigError("alphabet must not repeat characters")
        self.min_len, self.max_len, self.alphabet = min_len, max_len, alphabet

    def _options(self) -> dict[str, Any]:
        return {"min_len": self.min_len, "max_len": self.max_len, "alphabet": self.alphabet}

    @property
    def max_chars(self) -> int:  # noqa: D102
        return 2 * self.max_len + 1

    def _draw(self, rng: np.random.Generator) -> TaskExample:
        n = int(rng.integers(self.min_len, self.max_len + 1))
        s = "".join(self.alphabet[i] for i in rng.integers(0, len(self.alphabet), size=n))
        return TaskExample(s + self.separator, s[::-1] if self.reverse else s)


@registry.register("copy")
class CopyTask(ReversalTask):
    """String copy ``"abcd>abcd"``: the left-to-right twin of :class:`ReversalTask`."""

    reverse = False
