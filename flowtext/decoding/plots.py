"""Maturity heatmaps of recorded decoding trajectories (matplotlib Agg, files only)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from flowtext.decoding.result import GenerationResult  # noqa: E402
from flowtext.errors import ConfigError  # noqa: E402

__all__ = ["plot_maturity", "plot_policy_comparison"]


def _labels(result: GenerationResult, row: int, tokenizer: Any) -> list[str]:
    if result.canvas is None:
        raise ConfigError("the result holds no canvas: plot the result of generate")
    ids = result.canvas[row].tolist()
    out = []
    for i in ids:
        if i < 0:
            out.append("·")
        elif tokenizer is not None:
            s = tokenizer.decode([i])
            out.append(repr(s)[1:-1] if s.strip() else "␣")
        else:
            out.append(str(i))
    return out


def _text(result: GenerationResult, row: int, tokenizer: Any) -> str:
    if tokenizer is not None:
        return tokenizer.decode(result.tokens[row])
    if result.text is not None:
        return result.text[row]
    return " ".join(map(str, result.tokens[row]))


def _draw(ax, result: GenerationResult, row: int, tokenizer: Any, title: str):
    if result.times is None:
        raise ConfigError("the result holds no trajectory: decode with record=True to plot it")
    maturity = 1 - result.times[:, row].double().numpy()  # [S + 1, L]
    im = ax.imshow(maturity, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    labels = _labels(result, row, tokenizer)
    if len(labels) <= 64:
        ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=90)
    ax.set_xlabel("token")
    ax.set_ylabel("global step")
    s = result.stats
    text = _text(result, row, tokenizer)
    text = text if len(text) <= 60 else text[:57] + "..."
    ax.set_title(f"{title}\n{s.nfe} evals, {s.tokens_per_eval:.2f} tok/eval\n{text!r}", fontsize=8)
    return im


def plot_maturity(
    result: GenerationResult,
    path: str | Path,
    tokenizer: Any = None,
    *,
    row: int = 0,
    title: str = "",
) -> Path:
    """Heatmap of maturity ``1 - t`` (global steps x tokens) of one decoded row.

    Args:
        result: A :class:`~flowtext.decoding.GenerationResult` from ``generate(record=True)``
            (``times [S + 1, B, L]``).
        path: Output PNG path (parents are created).
        tokenizer: Object with ``decode(ids) -> str`` for the axis labels and the final text.
        row: Batch row to draw.
        title: Panel title.

    Returns:
        The written path.

    Raises:
        ConfigError: The result was decoded without ``record=True``.
    """
    return plot_policy_comparison({title or "decoding": result}, path, tokenizer, row=row)


def plot_policy_comparison(
    results: Mapping[str, GenerationResult],
    path: str | Path,
    tokenizer: Any = None,
    *,
    row: int = 0,
) -> Path:
    """Maturity heatmaps side by side, one panel per policy (e.g. AR, block, diagonal, adaptive).

    Args:
        results: Label -> result decoded with ``record=True``.
        path: Output PNG path.
        tokenizer: Object with ``decode(ids) -> str``.
        row: Batch row to draw.

    Returns:
        The written path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(results)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 4.2), squeeze=False)
    im = None
    for ax, (label, res) in zip(axes[0], results.items(), strict=True):
        im = _draw(ax, res, row, tokenizer, label)
    fig.subplots_adjust(wspace=0.4)
    if im is not None:
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="maturity 1 - t (1 = committed)")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
