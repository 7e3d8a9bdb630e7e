"""The ``flowtext`` command line.

* ``flowtext run``: the main job (toy demo, train Evo on the default corpus, decode, figures).
* ``flowtext demo``: the component-library demo on the exact Gaussian toy (figures + table).
* ``flowtext fit|validate|test --config experiments/configs/NAME.yaml``: LightningCLI training.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from flowtext.errors import FlowtextError

# Each command imports its own stack when run (torch, matplotlib, Lightning, transformers), so
# `flowtext` starts fast and a command never loads another's optional dependencies.

__all__ = ["main"]

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def _demo(argv: Sequence[str]) -> int:
    from flowtext.demo import observed_orders, toy_report  # torch and matplotlib

    parser = argparse.ArgumentParser(prog="flowtext demo", description=__doc__)
    parser.add_argument("--out", default="outputs/demo", help="output folder")
    parser.add_argument("--length", type=int, default=8, help="toy sequence length")
    parser.add_argument("--schedule", default="linear", help="noise schedule name")
    args = parser.parse_args(argv)
    console = Console()
    try:
        with console.status("transporting the Gaussian toy under every policy and solver"):
            results = toy_report(
                args.out, length=args.length, schedule=args.schedule, multipliers=(1, 2, 4, 8, 16)
            )
    except (FlowtextError, OSError) as e:
        Console(stderr=True).print(f"[red]error:[/red] {e}")
        return 2
    orders = observed_orders(results)
    table = Table(
        title="Gaussian toy: transport error (max |mean/cov error|)",
        caption="m = steps per token (synchronous, diagonal, AR: K = m L) or per block (block)",
    )
    table.add_column("policy / solver", no_wrap=True)
    for m in (1, 2, 4, 8, 16):
        table.add_column(f"m={m}", justify="right")
    table.add_column("observed order", justify="right")
    for key, rows in results.items():
        table.add_row(key, *[f"{e:.2e}" for _, e in rows], f"{orders[key]:.2f}")
    console.print(table)
    console.print(f"figures and CSV written to [bold]{args.out}[/bold]")
    return 0


SIGTERM_EXIT = 128 + 15
"""Exit code of a run stopped by SIGTERM (as a shell reports a process killed by it)."""


def _lightning(argv: Sequence[str] | None) -> int:
    # the training stack (Lightning, jsonargparse, torch)
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from flowtext.training import cli_main

    try:
        cli_main(argv)
    except SIGTERMException:
        print(
            "error: stopped by SIGTERM; last.ckpt holds the last saved step: resume with "
            "--ckpt_path last",
            file=sys.stderr,
        )
        return SIGTERM_EXIT
    except (FlowtextError, MisconfigurationException, OSError) as e:
        # a bad config, corpus, checkpoint, full disk or numeric blow-up: one line, no traceback
        text = " ".join(str(e).split())
        print(f"error: {type(e).__name__}: {text}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``flowtext`` command.

    Args:
        argv: Arguments without the program name (defaults to ``sys.argv[1:]``).

    Returns:
        Process exit code.
    """
    explicit = argv is not None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        return _demo(argv[1:])
    if argv and argv[0] == "run":
        from flowtext.run import run_main  # the training stack

        return run_main(argv[1:])
    if argv and argv[0] == "sample":
        from flowtext.sample import sample_main  # torch and the checkpoint reader

        return sample_main(argv[1:])
    if argv and argv[0] in ("adapt", "export"):
        from flowtext.export import hf_main  # the optional Hugging Face commands

        return hf_main(argv)
    if argv and argv[0] in LIGHTNING_COMMANDS:
        return _lightning(argv if explicit else None)
    print(
        "usage: flowtext {run,demo,fit,validate,test,sample} ...\n"
        "  run        the main job: toy demo, train evo-tiny, decode under every policy\n"
        "  demo       Gaussian-toy demo of schedules x policies x solvers\n"
        "  fit        train a model: flowtext fit --config experiments/configs/evo-tiny.yaml",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
