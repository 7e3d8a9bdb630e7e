"""Inputs of decoding: checked settings, prompt rows and infilling constraints."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from flowtext import policies as _policies
from flowtext import schedules as _schedules
from flowtext import solvers as _solvers
from flowtext.errors import ConfigError, DataError, ShapeError
from flowtext.schedules import NoiseSchedule

__all__ = [
    "Settings",
    "check_number",
    "check_rows",
    "check_sampling",
    "check_settings",
    "fixed_rows",
    "prompt_rows",
]


@dataclass(frozen=True)
class Settings:
    """The checked decoding settings of one :func:`~flowtext.decoding.generate` call.

    Attributes:
        length: Tokens to generate per row ``L``.
        steps: Global steps ``K`` (grid of a static policy, budget of an adaptive one).
        policy: The progression-time policy.
        solver: A solver that steps per-token times (Runge–Kutta, ancestral).
        schedule: The noise schedule.
        temperature: Commit temperature.
        top_p: Nucleus mass.
        greedy: Commit the argmax.
        eos_id: End-of-sequence id or ``None``.
        fixed_order: ``"causal"`` or ``"joint"``.
        use_cache: Use the exact KV cache.
        record: Keep every step's times.
    """

    length: int
    steps: int
    policy: _policies.ProgressionPolicy
    solver: _solvers.Solver
    schedule: NoiseSchedule
    temperature: float
    top_p: float
    greedy: bool
    eos_id: int | None
    fixed_order: str
    use_cache: bool
    record: bool


def check_settings(
    vocab: int,
    schedule: Any,
    *,
    length: Any,
    policy: Any,
    policy_kwargs: Mapping[str, Any] | None,
    steps: Any,
    solver: Any,
    temperature: Any,
    top_p: Any,
    greedy: bool,
    eos_id: Any,
    fixed_order: str,
    use_cache: bool,
    record: bool,
) -> Settings:
    """Check and resolve the arguments of :func:`~flowtext.decoding.generate` (see there).

    Raises:
        ConfigError: Bad length, steps, temperature, top-p, policy, solver, schedule or EOS id.
    """
    temperature, top_p = check_sampling(
        vocab, length=length, temperature=temperature, top_p=top_p, eos_id=eos_id
    )
    steps = length if steps is None else steps
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ConfigError(f"steps must be an int >= 1, got {steps!r}")
    if fixed_order not in ("causal", "joint"):
        raise ConfigError(f"fixed_order must be 'causal' or 'joint', got {fixed_order!r}")
    policy = _resolve_policy(policy, policy_kwargs)
    greedy = bool(greedy) or temperature == 0
    named, solver = isinstance(solver, str), _solvers.resolve(solver)
    if named and hasattr(solver, "temperature"):  # its token draws follow the temperature
        solver = dataclasses.replace(solver, temperature=0.0 if greedy else temperature)
    if not solver.per_token:
        raise ConfigError(
            f"decoding needs a solver that steps per-token times (the Runge–Kutta solvers, "
            f"ancestral), not {solver.name!r}"
        )
    schedule = _schedules.resolve(schedule)
    return Settings(
        length, steps, policy, solver, schedule, temperature, top_p, greedy, eos_id,
        fixed_order, bool(use_cache), bool(record),
    )  # fmt: skip


def check_sampling(
    vocab: int, *, length: Any, temperature: Any, top_p: Any, eos_id: Any
) -> tuple[float, float]:
    """Check what every decoder reads alike: ``length``, temperature, top-p and the EOS id.

    Returns:
        ``(temperature, top_p)`` as floats.

    Raises:
        ConfigError: A length below 1, a temperature outside ``[0, inf)``, a top-p outside
            ``(0, 1]`` or an EOS id outside ``[0, vocab)``.
    """
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        raise ConfigError(f"length must be a positive int (tokens to generate), got {length!r}")
    temperature = check_number(
        "temperature", temperature, 0, math.inf, False, "Use 0 or greedy=True for argmax."
    )
    top_p = check_number("top_p", top_p, 0, 1, True, "Use 1.0 to disable nucleus sampling.")
    if eos_id is not None and not (isinstance(eos_id, int) and 0 <= eos_id < vocab):
        raise ConfigError(f"eos_id must be an id in [0, {vocab}), got {eos_id!r}")
    return temperature, top_p


def _resolve_policy(policy: Any, kwargs: Mapping[str, Any] | None) -> _policies.ProgressionPolicy:
    if isinstance(policy, str):
        policy = _policies.get(policy, **dict(kwargs or {}))
    elif kwargs:
        raise ConfigError("policy_kwargs only applies when policy is given by name")
    if not isinstance(policy, _policies.ProgressionPolicy):
        raise ConfigError(f"policy must be a ProgressionPolicy or one of {_policies.names()}")
    return policy


def check_number(name: str, value: Any, lo: float, hi: float, lo_open: bool, fix: str) -> float:
    """``value`` as a float, if a finite number in ``[lo, hi]`` (``(lo, hi]`` when ``lo_open``).

    Raises:
        ConfigError: Otherwise; the message names ``name`` and ends with ``fix``.
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        raise ConfigError(
            f"{name} must lie in {'(' if lo_open else '['}{lo}, {hi}]; got {value!r}. {fix}"
        )
    return float(value)


