"""``flowtext sample``: decode from a checkpoint, print the text and a statistics table.

Example::

    flowtext sample --ckpt runs/evo/last.ckpt --prompt "def " --policy adaptive
        --policy-arg threshold=0.8 --steps 64 --length 64 --heatmap maturity.png
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from flowtext.errors import ConfigError, DataError, FlowtextError

__all__ = ["RawBytes", "load_checkpoint", "sample_main"]


class RawBytes:
    """Fallback tokenizer for 256-id models: id = byte value, no special tokens."""

    vocab_size = 256
    eos_id = None

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes of ``text``."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of byte ids (invalid UTF-8 becomes U+FFFD)."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


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


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> tuple[Any, Any, str]:
    """Rebuild a :class:`~flowtext.lm.FlowLM` and its tokenizer from a Lightning checkpoint.

    The module is rebuilt from the checkpoint's ``hyper_parameters`` (Evo, AR and diffusion LMs
    are configurations of :class:`~flowtext.lm.FlowLM`, so one class reads them all). The
    tokenizer comes from ``checkpoint["flowtext_tokenizer"]``; without it the byte tokenizer is
    assumed (``flowtext.data.ByteTokenizer`` for 259 ids, raw bytes for 256).

    Args:
        path: ``.ckpt`` file.
        map_location: Device to load onto.

    Returns:
        ``(module in eval mode, tokenizer, note)``; ``note`` says where the tokenizer came from.

    Raises:
        ConfigError: Missing file, not a flowtext checkpoint, or a vocabulary that differs from
            the tokenizer's.
    """
    from flowtext.lm import FlowLM

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {str(path)!r} does not exist; pass --ckpt PATH to a .ckpt")
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ConfigError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    hp = dict(ckpt.get("hyper_parameters") or {})
    allowed = set(inspect.signature(FlowLM.__init__).parameters) - {"self", "optimizer"}
    lm = FlowLM(**{k: v for k, v in hp.items() if k in allowed})
    lm.load_state_dict(ckpt["state_dict"])
    lm.eval()
    vocab = lm.net.config.vocab_size
    state = ckpt.get("flowtext_tokenizer")
    if state is not None:
        from flowtext.data import tokenizer_from_state

        tok = tokenizer_from_state(state)
        note = f"tokenizer from the checkpoint ({type(tok).__name__})"
    elif vocab == 256:
        tok, note = RawBytes(), "no tokenizer in the checkpoint: assuming raw bytes (ids 0-255)"
    else:
        from flowtext.data import ByteTokenizer

        tok = ByteTokenizer()
        note = "no tokenizer in the checkpoint: assuming the byte tokenizer (ids 0-255 = bytes)"
    if tok.vocab_size != vocab:
        raise ConfigError(
            f"the checkpoint's model has vocab_size={vocab} but its tokenizer has "
            f"{tok.vocab_size} ids ({note}); this checkpoint was trained with another vocabulary "
            "— save the tokenizer state under checkpoint['flowtext_tokenizer']"
        )
    return lm, tok, note


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
    from rich.console import Console
    from rich.table import Table

    from flowtext.decoding import generate, plot_maturity

    console = Console()
    err = Console(stderr=True)
    try:
        kwargs = {}
        for item in args.policy_arg:
            if "=" not in item:
                raise ConfigError(f"--policy-arg takes K=V, got {item!r}")
            k, v = item.split("=", 1)
            kwargs[k.strip().replace("-", "_")] = _parse_value(v.strip())
        if args.batch < 1:
            raise ConfigError(f"--batch must be >= 1, got {args.batch}")
        lm, tok, note = load_checkpoint(args.ckpt)
        err.print(f"[dim]{note}[/dim]")
        prompt = tok.encode(args.prompt) if args.prompt else []
        eos = None if args.no_eos else getattr(tok, "eos_id", None)
        res = generate(
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
            eos_id=eos,
            use_cache=not args.no_cache,
            record=args.heatmap is not None,
            tokenizer=tok,
        )
    except (FlowtextError, DataError) as e:
        err.print(f"[red]error:[/red] {e}")
        return 2
    for b, text in enumerate(res.text):
        console.rule(f"sample {b}" + (" (interrupted)" if res.interrupted else ""))
        console.print(f"[bold]{args.prompt}[/bold]{text}", markup=False, highlight=False)
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
    console.print(table)
    if args.heatmap:
        path = plot_maturity(res, args.heatmap, tok, title=args.policy)
        console.print(f"heatmap written to [bold]{path}[/bold]")
    return 0
