"""Reproduce the theory's limit statements as numbers and figures (issue 6, part 1).

On the exact Gaussian toy (``flowtext.toy.GaussianToy``, output law pushed forward exactly by
``flowtext.demo.pushforward``, so there is no Monte Carlo error):

1. error vs steps per solver and policy, with observed orders (theory T6/T7);
2. transport error per block size ``B = 1 (AR), 2, 4, ..., L (synchronous)`` at a fixed step budget;
3. the diagonal-width sweep: distance of the ``diagonal(w)`` grid to the AR and synchronous grids,
   and the toy transport error vs ``w`` (T3);

and on a flow LM checkpoint (``--ckpt PATH``; without it a tiny Evo is trained for a few steps
through the training CLI, and the output says so):

4. validation ELBO in bits/byte under ``block(B)`` for ``B = 1 .. L`` (two-stream estimator,
   averaged over validation batches and noise draws) and under ``diagonal(w)`` per width
   (single-stream estimator), both through :meth:`flowtext.lm.FlowLM.policy_bound`;
5. the synchronous K-step ELBO (with ``t_min``, fixed noise) converging to the continuous bound as
   ``K`` grows, with the fitted log-log slope of the gap (theory predicts -1, T5);
6. the exact K-step ELBO under ``autoregressive`` against the teacher-forced AR NLL, in float64
   (max abs difference; theory says they are equal, T4).

Writes ``limits.md`` (tables), ``*.csv``, ``summary.json`` and PNG figures into ``--out``.

    python -m experiments.limits --ckpt runs/evo/lightning_logs/version_0/checkpoints/last.ckpt
    python -m experiments.limits --quick          # seconds: tiny toy, 3-step tiny model
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

from experiments.common import (
    bound_bpb,
    datamodule,
    fit_config,
    hardware,
    md_table,
    transport_error,
    val_batches,
    write_csv,
)
from flowtext import policies, solvers
from flowtext.demo import observed_orders, toy_report
from flowtext.objectives import LN2, continuous_elbo, discrete_elbo, two_stream_loss, with_t_min
from flowtext.plotting import plot_convergence, plot_time_grids
from flowtext.regime import block_bound
from flowtext.toy import GaussianToy
from flowtext.training import TINY_OVERRIDES


def _fit_slope(xs: list[float], ys: list[float]) -> float:
    lx = torch.tensor(xs, dtype=torch.float64).log()
    ly = torch.tensor(ys, dtype=torch.float64).log()
    return float(((lx - lx.mean()) * (ly - ly.mean())).sum() / ((lx - lx.mean()) ** 2).sum())


def _label(b: int, length: int) -> str:
    return "AR" if b == 1 else ("synchronous" if b == length else f"block({b})")


def _md(rows: list[dict]) -> list[str]:
    return md_table(rows, digits=4)


# ------------------------------------------------------------------------------------ the toy
def toy_orders(res: dict) -> list[dict]:
    """Section 1: expected and observed order of every (policy, solver) of the toy report."""
    orders = observed_orders(res)
    rows = []
    for key, curve in res.items():
        pol, name = key.split("/")
        rows.append(
            {
                "policy": pol,
                "solver": name,
                "expected_order": solvers.get(name).order,
                "observed_order": orders[key],
                "error_at_max_steps": curve[-1][1],
                "max_steps": curve[-1][0],
            }
        )
    return rows


def toy_block_sweep(out: Path, toy, length: int, multipliers, schedule: str) -> list[dict]:
    """Section 2: the same total budget ``K = 4 L`` for every block size (``L`` a power of 2)."""
    budget, rows, curves = 4 * length, [], {}
    for b in [2**i for i in range(int(math.log2(length)) + 1)]:
        pol = policies.Block(size=b)
        row = {"block_size": b, "n_blocks": pol.n_blocks(length), "steps": budget}
        for name in ("euler", "rk4"):
            grid = pol.grid(length, budget, dtype=torch.float64)
            row[f"error_{name}"] = transport_error(toy, grid, schedule, name)
        rows.append(row)
        xs = [pol.n_blocks(length) * m for m in multipliers]
        ys = [
            transport_error(toy, pol.grid(length, k, dtype=torch.float64), schedule, "rk4")
            for k in xs
        ]
        curves[f"{_label(b, length)}/rk4"] = (xs, ys)
    plot_convergence(
        curves,
        out / "toy_block_sweep.png",
        xlabel="global steps K",
        ylabel="max |mean/cov error|",
        title=f"Gaussian toy (L={length}): block size sweep, rk4",
    )
    return rows


def _diagonal_row(toy, length: int, w: float, schedule: str) -> dict:
    grid = policies.Diagonal(width=w).grid
    ar_grid = policies.Autoregressive().grid(length, length, dtype=torch.float64)
    sync_grid = policies.Synchronous().grid(length, length, dtype=torch.float64)
    g, fine = (
        grid(length, length, dtype=torch.float64),
        grid(length, 4 * length, dtype=torch.float64),
    )
    return {
        "width": w,
        "dist_to_AR_K=L": (g - ar_grid).abs().max().item(),
        "dist_to_sync_K=L": (g - sync_grid).abs().max().item(),
        "error_euler_K=4L": transport_error(toy, fine, schedule, "euler"),
        "error_rk4_K=4L": transport_error(toy, fine, schedule, "rk4"),
    }


def toy_diagonal_sweep(out: Path, toy, length: int, schedule: str) -> list[dict]:
    """Section 3: grid distances at ``K = L`` and toy error at ``K = 4 L`` per width."""
    widths = sorted({1 / (4 * length), 1 / length, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 16.0})
    rows = [_diagonal_row(toy, length, w, schedule) for w in widths]
    grids = {
        f"diagonal({w:.3g})": policies.Diagonal(width=w).grid(length, 2 * length)
        for w in widths
        if w in (1 / (4 * length), 0.25, 1.0, 16.0)
    }
    plot_time_grids(grids, out / "diagonal_grids.png", title=f"diagonal(w) grids, L={length}")
    _plot_xy(
        {
            "dist to AR grid": [(r["width"], r["dist_to_AR_K=L"]) for r in rows],
            "dist to sync grid": [(r["width"], r["dist_to_sync_K=L"]) for r in rows],
            "toy error rk4 (K=4L)": [(r["width"], r["error_rk4_K=4L"]) for r in rows],
        },
        out / "diagonal_sweep.png",
        xlabel="diagonal width w",
        ylabel="max abs difference / error",
        title="diagonal(w): AR as w -> 0, synchronous as w grows",
        logy=True,
    )
    return rows


def toy_sections(out: Path, *, length: int, multipliers: tuple[int, ...], schedule: str) -> dict:
    """Sections 1-3 on the exact Gaussian toy."""
    res = toy_report(out / "toy", length=length, multipliers=multipliers, schedule=schedule)
    toy = GaussianToy.random(length, 2, generator=torch.Generator().manual_seed(0))
    found = {
        "orders": toy_orders(res),
        "block": toy_block_sweep(out, toy, length, multipliers, schedule),
        "diagonal": toy_diagonal_sweep(out, toy, length, schedule),
    }
    for name, key in (
        ("orders", "orders"),
        ("block_sweep", "block"),
        ("diagonal_sweep", "diagonal"),
    ):
        write_csv(out / f"toy_{name}.csv", found[key])
    return found


def _plot_xy(curves, path: Path, *, xlabel, ylabel, title, logx=True, logy=False, hlines=None):
    import matplotlib.pyplot as plt  # Agg is set by flowtext.plotting

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for label, pts in curves.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
    for label, y in (hlines or {}).items():
        ax.axhline(y, linestyle="--", linewidth=1, color="gray")
        ax.annotate(label, (ax.get_xlim()[0], y), fontsize=8, va="bottom")
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# ------------------------------------------------------------------------------ the checkpoint
def load_model(args, out: Path):
    """``(lm, datamodule, provenance)`` from ``--ckpt`` or a freshly trained tiny Evo."""
    if args.ckpt:
        from flowtext.checkpoint import load_checkpoint, read_checkpoint

        lm, _, note = load_checkpoint(args.ckpt)
        state = read_checkpoint(args.ckpt)
        fallback = {"corpus": "stdlib", "seq_len": lm.net.config.max_len, "batch_size": 16}
        dm = datamodule(state.get("datamodule_hyper_parameters"), fallback)
        what = f"checkpoint {args.ckpt} (step {state.get('global_step')}; {note})"
        return lm.eval(), dm, what
    steps = args.train_steps
    cli, _ = fit_config(
        "evo-tiny.yaml",
        out / "train",
        [
            f"--trainer.max_steps={steps}",
            f"--trainer.max_time={args.train_time}",
            f"--trainer.val_check_interval={max(1, min(steps, 250))}",
            *(TINY_OVERRIDES if args.quick else []),
        ],
    )
    what = (
        f"NO CHECKPOINT GIVEN: a tiny Evo trained here for {cli.trainer.global_step} steps "
        f"(evo-tiny.yaml{' + tiny overrides' if args.quick else ''}); its numbers test the "
        "limit statements, not model quality"
    )
    dm = cli.datamodule
    dm.prepare_data()
    dm.setup("validate")
    return cli.model.eval(), dm, what


def ckpt_block_sweep(lm, batches, args, gen, bpt: float) -> list[dict]:
    """Section 4a: ``B = 1`` (AR, one jump per token), 2, 4, ..., ``L`` (synchronous)."""
    length = batches[0].shape[1]
    sizes = [2**i for i in range(int(math.log2(length)) + 1)]
    if sizes[-1] != length:
        sizes.append(length)
    rows = []
    for b in sizes:
        bound = block_bound(b, args.steps_per_block, length)
        bpb, se = bound_bpb(
            lm, batches, bound.policy, bound.steps,
            bytes_per_token=bpt, repeats=args.repeats, generator=gen,
        )  # fmt: skip
        steps = 1 if b == 1 else args.steps_per_block
        rows.append(
            {
                "policy": _label(b, length),
                "block_size": b,
                "steps_per_block": steps,
                "bpb": bpb,
                "stderr": se,
            }
        )
    return rows


def ckpt_diagonal_sweep(lm, batches, args, gen, bpt: float) -> list[dict]:
    """Section 4b: the single-stream estimate of the ``diagonal(w)`` bound per width."""
    length = batches[0].shape[1]
    t_min = lm.regime.t_min or 1.0 / max(2, args.steps_per_block)
    steps = length * args.diagonal_steps
    rows = []
    for w in sorted({1 / (4 * length), 0.05, 0.1, 0.25, 0.5, 1.0, 4.0}):
        bpb, se = bound_bpb(
            lm, batches, policies.Diagonal(width=w), steps,
            bytes_per_token=bpt, repeats=args.repeats, generator=gen, t_min=t_min,
        )  # fmt: skip
        rows.append({"width": w, "steps": steps, "t_min": t_min, "bpb": bpb, "stderr": se})
    return rows


def elbo_vs_k(lm, tok: torch.Tensor, args, out: Path, bpt: float) -> dict:
    """Section 5: the synchronous K-step ELBO (fixed noise, ``t_min``) -> the continuous bound."""
    net, schedule, length = lm.net, lm.schedule, tok.shape[1]
    eps = torch.randn(
        (*tok.shape, net.config.d_embed), generator=torch.Generator().manual_seed(args.seed)
    )
    t_min = args.t_min
    cont = continuous_elbo(net, tok, schedule, t_min=t_min, eps=eps, n_points=args.quad_points)
    cont_bpb = float(cont.sum(1).mean()) / length / LN2 / bpt
    rows = []
    for k in args.ks:
        grid = with_t_min(policies.Synchronous().grid(length, k, dtype=torch.float64), t_min)
        e = discrete_elbo(net, tok, grid, schedule, eps=eps)
        e_bpb = float(e.sum(1).mean()) / length / LN2 / bpt
        rows.append(
            {"K": k, "elbo_bpb": e_bpb, "continuous_bpb": cont_bpb, "gap": abs(e_bpb - cont_bpb)}
        )
    fit = [r for r in rows if r["K"] >= 4 and r["gap"] > 0]
    slope = _fit_slope([r["K"] for r in fit], [r["gap"] for r in fit])
    plot_convergence(
        {"|ELBO_K - ELBO_cont|": ([r["K"] for r in rows], [r["gap"] for r in rows])},
        out / "elbo_vs_k.png",
        xlabel="synchronous steps K",
        ylabel="gap to continuous bound (bits/byte)",
        title=f"ELBO_K -> continuous (t_min={t_min}); fitted slope {slope:.2f}",
        slopes={"|ELBO_K - ELBO_cont|": 1},
    )
    return {"rows": rows, "slope": slope, "continuous_bpb": cont_bpb}


def ar_check(lm, tok: torch.Tensor, gen, bpt: float) -> dict:
    """Section 6: the exact ELBO under ``autoregressive`` vs the teacher-forced NLL, float64."""
    net64 = copy.deepcopy(lm.net).double()
    length = tok.shape[1]
    ar_grid = policies.Autoregressive().grid(length, length, dtype=torch.float64)
    elbo_ar = discrete_elbo(net64, tok, ar_grid, lm.schedule, generator=gen)
    nll_ar = two_stream_loss(net64, tok, lm.schedule, block_size=1, generator=gen).nats
    return {
        "elbo_ar_bpb": float(elbo_ar.mean()) / LN2 / bpt,
        "ar_nll_bpb": float(nll_ar.mean()) / LN2 / bpt,
        "max_abs_diff_nats_per_token": float((elbo_ar - nll_ar).abs().max()),
        "tokens": tok.numel(),
    }


def _ckpt_figures(out: Path, block_rows: list[dict], diag_rows: list[dict], m: int) -> None:
    _plot_xy(
        {"block(B) ELBO": [(r["block_size"], r["bpb"]) for r in block_rows]},
        out / "block_sweep.png",
        xlabel="block size B (1 = AR, L = synchronous)",
        ylabel="validation ELBO (bits/byte)",
        title=f"block-size sweep, {m} steps per block (B > 1)",
    )
    _plot_xy(
        {"diagonal(w) ELBO": [(r["width"], r["bpb"]) for r in diag_rows]},
        out / "diagonal_elbo.png",
        xlabel="diagonal width w",
        ylabel="validation ELBO (bits/byte)",
        title="diagonal-width sweep (single-stream estimator)",
        logy=True,
        hlines={"AR": block_rows[0]["bpb"], "synchronous": block_rows[-1]["bpb"]},
    )


@torch.no_grad()
def checkpoint_sections(lm, dm, out: Path, args) -> dict:
    """Sections 4-6 on a flow LM."""
    bpt = float(dm.bytes_per_token)
    batches = val_batches(dm, args.val_batches)
    gen = torch.Generator().manual_seed(args.seed)  # shared, in this order, by 4a, 4b and 6
    block_rows = ckpt_block_sweep(lm, batches, args, gen, bpt)
    diag_rows = ckpt_diagonal_sweep(lm, batches, args, gen, bpt)
    k = elbo_vs_k(lm, batches[0][: args.elbo_seqs], args, out, bpt)
    ar_row = ar_check(lm, batches[0][: args.elbo_seqs], gen, bpt)
    _ckpt_figures(out, block_rows, diag_rows, args.steps_per_block)
    write_csv(out / "ckpt_block_sweep.csv", block_rows)
    write_csv(out / "ckpt_diagonal_sweep.csv", diag_rows)
    write_csv(out / "elbo_vs_k.csv", k["rows"])
    write_csv(out / "ar_elbo_vs_nll.csv", [ar_row])
    return {
        "block": block_rows,
        "diagonal": diag_rows,
        "elbo_vs_k": k["rows"],
        "elbo_vs_k_slope": k["slope"],
        "continuous_bpb": k["continuous_bpb"],
        "ar_check": ar_row,
        "length": batches[0].shape[1],
        "val_batches": len(batches),
    }


# ---------------------------------------------------------------------------------------- main
def write_markdown(out: Path, toy: dict, ck: dict, meta: dict) -> Path:
    lines = [
        "# Limit statements, measured",
        "",
        f"command: `{meta['command']}`  ",
        f"model: {meta['model']}  ",
        f"hardware: {meta['hardware']}; wall time {meta['wall_s']:.0f} s",
        "",
        "## 1. Gaussian toy: error vs steps per solver (observed orders)",
        "",
        "Observed order = log2(e_K / e_2K) over the last two step counts "
        f"(toy L={meta['toy_length']}, d=2, {meta['schedule']} schedule, exact pushforward).",
        "",
        *_md(toy["orders"]),
        "",
        "Figures: `toy/convergence.png`, `toy/time_grids.png`.",
        "",
        "## 2. Gaussian toy: transport error per block size (K = 4L for all)",
        "",
        *_md(toy["block"]),
        "",
        "Figure: `toy_block_sweep.png` (rk4, error vs K per block size).",
        "",
        "## 3. Diagonal width: distance to the AR and synchronous grids (K = L), "
        "toy error (K = 4L)",
        "",
        *_md(toy["diagonal"]),
        "",
        "Figures: `diagonal_sweep.png`, `diagonal_grids.png`.",
        "",
        "## 4. Checkpoint: validation ELBO per block size and diagonal width",
        "",
        f"Sequence length {ck['length']}; {ck['val_batches']} validation batches x "
        f"{meta['repeats']} noise draws; mean and standard error in bits/byte.",
        "",
        *_md(ck["block"]),
        "",
        *_md(ck["diagonal"]),
        "",
        "Figures: `block_sweep.png`, `diagonal_elbo.png`.",
        "",
        "## 5. Synchronous ELBO vs K -> continuous bound",
        "",
        f"t_min = {meta['t_min']}, fixed noise, {meta['elbo_seqs']} sequences; continuous bound "
        f"{ck['continuous_bpb']:.4f} bits/byte (Simpson, {meta['quad_points']} intervals). "
        f"Fitted log-log slope of the gap (K >= 4): **{ck['elbo_vs_k_slope']:.2f}** "
        "(theory: -1).",
        "",
        *_md(ck["elbo_vs_k"]),
        "",
        "Figure: `elbo_vs_k.png`.",
        "",
        "## 6. ELBO under `autoregressive` = AR NLL (float64)",
        "",
        *_md([ck["ar_check"]]),
        "",
    ]
    path = out / "limits.md"
    path.write_text("\n".join(lines))
    return path


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--ckpt", default=None, help="Lightning checkpoint of a FlowLM")
    p.add_argument("--out", default="outputs/limits")
    p.add_argument("--quick", action="store_true", help="tiny sizes, seconds")
    p.add_argument("--schedule", default="linear", help="schedule of the Gaussian toy")
    p.add_argument("--steps-per-block", type=int, default=16, help="m of the block sweep")
    p.add_argument("--diagonal-steps", type=int, default=4, help="steps per token, diagonal")
    p.add_argument("--val-batches", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2, help="noise draws per validation batch")
    p.add_argument("--elbo-seqs", type=int, default=4, help="sequences of sections 5 and 6")
    p.add_argument("--t-min", type=float, default=0.1)
    p.add_argument("--quad-points", type=int, default=2048)
    p.add_argument("--ks", default="2,4,8,16,32,64,128")
    p.add_argument("--train-steps", type=int, default=300, help="without --ckpt")
    p.add_argument("--train-time", default="00:00:02:00", help="without --ckpt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: no oversubscription on a shared machine)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.steps_per_block, args.val_batches, args.repeats = 4, 2, 1
        args.elbo_seqs, args.quad_points, args.ks, args.t_min = 2, 256, "2,4,8,16,32", 0.2
        args.train_steps = min(args.train_steps, 3)
    args.ks = [int(k) for k in args.ks.split(",")]
    args.argv = sys.argv[1:] if argv is None else list(argv)
    return args


def main(argv=None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    toy_length = 4 if args.quick else 8
    mults = (1, 2, 4, 8) if args.quick else (1, 2, 4, 8, 16)
    toy = toy_sections(out, length=toy_length, multipliers=mults, schedule=args.schedule)
    print(f"[limits] toy sections: {time.perf_counter() - t0:.1f} s", flush=True)
    lm, dm, what = load_model(args, out)
    print(f"[limits] model ready: {time.perf_counter() - t0:.1f} s", flush=True)
    ck = checkpoint_sections(lm, dm, out, args)
    print(f"[limits] checkpoint sections: {time.perf_counter() - t0:.1f} s", flush=True)
    meta = {
        "command": "python -m experiments.limits " + " ".join(args.argv),
        "model": what,
        "hardware": hardware(),
        "wall_s": time.perf_counter() - t0,
        "toy_length": toy_length,
        "schedule": args.schedule,
        "repeats": args.repeats,
        "t_min": args.t_min,
        "elbo_seqs": args.elbo_seqs,
        "quad_points": args.quad_points,
    }
    md = write_markdown(out, toy, ck, meta)
    (out / "summary.json").write_text(json.dumps({"meta": meta, "toy": toy, "ckpt": ck}, indent=1))
    print(md.read_text())
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
