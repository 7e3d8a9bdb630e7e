"""``flowtext sample``: decode from a checkpoint, print the text and a statistics table.

Example::

    flowtext sample --ckpt runs/evo/last.ckpt --prompt "def " --policy adaptive
        --policy-arg threshold=0.8 --steps 64 --length 64 --heatmap maturity.png
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from flowtext.checkpoint import load_checkpoint
from flowtext.decoding import GenerationResult, generate
from flowtext.errors import ConfigError, DataError, FlowtextError

__all__ = ["sample_main"]


def _parse_value(text: str) -> Any:
    low = text.lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flowtext sample", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="Lightning checkpoint of a FlowLM")
    p.add_argument("--prompt", default="", help="prompt text (default: none)")
    p.add_argument("--policy", default="adaptive", help="policy name (adaptive, autoregressive...)")
    p.add_argument(
        "--policy-arg",
        action="append",
        default=[],
        metavar="K=V",
        help="policy constructor argument, repeatable (e.g. size=8, threshold=0.8)",
    )
    p.add_argument("--steps", type=int, default=None, help="global steps (default: length)")
    p.add_argument("--solver", default="euler", help="euler, heun, midpoint, rk4 or ancestral")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--greedy", action="store_true", help="commit the argmax")
    p.add_argument("--length", type=int, default=64, help="tokens to generate (at most)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--deterministic",
        action="store_true",
        help="use only deterministic kernels (torch.use_deterministic_algorithms), so the same "
        "seed gives bit-identical samples on the same hardware",
    )
    p.add_argument("--batch", type=int, default=1, help="samples to draw (row i uses seed + i)")
    p.add_argument("--no-eos", action="store_true", help="do not stop at the tokenizer's EOS")
    p.add_argument("--no-cache", action="store_true", help="disable the KV cache (slow floor)")
    p.add_argument("--heatmap", default=None, metavar="PNG", help="write the maturity heatmap")
    return p


def sample_main(argv: Sequence[str] | None = None) -> int:
    """Run ``flowtext sample``.

    Args:
        argv: Arguments after ``sample``.

    Returns:
        Exit code: 0 on success, 2 on bad input (the message names the fix).
    """
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    before = torch.are_deterministic_algorithms_enabled()
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
    try:
        return _sample(args)
    finally:
        torch.use_deterministic_algorithms(before)


def _sample(args: argparse.Namespace) -> int:
    console = Console()
    err = Console(stderr=True)
    try:
        kwargs = _policy_kwargs(args.policy_arg)
        if args.batch < 1:
            raise ConfigError(f"--batch must be >= 1, got {args.batch}")
        lm, tok, note = load_checkpoint(args.ckpt)
        err.print(f"[dim]{note}[/dim]")
        res = _generate(args, lm, tok, kwargs)
    except (FlowtextError, DataError) as e:
        err.print(f"[red]error:[/red] {e}")
        return 2
    for b, text in enumerate(res.text):
        console.rule(f"sample {b}" + (" (interrupted)" if res.interrupted else ""))
        console.print(f"[bold]{args.prompt}[/bold]{text}", markup=False, highlight=False)
    console.print(_stats_table(args, kwargs, res))
    if args.heatmap:
        from flowtext.decoding.plots import plot_maturity  # matplotlib only when asked for

        path = plot_maturity(res, args.heatmap, tok, title=args.policy)
        console.print(f"heatmap written to [bold]{path}[/bold]")
    return 0


def _policy_kwargs(items: Sequence[str]) -> dict[str, Any]:
    kwargs = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--policy-arg takes K=V, got {item!r}")
        k, v = item.split("=", 1)
        kwargs[k.strip().replace("-", "_")] = _parse_value(v.strip())
    return kwargs


def _generate(args: argparse.Namespace, lm, tok, kwargs: dict[str, Any]) -> GenerationResult:
    prompt = tok.encode(args.prompt) if args.prompt else []
    return generate(
        lm.net,
        lm.schedule,
        prompt=[prompt] * args.batch,
        length=args.length,
        policy=args.policy,
        policy_kwargs=kwargs,
        steps=args.steps,
        solver=args.solver,
        temperature=args.temperature,
        top_p=args.top_p,
        greedy=args.greedy,
        generator=[torch.Generator().manual_seed(args.seed + i) for i in range(args.batch)],
        eos_id=None if args.no_eos else getattr(tok, "eos_id", None),
        use_cache=not args.no_cache,
        record=args.heatmap is not None,
        tokenizer=tok,
    )


def _stats_table(args: argparse.Namespace, kwargs: dict[str, Any], res: GenerationResult) -> Table:
    s = res.stats
    table = Table(title=f"decoding: {args.policy} {kwargs or ''}, {args.solver}")
    table.add_column("statistic")
    table.add_column("value", justify="right")
    rows = [
        ("rows", str(args.batch)),
        ("tokens returned", str(s.tokens)),
        ("tokens committed", str(s.committed)),
        ("global steps", str(s.steps)),
        ("network evaluations (NFE)", str(s.nfe)),
        ("forward passes", str(s.passes)),
        ("tokens per evaluation", f"{s.tokens_per_eval:.2f}"),
        ("wall time (s)", f"{s.wall_time:.3f}"),
        ("tokens / s", f"{s.tokens_per_second:.1f}"),
        ("stopped at EOS", f"{sum(res.eos)}/{len(res.eos)}"),
        ("KV cache", "off" if args.no_cache else "on"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    return table
