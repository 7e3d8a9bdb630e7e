"""``flowtext sample``: decode from a checkpoint, print the text and a statistics table.

Example::

    flowtext sample --ckpt runs/evo/last.ckpt --prompt "def " --policy adaptive
        --policy-arg threshold=0.8 --steps 64 --length 64 --heatmap maturity.png
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text

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
    p.add_argument(
        "--max-memory",
        type=float,
        default=None,
        metavar="GB",
        help="refuse a decode whose estimated memory exceeds this (default: 80%% of the "
        "memory available now)",
    )
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
        _check_output(args.heatmap)
        lm, tok, note = load_checkpoint(args.ckpt)
        err.print(f"[dim]{note}[/dim]")
        prompt = _encode_prompt(args.prompt, tok, lm.net.config.max_len)
        estimate = _check_memory(args, lm.net.config, len(prompt))
        res = _generate(args, lm, tok, kwargs, prompt)
    except (FlowtextError, DataError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, never wrapped
        return 2
    shown = args.prompt.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    assert res.text is not None  # _generate passes the checkpoint's tokenizer
    for b, text in enumerate(res.text):
        console.rule(f"sample {b}" + (" (interrupted)" if res.interrupted else ""))
        console.print(Text(shown, style="bold") + Text(text), highlight=False)
    console.print(_stats_table(args, kwargs, res, estimate))
    if args.heatmap:
        from flowtext.decoding.plots import plot_maturity  # matplotlib only when asked for

        try:
            path = plot_maturity(res, args.heatmap, tok, title=args.policy)
        except OSError as e:
            print(
                f"error: cannot write --heatmap {args.heatmap}: {e.strerror or e}", file=sys.stderr
            )
            return 2
        console.print(Text(f"heatmap written to {path}"))
    return 0


def _check_output(heatmap: str | None) -> None:
    """Refuse an unwritable ``--heatmap`` before decoding, not after the samples print."""
    if heatmap is None:
        return
    folder = Path(heatmap).resolve().parent
    if Path(heatmap).is_dir() or not folder.is_dir() or not os.access(folder, os.W_OK):
        raise ConfigError(
            f"cannot write --heatmap {heatmap}: {folder} is not a writable folder"
            if not Path(heatmap).is_dir()
            else f"--heatmap {heatmap} is a folder; give a file name such as maturity.png"
        )


def _encode_prompt(text: str, tok, max_len: int) -> list[int]:
    """Token ids of ``--prompt``, refused with one line if undecodable or too long."""
    try:
        ids = tok.encode(text) if text else []
    except UnicodeError:
        raise DataError(
            "--prompt holds bytes that are not UTF-8 text, which this model's tokenizer cannot "
            "encode; pass UTF-8 text"
        ) from None
    if len(ids) >= max_len:
        raise ConfigError(
            f"--prompt is {len(ids)} tokens but the model's context is max_len={max_len} "
            f"tokens, which leaves no room to generate; use at most {max_len - 1} prompt tokens"
        )
    return ids


def _memory_estimate(config, *, batch: int, positions: int, steps: int, record: bool) -> int:
    """Rough peak bytes of one decode, to refuse absurd sizes before allocating anything.

    Counts the float64 time grid ``[steps + 1, positions]``, the recorded times
    ``[steps + 1, batch, positions]`` (with ``record``), and per position of every row the
    logits and probabilities (``2 vocab_size`` floats) plus the KV cache and a few
    activations (``(2 n_layers + 8) d_model`` floats).

    Args:
        config: The network's :class:`~flowtext.nn.FlowTransformerConfig`.
        batch: Rows ``B``.
        positions: Prompt plus generated tokens ``L``.
        steps: Global steps ``K``.
        record: Whether every step's times are kept.

    Returns:
        Bytes.
    """
    grid = (steps + 1) * positions * 8 * (1 + (batch if record else 0))
    per_position = 4 * (2 * config.vocab_size + (2 * config.n_layers + 8) * config.d_model)
    return grid + batch * positions * per_position


def _available_bytes() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def _check_memory(args: argparse.Namespace, config, prompt_len: int) -> int:
    for name in ("length", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name} must be >= 1, got {value}")
    positions = prompt_len + min(args.length, config.max_len)
    steps = args.steps if args.steps is not None else args.length
    need = _memory_estimate(
        config, batch=args.batch, positions=positions, steps=steps, record=bool(args.heatmap)
    )
    if args.max_memory is not None:
        limit, origin = int(args.max_memory * 1e9), f"--max-memory {args.max_memory:g}"
    else:
        free = _available_bytes()
        if free is None:
            return need
        limit, origin = int(0.8 * free), "80% of the memory available now"
    if need > limit:
        raise ConfigError(
            f"this decode needs about {need / 1e9:.1f} GB (--batch {args.batch}, --steps "
            f"{steps}, {positions} positions) but the limit is {limit / 1e9:.1f} GB "
            f"({origin}); lower --batch, --steps or --length, or raise --max-memory"
        )
    return need


def _policy_kwargs(items: Sequence[str]) -> dict[str, Any]:
    kwargs = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--policy-arg takes K=V, got {item!r}")
        k, v = item.split("=", 1)
        kwargs[k.strip().replace("-", "_")] = _parse_value(v.strip())
    return kwargs


def _generate(
    args: argparse.Namespace, lm, tok, kwargs: dict[str, Any], prompt: list[int]
) -> GenerationResult:
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


def _stats_table(
    args: argparse.Namespace, kwargs: dict[str, Any], res: GenerationResult, estimate: int
) -> Table:
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
        ("memory estimate (MB)", f"{estimate / 1e6:.1f}"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    return table
