"""The main job (``flowtext run``, the README's ``make run``).

1. The component-library demo on the exact Gaussian toy (time grids, convergence figure).
2. Train a small Evo on the default corpus (``experiments/configs/evo-tiny.yaml``): samples so
   far and validation bits per byte (AR, block and synchronous policies) print at every
   validation; TensorBoard logs and checkpoints go to ``OUT/train``.
3. Decode from the trained model under every policy (AR, block, diagonal, synchronous,
   adaptive, speculative), print the samples with speed statistics, and draw the maturity heatmaps.

Everything lands in ``OUT`` (default ``outputs/run``), with ``summary.md`` listing it.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from rich.console import Console
from rich.table import Table
from rich.text import Text

from flowtext.decoding.plots import plot_maturity, plot_policy_comparison
from flowtext.demo import observed_orders, toy_report
from flowtext.errors import ConfigError, FlowtextError
from flowtext.training import cli_main

__all__ = ["DECODE_POLICIES", "decode_report", "run_main"]

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "evo-tiny.yaml"

DECODE_POLICIES: dict[str, tuple[str, dict, int | None]] = {
    "autoregressive": ("autoregressive", {}, None),
    "block(8)": ("block", {"size": 8}, None),
    "diagonal(0.25)": ("diagonal", {"width": 0.25}, None),
    "synchronous": ("synchronous", {}, 32),
    "adaptive": ("adaptive", {}, None),
    "speculative": ("speculative", {}, None),
}
"""Label -> (policy name, policy kwargs, steps or ``None`` for the policy's default)."""


def decode_report(
    model, tokenizer, out_dir: str | Path, *, prompt: str = "def ", length: int = 96, seed: int = 0
) -> list[dict]:
    """Decode one continuation of ``prompt`` under every policy of :data:`DECODE_POLICIES`.

    Args:
        model: A trained :class:`~flowtext.lm.FlowLM`.
        tokenizer: Its tokenizer.
        out_dir: Folder for ``maturity_<policy>.png`` and ``policies.png``.
        prompt: Prompt text.
        length: Tokens to generate.
        seed: Sampling seed.

    Returns:
        One dict per policy: label, text, network evaluations, tokens per evaluation, tokens/s.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = tokenizer.encode(prompt)
    length = max(1, min(length, model.net.config.max_len - len(ids)))
    model.eval()
    rows, results = [], {}
    for label, (name, kwargs, steps) in DECODE_POLICIES.items():
        with torch.no_grad():  # the first call pays one-time warm-up costs: time the second
            for _ in range(2):
                res = model.generate(
                    prompt=[ids],
                    length=length,
                    policy=name,
                    policy_kwargs=kwargs,
                    steps=steps,
                    temperature=0.8,
                    tokenizer=tokenizer,
                    record=True,
                    generator=torch.Generator().manual_seed(seed),
                )
        results[label] = res
        slug = "".join(c if c.isalnum() else "_" for c in label).strip("_")
        with warnings.catch_warnings():  # an untrained model's bytes need glyphs no font has
            warnings.filterwarnings("ignore", message="Glyph .* missing from font")
            plot_maturity(res, out / f"maturity_{slug}.png", tokenizer, title=label)
        s = res.stats
        rows.append(
            {
                "policy": label,
                "text": prompt + res.text[0],
                "nfe": s.nfe,
                "tokens_per_nfe": s.tokens_per_eval,
                "tokens_per_s": s.tokens_per_second,
            }
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        plot_policy_comparison(results, out / "policies.png", tokenizer)
    return rows


def run_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``flowtext run``.

    Args:
        argv: Arguments after ``run``; unknown ``--section.key=value`` options are passed to the
            training CLI (e.g. ``--trainer.max_time=00:00:02:00``).

    Returns:
        Exit code: 0, 2 on bad input (one line naming the fix, before training where it can
        be known then, e.g. a prompt longer than the model's context), 143 after SIGTERM.
    """
    parser = argparse.ArgumentParser(
        prog="flowtext run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="training YAML")
    parser.add_argument("--out", default="outputs/run", help="output folder")
    parser.add_argument("--prompt", default="def ", help="prompt of the final samples")
    args, overrides = parser.parse_known_args(argv)
    console = Console()
    if not Path(args.config).is_file():
        console.print(f"[red]config {args.config} not found[/red]; pass --config PATH")
        return 2
    try:
        _run(args, overrides, console)
    except SIGTERMException:
        print("error: stopped by SIGTERM", file=sys.stderr)
        return 143
    except (FlowtextError, OSError) as e:
        text = " ".join(str(e).split())  # one line, never wrapped
        print(f"error: {type(e).__name__}: {text}", file=sys.stderr)
        return 2
    return 0


def _build(args: argparse.Namespace, overrides: list[str], out: Path):  # noqa: ANN202
    """Build the training CLI and check the final prompt against the model, before any work."""
    cli = cli_main(
        ["--config", args.config, f"--trainer.default_root_dir={out / 'train'}", *overrides],
        run=False,
    )
    n, context = len(cli.datamodule.tokenizer.encode(args.prompt)), cli.model.net.config.max_len
    if n >= context:
        raise ConfigError(
            f"--prompt is {n} tokens but the model's context is net.max_len={context} tokens, "
            f"which leaves no room to generate; use a prompt of at most {context - 1} tokens"
        )
    return cli


def _run(args: argparse.Namespace, overrides: list[str], console: Console) -> None:
    out = Path(args.out)
    t0 = time.perf_counter()
    cli = _build(args, overrides, out)  # config, corpus and prompt errors surface here
    console.rule("1/3 component library: the exact Gaussian toy")
    orders = observed_orders(toy_report(out / "toy", length=6, multipliers=(1, 2, 4, 8)))
    console.print(
        "observed orders (synchronous): "
        + ", ".join(
            f"{k.split('/')[1]} {v:.2f}" for k, v in orders.items() if k.startswith("synchronous/")
        )
    )

    console.rule("2/3 train Evo on the default corpus")
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    model, dm = cli.model, cli.datamodule
    val = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}

    console.rule("3/3 decode under every policy")
    rows = decode_report(model, dm.tokenizer, out / "decode", prompt=args.prompt)
    _print_tables(console, rows, val)
    summary = out / "summary.md"
    _write_summary(
        summary, args.config, time.perf_counter() - t0, cli.trainer.global_step, val, rows
    )
    console.print(f"figures, logs, checkpoints and [bold]{summary}[/bold] written under {out}")


def _print_tables(console: Console, rows: list[dict], val: dict[str, float]) -> None:
    table = Table(title="samples from the trained Evo")
    for col in ("policy", "NFE", "tokens/NFE", "tokens/s", "sample"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(
            r["policy"],
            str(r["nfe"]),
            f"{r['tokens_per_nfe']:.2f}",
            f"{r['tokens_per_s']:.0f}",
            Text(r["text"]),  # a sample is not rich markup
        )
    console.print(table)
    bpb = Table(title="validation bits per byte")
    bpb.add_column("policy")
    bpb.add_column("bits/byte", justify="right")
    for k, v in sorted(val.items()):
        bpb.add_row(k.removeprefix("val/bpb_"), f"{v:.3f}")
    console.print(bpb)


def _write_summary(
    summary: Path, config: str, wall: float, steps: int, val: dict[str, float], rows: list[dict]
) -> None:
    lines = [
        "# flowtext run",
        "",
        f"config: `{config}`",
        f"wall time: {wall:.0f} s",
        f"training steps: {steps}",
        "",
        "| validation policy | bits/byte |",
        "| --- | --- |",
        *[f"| {k.removeprefix('val/bpb_')} | {v:.3f} |" for k, v in sorted(val.items())],
        "",
        "| decoding policy | NFE | tokens/NFE | tokens/s |",
        "| --- | --- | --- | --- |",
        *[
            f"| {r['policy']} | {r['nfe']} | {r['tokens_per_nfe']:.2f} | {r['tokens_per_s']:.0f} |"
            for r in rows
        ],
        "",
        "Figures: `toy/time_grids.png`, `toy/convergence.png`, `decode/policies.png`, "
        "`decode/maturity_*.png`; logs and checkpoints: `train/`.",
    ]
    summary.write_text("\n".join(lines) + "\n")