def check_rows(
    config: Any,
    prompt: Any,
    prompt_lengths: Any,
    batch_size: int | None,
    fixed: Any,
    length: int,
) -> tuple[list[list[int]], Tensor]:
    """Prompt rows and fixed ids, checked against the model's vocabulary and context.

    Args:
        config: The network's config (``vocab_size``, ``max_len``).
        prompt: As for :func:`~flowtext.decoding.generate`.
        prompt_lengths: As for :func:`~flowtext.decoding.generate`.
        batch_size: Rows when ``prompt`` is ``None``.
        fixed: As for :func:`~flowtext.decoding.generate`.
        length: Tokens to generate ``L``.

    Returns:
        ``(rows, fixed ids [B, L] with -1 = free)``.

    Raises:
        ConfigError: A prompt plus ``length`` beyond ``max_len``; fixed positions out of range.
        ShapeError: Malformed prompt or constraints.
        DataError: Token ids outside the vocabulary.
    """
    vocab, max_len = config.vocab_size, config.max_len
    rows = prompt_rows(prompt, prompt_lengths, batch_size)
    for b, r in enumerate(rows):
        _check_ids(r, vocab, f"prompt row {b}")
        if len(r) + length > max_len:
            raise ConfigError(
                f"prompt row {b} has {len(r)} tokens; with length={length} that is "
                f"{len(r) + length} positions, beyond the model context max_len={max_len}. "
                f"Shorten the prompt or use length <= {max(0, max_len - len(r))}."
            )
    fixed_ids = fixed_rows(fixed, len(rows), length)
    _check_ids(fixed_ids[fixed_ids >= 0], vocab, "fixed")
    if bool((fixed_ids < -1).any()):
        raise DataError("fixed may only hold token ids or -1 (free position)")
    return rows, fixed_ids


def prompt_rows(prompt: Any, prompt_lengths: Any, batch_size: int | None) -> list[list[int]]:
    """Token-id lists, one per row, from ``None``, a list (of lists) or a padded tensor."""
    if prompt is None:
        return [[] for _ in range(1 if batch_size is None else batch_size)]
    if isinstance(prompt, Tensor):
        return _tensor_rows(prompt, prompt_lengths)
    if prompt_lengths is not None:
        raise ConfigError("prompt_lengths goes with a padded prompt tensor; drop it for lists")
    if isinstance(prompt, (str, bytes)) or not hasattr(prompt, "__iter__"):
        raise ShapeError(
            f"prompt must be token ids (a list of ids, a list of lists, or a tensor), got "
            f"{type(prompt).__name__}; encode text with the tokenizer first"
        )
    rows = list(prompt)
    if rows and all(_is_id(x) for x in rows):
        return [rows]
    bad = ShapeError("prompt must be a list of token-id lists, a list of ids, or a tensor")
    out = []
    for r in rows:
        if isinstance(r, (str, bytes)) or not hasattr(r, "__iter__"):
            raise bad
        r = r.tolist() if isinstance(r, Tensor) else list(r)
        if not all(_is_id(x) for x in r):
            raise bad
        out.append(r)
    if not out:
        raise ShapeError("prompt is an empty list; pass None for unconditional generation")
    return out


def _is_id(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _tensor_rows(prompt: Tensor, prompt_lengths: Any) -> list[list[int]]:
    if prompt.is_floating_point() or prompt.dtype == torch.bool:
        raise ShapeError(f"prompt must hold integer token ids, got dtype {prompt.dtype}")
    if prompt.ndim == 1:
        prompt = prompt[None]
    if prompt.ndim != 2:
        raise ShapeError(f"prompt must be [B, P] or [P], got shape {tuple(prompt.shape)}")
    if prompt_lengths is None:
        lengths = [prompt.shape[1]] * prompt.shape[0]
    else:
        lengths = [int(n) for n in torch.as_tensor(prompt_lengths).reshape(-1).tolist()]
        if len(lengths) != prompt.shape[0] or any(not 0 <= n <= prompt.shape[1] for n in lengths):
            raise ShapeError(
                f"prompt_lengths must give one length in [0, {prompt.shape[1]}] per row of "
                f"the prompt ({prompt.shape[0]} rows); got {lengths}"
            )
    return [prompt[b, :n].tolist() for b, n in enumerate(lengths)]


def fixed_rows(fixed: Any, batch: int, length: int) -> Tensor:
    """Fixed ids ``[B, L]`` (``-1`` = free) from a tensor, a dict, or a list of dicts."""
    out = torch.full((batch, length), -1, dtype=torch.long)
    if fixed is None:
        return out
    if isinstance(fixed, Tensor):
        f = fixed.long()
        if f.ndim == 1:
            f = f[None].expand(batch, -1)
        if f.shape != (batch, length):
            raise ShapeError(
                f"fixed must be [B, L] = {(batch, length)} or [L] with -1 for free positions; got "
                f"{tuple(fixed.shape)}"
            )
        return f.clone()
    maps = [fixed] * batch if isinstance(fixed, Mapping) else list(fixed)
    if len(maps) != batch or not all(isinstance(m, Mapping) for m in maps):
        raise ShapeError(f"fixed must be a dict {{position: id}} or a list of {batch} dicts")
    for b, m in enumerate(maps):
        for pos, tok in m.items():
            if not isinstance(pos, int) or not -length <= pos < length:
                raise ConfigError(
                    f"fixed position {pos!r} lies outside the generated region [0, {length}); "
                    "positions count from the first generated token"
                )
            out[b, pos] = int(tok)
    return out


def _check_ids(ids: Sequence[int] | Tensor, vocab: int, what: str) -> None:
    t = torch.as_tensor(ids, dtype=torch.long)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab):
        raise DataError(
            f"{what} holds token ids outside the model vocabulary [0, {vocab}): range "
            f"[{int(t.min())}, {int(t.max())}]; encode with the checkpoint's tokenizer"
        )
