"""Ablation of issue 13's ingredients at equal budget: reverse step and noise schedule.

Trains one tiny model per (family, reverse step, schedule) on the bytes of a stdlib module's
source, every model with the same number of optimizer steps, batch and seed, then reports the
validation bits/byte of its synchronous and ``block(B)`` bounds (one table) and draws the
``block(B)`` bound against the steps per block (network evaluations per block, one figure)::

    python -m experiments.ablate --quick --out /tmp/ablate    # seconds
    python -m experiments.ablate --steps 2000 --out runs/ablate

Ingredients: ``reverse`` = ``gaussian`` (Gaussian-mean step) or ``mixture`` (theory §4b, the
model trains and reports the mixture bound); ``schedule`` = ``cosine`` or ``info-uniform``
(fitted during training every ``--fit-every`` steps, frozen for evaluation, theory §4c);
with ``--self-condition off on`` also self-conditioning (docs/theory.md §3g: bounds of the
two-pass denoiser, plotted at twice the evaluations per step; a ``self_cond`` column).
Families: ``diffusion`` (one block over the sequence) and ``evo`` (the Evo regime). Every
model also reports its exact AR bound (``ar_bpb``, ``block(1)``: one jump per token), the
reference a bound of the same model should not beat by much. Bounds are estimated in evaluation
mode, so every step of a grid is drawn at least once (``cover`` of
:meth:`flowtext.lm.FlowLM.policy_bound`). Outputs in ``--out``: ``ablate.csv``, ``ablate.md``
and ``ablate_steps.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import itertools
import json
import math
from pathlib import Path

import torch

from experiments.common import bound_bpb, hardware, md_table, training_arguments, write_csv
from flowtext.lm import FlowLM
from flowtext.nn import FlowTransformerConfig
from flowtext.policies import Block
from flowtext.regime import TrainingRegime

FAMILIES = ("diffusion", "evo")
REVERSES = ("gaussian", "mixture")
SCHEDULES = ("cosine", "info-uniform")


def corpus(length: int) -> torch.Tensor:
    """Byte ids of stdlib sources (``argparse``, then ``json``), cut into rows of ``length``."""
    import argparse as a
    import json as j

    raw = (inspect.getsource(a) + inspect.getsource(j.decoder)).encode()
    ids = torch.tensor(list(raw), dtype=torch.long)
    n = ids.numel() // length
    return ids[: n * length].reshape(n, length)


def build(family: str, reverse: str, schedule: str, args, self_condition: bool = False) -> FlowLM:
    """A fresh tiny model of ``family`` with the given reverse step, schedule, self-conditioning."""
    base = TrainingRegime.diffusion(args.train_steps) if family == "diffusion" else None
    if base is None:
        base = dataclasses.replace(TrainingRegime.evo(), steps_per_block=args.train_steps)
    fields = base.to_dict() | {"reverse": reverse, "schedule_fit_every": args.fit_every}
    regime = TrainingRegime(**fields)
    net = FlowTransformerConfig(
        vocab_size=256, max_len=args.length, d_model=args.width, n_layers=args.layers,
        n_heads=2, d_embed=16, cond_dim=32, cond_rank=4, attention_backend="sdpa",
        self_condition=self_condition,
    )  # fmt: skip
    kwargs = {"n_bins": 32} if schedule == "info-uniform" else None
    torch.manual_seed(args.seed)
    return FlowLM(net=net, regime=regime, schedule=schedule, schedule_kwargs=kwargs, seed=args.seed)


def train(lm: FlowLM, rows: torch.Tensor, args) -> None:
    """``args.steps`` Adam steps on random batches of ``rows`` (the same draws for every model)."""
    opt = torch.optim.AdamW(lm.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    lm.train()
    for _ in range(args.steps):
        pick = torch.randint(rows.shape[0], (args.batch,), generator=gen)
        loss, _ = lm.training_loss(rows[pick])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
    lm.freeze_schedule()
    lm.eval()


def evaluate(lm: FlowLM, val: list[torch.Tensor], args) -> dict:
    """Bits/byte of the AR bound and of the synchronous and ``block(B)`` bounds at each
    steps-per-block (the model in evaluation mode: every step of each grid is drawn), and
    ``"se"``: the largest standard error among them (over batches times repeats)."""
    n_blocks, ses = -(-args.length // args.block), []
    g = torch.Generator().manual_seed(args.seed + 1)
    out = {"ar": bound_bpb(lm, val, Block(size=1), args.length, bytes_per_token=1.0,
                           repeats=1, generator=g)[0]}  # fmt: skip
    for m in args.steps_per_block:
        g = torch.Generator().manual_seed(args.seed + 1)  # common random numbers
        kw = dict(bytes_per_token=1.0, repeats=args.repeats, generator=g)
        out[("sync", m)], se_sync = bound_bpb(lm, val, "synchronous", m, **kw)
        block = Block(size=args.block)
        out[("block", m)], se_block = bound_bpb(lm, val, block, n_blocks * m, **kw)
        ses += [se_sync, se_block]
    out["se"] = max(ses) if not any(math.isnan(v) for v in ses) else math.nan  # nan: one value
    return out


def figure(results: dict, args, path: Path) -> None:
    """bits/byte of the ``block(B)`` bound against steps per block, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, res in results.items():
        ms = list(args.steps_per_block)
        evals = [m * res.get("passes", 1) for m in ms]  # a self-conditioned step is 2 passes
        ax.plot(evals, [res[("block", m)] for m in ms], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")  # the Gaussian-mean step on cosine reaches thousands of bits/byte
    ax.set_xlabel(f"network evaluations per block of {args.block} (steps, x2 self-conditioned)")
    ax.set_ylabel("validation bound, bits/byte")
    ax.set_title(f"ablation at {args.steps} training steps")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse(argv=None) -> argparse.Namespace:
    """Command-line arguments (``--quick`` shrinks everything to seconds)."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    training_arguments(p, "runs/ablate", steps=1000, length=64, lr=1e-3, repeats=2)
    p.add_argument("--train-steps", type=int, default=16, help="steps per block of training")
    p.add_argument("--fit-every", type=int, default=50, help="info-uniform refit interval")
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    p.add_argument(
        "--self-condition", nargs="+", default=["off"], choices=("off", "on"),
        help="self-conditioning variants ('off on' trains every model both ways)",
    )  # fmt: skip
    args = p.parse_args(argv)
    args.steps_per_block = (2, 4, 8, 16, 64)
    if args.quick:
        args.steps, args.batch, args.length, args.width, args.layers = 4, 4, 16, 32, 1
        args.train_steps, args.fit_every, args.val_batches, args.repeats = 4, 2, 1, 2
        args.steps_per_block = (2, 4)
    return args


def main(argv=None) -> int:
    """Train every variant, print the table, write the CSV, markdown and figure."""
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows_all = corpus(args.length)
    n_val = args.val_batches * args.batch
    val = list(rows_all[-n_val:].split(args.batch))
    train_rows = rows_all[:-n_val]
    results, rows = {}, []
    variants = itertools.product(args.families, REVERSES, SCHEDULES, args.self_condition)
    for fam, rev, sch, sc in variants:
        lm = build(fam, rev, sch, args, self_condition=sc == "on")
        train(lm, train_rows, args)
        res = evaluate(lm, val, args) | {"passes": 2 if sc == "on" else 1}
        name = f"{fam} {rev} {sch}" + (" self-cond" if sc == "on" else "")
        results[name] = res
        m = max(args.steps_per_block)
        sc_col = {"self_cond": sc} if args.self_condition != ["off"] else {}
        rows.append(
            {"family": fam, "reverse": rev, "schedule": sch}
            | sc_col
            | {"ar_bpb": res["ar"]}
            | {f"sync_bpb@{k}": res[("sync", k)] for k in (min(args.steps_per_block), m)}
            | {f"block{args.block}_bpb@{k}": res[("block", k)] for k in args.steps_per_block}
            | {"max_se": res["se"]}
        )
    lines = [f"# ablation ({args.steps} steps per model; {hardware()})", ""]
    lines += md_table(rows)
    print("\n".join(lines))
    write_csv(args.out / "ablate.csv", rows)
    (args.out / "ablate.md").write_text("\n".join(lines) + "\n")
    (args.out / "args.json").write_text(json.dumps(vars(args), default=str, indent=1))
    figure(results, args, args.out / "ablate_steps.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
