"""flowtext: flow-based text generation.

AR, diffusion and Evo are discretizations of one probability flow over per-token progression
times. Component families live in :mod:`flowtext.schedules`, :mod:`flowtext.policies`,
:mod:`flowtext.solvers` and :mod:`flowtext.flow`; the Lightning modules are importable from here.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "FlowLM": "flowtext.lm",
    "Evo": "flowtext.lm",
    "AutoregressiveLM": "flowtext.lm",
    "DiffusionLM": "flowtext.lm",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flowtext' has no attribute {name!r}")
