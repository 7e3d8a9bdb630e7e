"""The exceptions flowtext raises for bad input.

Every error a user can meet derives from :class:`FlowtextError`, and from the matching builtin
(``ValueError``, ``FloatingPointError``) so that generic handlers keep working. ``docs/errors.md``
lists them with what to do.
"""

from __future__ import annotations


class FlowtextError(Exception):
    """Base class of every error flowtext raises on purpose."""


class ConfigError(FlowtextError, ValueError):
    """A component name, option or combination that cannot work; the message names the fix."""


class ShapeError(FlowtextError, ValueError):
    """A tensor with the wrong shape, dtype or device for the call."""


class TimeRangeError(FlowtextError, ValueError):
    """Progression times outside ``[0, 1]`` or a grid that is not non-increasing."""


class DataError(FlowtextError, ValueError):
    """An empty, unreadable or unsuitable corpus."""


class NonFiniteError(FlowtextError, FloatingPointError):
    """A NaN or infinite training loss or gradient; the message names the step and the batch."""


class CheckpointError(FlowtextError, ValueError):
    """A checkpoint that is missing, corrupt, unsafe (it would run code) or does not fit."""
