"""Matplotlib helpers (Agg backend, files only) for grids, convergence curves and heatmaps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from torch import Tensor  # noqa: E402

__all__ = ["plot_convergence", "plot_time_grids"]


def plot_time_grids(grids: Mapping[str, Tensor], path: str | Path, title: str = "") -> Path:
    """Heatmaps of per-token time grids (steps x tokens), one panel per policy.

    Args:
        grids: Policy label -> times ``[K + 1, L]``.
        path: Output PNG path (parents are created).
        title: Figure title.

    Returns:
        The written path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(grids), figsize=(3.2 * len(grids), 3.2), squeeze=False)
    for ax, (label, g) in zip(axes[0], grids.items(), strict=True):
        im = ax.imshow(
            g.detach().cpu().float().numpy(),
            aspect="auto",
            cmap="magma_r",
            vmin=0,
            vmax=1,
            interpolation="nearest",
        )
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("token i")
        ax.set_ylabel("global step k")
    fig.subplots_adjust(wspace=0.35)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="t (0 = committed, 1 = noise)")
    if title:
        fig.suptitle(title, y=1.03)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_convergence(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    *,
    xlabel: str = "steps",
    ylabel: str = "error",
    title: str = "",
    slopes: Mapping[str, float] | None = None,
) -> Path:
    """Log-log convergence plot, one line per label, with optional reference slopes.

    Args:
        curves: Label -> (x values, y values).
        path: Output PNG path.
        xlabel: X axis label.
        ylabel: Y axis label.
        title: Plot title.
        slopes: Label -> order ``p``; draws a dashed ``x^-p`` guide through the first point.

    Returns:
        The written path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for label, (xs, ys) in curves.items():
        line = ax.loglog(xs, ys, "o-", label=label)[0]
        if slopes and label in slopes:
            p = slopes[label]
            ax.loglog(
                xs,
                [ys[0] * (xs[0] / x) ** p for x in xs],
                "--",
                color=line.get_color(),
                alpha=0.4,
                linewidth=1,
            )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
