"""Leaf basics of the visibility rules (theory §2): the live-group sentinel and the time check.

Every layer needs these two names (flows check times, the network and the objectives build
orders, decoders mark live tokens), so they live below all of them; the rules themselves are in
:mod:`flowtext.attention`.
"""

from __future__ import annotations

import torch

from flowtext.errors import TimeRangeError

__all__ = ["LIVE", "check_times"]

LIVE = 2**30
"""Group id shared by all live tokens during sampling (larger than any commit order)."""


def check_times(t: torch.Tensor, name: str = "t") -> None:
    """Raise :class:`~flowtext.errors.TimeRangeError` unless every entry of ``t`` is in ``[0, 1]``.

    Args:
        t: Progression times of any shape (floating).
        name: Name used in the error message.

    Raises:
        TimeRangeError: ``t`` is not floating, holds NaN, or leaves ``[0, 1]``.
    """
    if not torch.is_floating_point(t):
        raise TimeRangeError(f"{name} must be a floating tensor, got dtype {t.dtype}")
    if t.numel() and (bool(torch.isnan(t).any()) or t.min() < 0 or t.max() > 1):
        raise TimeRangeError(
            f"{name} must lie in [0, 1] (0 = committed, 1 = pure noise); got range "
            f"[{t.min().item():.4g}, {t.max().item():.4g}]"
        )
