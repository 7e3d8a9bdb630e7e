"""Tune a training config at equal wall time: a sweep of named variants (issue 12, item 4).

Trains each variant of ``experiments/configs/<config>`` through the training CLI
(:func:`flowtext.training.cli_main`), one after another on one torch thread, for the same wall
time (``--minutes``; ``--trainer.max_steps=-1``, so the time decides), then scores every final
model on the same validation batches with the exact AR bound (``policy_bound`` under block size
1, the ``val/bpb_ar`` the models log; for Evo its AR bound) and writes ``tune-<config>.csv`` and
``tune-<config>.md`` under ``--out``.

**Learning-rate schedule.** The models decay the learning rate by a cosine over
``max_lr_steps`` optimizer steps; a decay longer than the steps the budget allows never
finishes and leaves a short run at a high learning rate. So, unless a variant sets
``max_lr_steps`` itself, a timing probe (``--probe-steps`` steps of the same variant, timed
between its logged steps) measures steps per second, and the run gets
``max_lr_steps = 0.95 * rate * budget`` (the decay ends just before the time does). Variants that
differ only in learning rate, warm-up or ``max_lr_steps`` share one probe. A variant with an
``ar_tail`` override (Evo's last fraction of the schedule on the AR bound alone, whose steps are
cheaper) gets a second probe of tail steps, and the rate of the mix (:func:`mixed_rate`).

**Variants.** ``--variant NAME=OVERRIDE,OVERRIDE,...``; an override is a CLI argument
(``--model.init_args.net.d_model=192``) or a short ``key=value`` from :data:`ALIASES`
(``lr=4e-3,d_model=192,n_heads=4,n_layers=6,batch=32,warmup=50,max_lr_steps=2000``). The first
variant is the reference of the ``ratio`` column. A variant whose ``result.json`` (same config,
overrides and budget) is already under ``--out`` is read back, not retrained, so a coordinate
search can add variants stage by stage into one table.

Periodic validation is off during the sweep (it would cost each variant a different share of
its budget); checkpoints are written as configured.

    python -m experiments.tune --config ar-tiny --minutes 3 \\
        --variant base= --variant lr4=lr=4e-3
    python -m experiments.tune --quick                      # seconds, tiny sizes
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch

from experiments.common import bound_bpb, fit_config, hardware, md_table, val_batches, write_csv
from flowtext.policies import Block
from flowtext.training import TINY_OVERRIDES

ALIASES = {
    "lr": "--model.init_args.optimizer.init_args.lr",
    "d_model": "--model.init_args.net.d_model",
    "n_layers": "--model.init_args.net.n_layers",
    "n_heads": "--model.init_args.net.n_heads",
    "batch": "--data.batch_size",
    "warmup": "--model.init_args.warmup_steps",
    "max_lr_steps": "--model.init_args.max_lr_steps",
    "ar_tail": "--model.init_args.regime.ar_tail",
}
"""Short override names -> CLI arguments."""

SPEED_NEUTRAL = (ALIASES["lr"], ALIASES["warmup"], ALIASES["max_lr_steps"])
"""Arguments that leave a step's time unchanged: variants differing only in them share a probe."""

SWEEP = [
    "--trainer.max_steps=-1",
    "--trainer.limit_val_batches=0",
]
"""Overrides of every sweep run: the time budget decides, no periodic validation."""

