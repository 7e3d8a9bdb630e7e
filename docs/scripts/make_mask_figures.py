"""Draw the visibility mask of each attention layout from the reference rule.

Run from the repository root: ``python docs/scripts/make_mask_figures.py``; writes
``docs/img/mask_*.png`` (used by ``docs/attention.md``).
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from flowtext.attention import LIVE, two_stream_layout, visibility_mask  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "img"


def layouts(length=24, block=6):
    """Yield ``(file stem, title, t, o)`` for each layout, ``t, o: [1, length]``."""
    idx = torch.arange(length)[None]
    gen = torch.Generator().manual_seed(0)
    yield "causal", "causal (AR): t = 0, order = position", torch.zeros(1, length), idx
    yield (
        "block_causal",
        f"block-causal: t = 0, order = block (size {block})",
        torch.zeros(1, length),
        idx // block,
    )
    half = length // 2
    t, o = two_stream_layout(torch.arange(half)[None] // (block // 2), torch.full((1, half), 0.5))
    yield "two_stream", f"two-stream: clean | noisy, block size {block // 2}", t, o
    # Evo sampling state: committed tokens with commit orders, live tokens, pure-noise tokens.
    u = torch.rand(1, length, generator=gen)
    t = torch.rand(1, length, generator=gen) * 0.8 + 0.1
    t[u < 0.45] = 0.0
    t[u > 0.8] = 1.0
    o = torch.randint(0, 4, (1, length), generator=gen)
    o[t > 0] = LIVE
    yield "evo", "Evo single stream: committed, live, t = 1", t, o


def main():
    """Write one PNG per layout."""
    OUT.mkdir(exist_ok=True)
    for stem, title, t, o in layouts():
        mask = visibility_mask(t, o, t, o)[0]
        fig, ax = plt.subplots(figsize=(4.2, 4.6))
        ax.imshow(mask.numpy(), cmap="Blues", vmin=0, vmax=1.3, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
        labels = ["0" if ti == 0 else ("1" if ti == 1 else f"{ti:.1f}") for ti in t[0].tolist()]
        ax.set_xticks(range(len(labels)), labels, fontsize=5, rotation=90)
        ax.set_yticks([])
        ax.text(0, -0.12, "x ticks: token times t", transform=ax.transAxes, fontsize=6)
        fig.tight_layout()
        fig.savefig(OUT / f"mask_{stem}.png", dpi=110)
        plt.close(fig)
        print("wrote", OUT / f"mask_{stem}.png")


if __name__ == "__main__":
    main()
