"""What the experiment scripts share: models and data, validation bounds, output helpers."""

from __future__ import annotations

import csv
import math
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from flowtext.data import FlowTextDataModule
from flowtext.demo import pushforward
from flowtext.objectives import LN2
from flowtext.policies import StaticPolicy
from flowtext.toy import GaussianToy

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "experiments" / "configs"


# ------------------------------------------------------------------------------ models and data
def training_arguments(parser, out: str, *, steps: int, length: int, lr: float, repeats: int):
    """Add the options every side-by-side training experiment shares to ``parser``.

    ``--out --quick --steps --batch --length --block --width --layers --lr --val-batches
    --repeats --seed``; the arguments given are the defaults that differ between scripts.
    """
    add = parser.add_argument
    add("--out", type=Path, default=Path(out))
    add("--quick", action="store_true", help="tiny sizes, seconds")
    add("--steps", type=int, default=steps, help="optimizer steps per model")
    add("--batch", type=int, default=16)
    add("--length", type=int, default=length)
    add("--block", type=int, default=8, help="block size of the block(B) bounds")
    add("--width", type=int, default=128)
    add("--layers", type=int, default=4)
    add("--lr", type=float, default=lr)
    add("--val-batches", type=int, default=4)
    add("--repeats", type=int, default=repeats, help="noise draws per validation batch")
    add("--seed", type=int, default=0)
    return parser


def fit_config(config: str, root: Path, overrides: Sequence[str] = ()) -> tuple[Any, list[str]]:
    """Train ``experiments/configs/<config>`` through the training CLI into ``root``.

    Returns:
        ``(cli, argv)``: the finished CLI (its ``model``, ``datamodule``, ``trainer``) and the
        arguments it ran with.
    """
    from flowtext.training import cli_main

    argv = ["fit", "--config", str(CONFIGS / config), f"--trainer.default_root_dir={root}"]
    argv += list(overrides)
    return cli_main(argv), argv


def datamodule(hparams: dict | None, fallback: dict | None = None) -> FlowTextDataModule:
    """The data module a checkpoint recorded (``fallback`` without one), ready to validate."""
    hp = {k: v for k, v in (hparams or {}).items() if not k.startswith("_")}
    dm = FlowTextDataModule(**(hp or fallback or {}))
    dm.prepare_data()
    dm.setup("validate")
    return dm


def val_batches(dm, n: int) -> list[torch.Tensor]:
    """The first ``n`` validation batches of ``dm`` as ``[B, L]`` token tensors."""
    out = []
    for batch in dm.val_dataloader():
        out.append(batch["tokens"] if isinstance(batch, dict) else batch)
        if len(out) >= n:
            break
    return out


@torch.no_grad()
def bound_bpb(
    lm,
    batches: list[torch.Tensor],
    policy: StaticPolicy | str,
    steps: int,
    *,
    bytes_per_token: float,
    repeats: int,
    generator: torch.Generator,
    t_min: float | None = None,
) -> tuple[float, float]:
    """Mean and standard error, in bits per byte, of ``lm.policy_bound`` over the batches.

    Every batch is scored ``repeats`` times (one noise draw each); the standard error is over
    those ``repeats * len(batches)`` values (``nan`` for one value).
    """
    vals = torch.tensor(
        [
            float(lm.policy_bound(tok, policy, steps, t_min=t_min, generator=generator).nats.mean())
            for _ in range(repeats)
            for tok in batches
        ],
        dtype=torch.float64,
    )
    se = float(vals.std() / math.sqrt(len(vals))) if len(vals) > 1 else float("nan")
    return float(vals.mean()) / LN2 / bytes_per_token, se / LN2 / bytes_per_token


def transport_error(toy: GaussianToy, grid: torch.Tensor, schedule: str, solver: str) -> float:
    """Largest error of the output law's mean or covariance (exact pushforward on the toy)."""
    mean, cov = pushforward(toy, grid, schedule, solver)
    return max((mean - toy.mean).abs().max().item(), (cov - toy.cov).abs().max().item())


# ----------------------------------------------------------------------------------- output
def fmt(x, digits: int = 3) -> str:
    """A table cell: booleans as ``yes``/blank, floats with ``digits`` decimals or in e-form."""
    if isinstance(x, bool):
        return "yes" if x else ""
    if isinstance(x, float):
        if math.isnan(x):
            return "-"
        small, big = x != 0 and abs(x) < 1e-3, abs(x) >= 1e5
        return f"{x:.3e}" if small or big else f"{x:.{digits}f}"
    return str(x).replace("|", "\\|").replace("\n", "\\n")


def md_table(rows: list[dict], cols: list[str] | None = None, digits: int = 3) -> list[str]:
    """Markdown table lines of ``rows`` (columns ``cols``, default: the first row's keys)."""
    cols = cols or (list(rows[0]) if rows else [])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(fmt(r.get(c, ""), digits) for c in cols) + " |" for r in rows]
    return out


def write_csv(path: Path, rows: list[dict]) -> None:
    """Write ``rows`` (dicts sharing the first row's keys) to ``path``; nothing when empty."""
    if not rows:
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def hardware() -> str:
    """Machine, torch threads and version, for a report header."""
    machine = platform.processor() or platform.machine()
    return f"{machine}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}"