COLUMNS = ["variant", "overrides", "params", "max_lr_steps", "steps", "tokens_per_s", "bpb_ar",
           "ratio"]  # fmt: skip


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``NAME=OVERRIDE,...`` -> ``(name, CLI arguments)``; short keys expand through ALIASES."""
    name, _, rest = text.partition("=")
    if not name:
        raise ValueError(f"a variant needs a name: {text!r}")
    out = []
    for item in filter(None, (s.strip() for s in rest.split(","))):
        if item.startswith("--"):
            out.append(item)
            continue
        key, eq, value = item.partition("=")
        if not eq or key not in ALIASES:
            raise ValueError(f"unknown override {item!r}; use --full.path=value or {list(ALIASES)}")
        out.append(f"{ALIASES[key]}={value}")
    return name, out


def max_time(seconds: float) -> str:
    """Lightning's ``DD:HH:MM:SS`` for ``seconds`` (rounded up to a whole second)."""
    s = int(-(-seconds // 1))
    return f"{s // 86400:02d}:{s // 3600 % 24:02d}:{s // 60 % 60:02d}:{s % 60:02d}"


def steps_per_second(cli, wall: float) -> float:
    """Optimizer steps per second of a finished fit, from its logged steps' wall times.

    Falls back to the whole fit (setup included) when fewer than two steps were logged.
    """
    from experiments.compare import train_stats

    dm = cli.datamodule
    stats = train_stats(Path(cli.trainer.log_dir), dm.batch_size, dm.seq_len)
    if "train_tokens_per_s" in stats:
        return stats["train_tokens_per_s"] / (dm.batch_size * dm.seq_len)
    return max(cli.trainer.global_step, 1) / wall


def probe_rate(config: str, root: Path, overrides: list[str], steps: int, cache: dict) -> float:
    """Steps per second of a ``steps``-step fit with ``overrides``, shared through ``cache``."""
    key = tuple(o for o in overrides if not o.startswith(SPEED_NEUTRAL))
    if key not in cache:
        t0 = time.perf_counter()
        cli, _ = fit_config(config, root / f"probe{len(cache)}",
                            [*overrides, f"--trainer.max_steps={steps}"])  # fmt: skip
        cache[key] = steps_per_second(cli, time.perf_counter() - t0)
    return cache[key]


def mixed_rate(rate: float, tail_rate: float, tail: float) -> float:
    """Steps per second of a run whose last ``tail`` fraction of steps runs at ``tail_rate``.

    Args:
        rate: Steps per second before the tail.
        tail_rate: Steps per second inside it.
        tail: Fraction of the steps in the tail, in ``[0, 1]``.

    Returns:
        ``1 / ((1 - tail) / rate + tail / tail_rate)``: the time per step, averaged over steps.
    """
    return 1.0 / ((1.0 - tail) / rate + tail / tail_rate)


def ar_tail(overrides: list[str]) -> float:
    """The ``ar_tail`` a variant's overrides set (the last one wins), else ``0``."""
    key = ALIASES["ar_tail"] + "="
    values = [float(o.removeprefix(key)) for o in overrides if o.startswith(key)]
    return values[-1] if values else 0.0


def budget_rate(config: str, root: Path, extra: list[str], steps: int, cache: dict) -> float:
    """Probed steps per second of a variant, with its ``ar_tail``'s cheaper steps mixed in."""
    rate = probe_rate(config, root, extra, steps, cache)  # no max_lr_steps: no tail yet
    tail = ar_tail(extra)
    if tail <= 0:
        return rate
    in_tail = [*extra, f"{ALIASES['max_lr_steps']}=1", f"{ALIASES['ar_tail']}=0.5"]
    return mixed_rate(rate, probe_rate(config, root, in_tail, steps, cache), tail)


def train_variant(args, name: str, overrides: list[str], cache: dict):
    """Train one variant for ``--minutes``; returns ``(row without bpb, trained model)``."""
    config, seconds = config_file(args.config), args.minutes * 60
    root = args.out / Path(config).stem
    extra = [*(TINY_OVERRIDES if args.quick else []), *SWEEP, *overrides]
    if not any(o.startswith(ALIASES["max_lr_steps"]) for o in overrides):
        rate = budget_rate(config, root / "_probe", extra, args.probe_steps, cache)
        extra.append(f"{ALIASES['max_lr_steps']}={max(1, int(0.95 * rate * seconds))}")
    extra += [f"--trainer.max_time={max_time(seconds)}", f"--seed_everything={args.seed}"]
    t0 = time.perf_counter()
    cli, _ = fit_config(config, root / name, extra)
    wall, lm, dm = time.perf_counter() - t0, cli.model, cli.datamodule
    row = {
        "variant": name,
        "overrides": " ".join(overrides),
        "params": sum(p.numel() for p in lm.parameters()),
        "max_lr_steps": lm.max_lr_steps,
        "steps": cli.trainer.global_step,
        "tokens_per_s": round(steps_per_second(cli, wall) * dm.batch_size * dm.seq_len),
    }
    return row, lm.eval()


def config_file(name: str) -> str:
    """``ar-tiny`` or ``ar-tiny.yaml`` -> the file name under ``experiments/configs``."""
    return name if name.endswith(".yaml") else f"{name}.yaml"


def reference_batches(args) -> tuple[list[torch.Tensor], float]:
    """The validation batches every variant is scored on (the config's data, its batch size)."""
    from experiments.common import CONFIGS
    from flowtext.training import cli_main

    argv = ["--config", str(CONFIGS / config_file(args.config))]
    cli = cli_main([*argv, *(TINY_OVERRIDES if args.quick else [])], run=False)
    dm = cli.datamodule
    dm.prepare_data()
    dm.setup("validate")
    return val_batches(dm, args.val_batches), float(dm.bytes_per_token)


def ar_bpb(lm, batches: list[torch.Tensor], bytes_per_token: float) -> float:
    """Validation bits per byte of ``lm``'s exact AR bound (block size 1, one step per token)."""
    length = batches[0].shape[1]
    gen = torch.Generator().manual_seed(0)
    return bound_bpb(lm, batches, Block(size=1), length, bytes_per_token=bytes_per_token,
                     repeats=1, generator=gen)[0]  # fmt: skip


def run_or_reuse(args, name: str, overrides: list[str], cache: dict, scoring) -> dict:
    """The variant's row: read back from its ``result.json`` when the same run is there."""
    path = args.out / Path(config_file(args.config)).stem / name / "result.json"
    key = {"config": config_file(args.config), "overrides": overrides,
           "minutes": args.minutes, "quick": args.quick, "seed": args.seed}  # fmt: skip
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved["key"] == key:
            print(f"[tune] {name}: reusing {path}", flush=True)
            return saved["row"]
    row, lm = train_variant(args, name, overrides, cache)
    batches, bytes_per_token = scoring()
    row["bpb_ar"] = ar_bpb(lm, batches, bytes_per_token)
    path.write_text(json.dumps({"key": key, "row": row}, indent=1))
    print(f"[tune] {name}: {row}", flush=True)
    return row


def parse(argv=None) -> argparse.Namespace:
    """Command-line options (``--quick``: tiny sizes and a few seconds per variant)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="ar-tiny", help="a config under experiments/configs")
    p.add_argument("--minutes", type=float, default=3.0, help="training wall time per variant")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=OVERRIDE,...",
        help="a named variant (repeatable; the first is the ratio's reference)",
    )
    p.add_argument("--out", type=Path, default=Path("runs/tune"))
    p.add_argument("--probe-steps", type=int, default=50, help="steps of the timing probe")
    p.add_argument("--val-batches", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes, seconds")
    args = p.parse_args(argv)
    if args.quick:
        args.minutes, args.probe_steps, args.val_batches = 0.1, 25, 2
    args.variant = args.variant or (["base=", "lr4=lr=4e-3"] if args.quick else ["base="])
    return args


def report(args, rows: list[dict], argv: list[str]) -> list[str]:
    """The markdown report: command, machine, budget, table."""
    return [
        f"# Tuning `{config_file(args.config)}` at {args.minutes:g} min per variant",
        "",
        f"Command: `python -m experiments.tune {' '.join(argv)}`",
        f"Machine: {hardware()}; one seed each (seed {args.seed}).",
        "bpb_ar: validation bits/byte of the exact AR bound, the same batches for every variant; "
        "ratio: to the first variant.",
        "",
        *md_table(rows, COLUMNS),
    ]


def main(argv=None) -> int:
    """Train, score and tabulate every variant; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        variants = [parse_variant(v) for v in args.variant]
        if len({n for n, _ in variants}) < len(variants):
            raise ValueError("variant names must be unique")
        (args.out / Path(config_file(args.config)).stem).mkdir(parents=True, exist_ok=True)
        scoring = functools.cache(lambda: reference_batches(args))  # built once, when needed
        cache: dict = {}
        rows = [run_or_reuse(args, n, o, cache, scoring) for n, o in variants]
        for row in rows:
            row["ratio"] = row["bpb_ar"] / rows[0]["bpb_ar"]
        stem = Path(config_file(args.config)).stem
        write_csv(args.out / f"tune-{stem}.csv", rows)
        lines = report(args, rows, argv)
        (args.out / f"tune-{stem}.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
    finally:
        torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
