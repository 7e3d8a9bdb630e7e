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
   (single-stream estimator);
5. the synchronous K-step ELBO (with ``t_min``, fixed noise) converging to the continuous bound as
   ``K`` grows, with the fitted log-log slope of the gap (theory predicts -1, T5);
6. the exact K-step ELBO under ``autoregressive`` against the teacher-forced AR NLL, in float64
   (max abs difference; theory says they are equal, T4).

Writes ``limits.md`` (tables), ``*.csv``, ``summary.json`` and PNG figures into ``--out``.

    python experiments/limits.py --ckpt runs/evo/lightning_logs/version_0/checkpoints/last.ckpt
    python experiments/limits.py --quick          # seconds: tiny toy, 3-step tiny model
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flowtext import policies, solvers  # noqa: E402
from flowtext.demo import observed_orders, pushforward, toy_report  # noqa: E402
from flowtext.objectives import (  # noqa: E402
    LN2,
    continuous_elbo,
    discrete_elbo,
    single_stream_loss,
    two_stream_loss,
    with_t_min,
)
from flowtext.plotting import plot_convergence, plot_time_grids  # noqa: E402
from flowtext.toy import GaussianToy  # noqa: E402
from flowtext.training import TINY_OVERRIDES  # noqa: E402


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _fmt(x: float) -> str:
    if x == 0:
        return "0"
    return f"{x:.3e}" if abs(x) < 1e-3 or abs(x) >= 1e4 else f"{x:.4f}"


def _md_table(rows: list[dict], cols: list[str] | None = None) -> list[str]:
    cols = cols or list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [_fmt(r[c]) if isinstance(r[c], float) else str(r[c]) for c in cols]
        out.append("| " + " | ".join(cells) + " |")
    return out


def _fit_slope(xs: list[float], ys: list[float]) -> float:
    lx = torch.tensor(xs, dtype=torch.float64).log()
    ly = torch.tensor(ys, dtype=torch.float64).log()
    return float(((lx - lx.mean()) * (ly - ly.mean())).sum() / ((lx - lx.mean()) ** 2).sum())


def _toy_error(toy: GaussianToy, grid: torch.Tensor, schedule: str, solver: str) -> float:
    mean, cov = pushforward(toy, grid, schedule, solver)
    return max((mean - toy.mean).abs().max().item(), (cov - toy.cov).abs().max().item())


# ------------------------------------------------------------------------------------ the toy
def toy_sections(out: Path, *, length: int, multipliers: tuple[int, ...], schedule: str) -> dict:
    """Sections 1-3 on the exact Gaussian toy."""
    res = toy_report(out / "toy", length=length, multipliers=multipliers, schedule=schedule)
    orders = observed_orders(res)
    order_rows = []
    for key, rows in res.items():
        pol, name = key.split("/")
        order_rows.append(
            {
                "policy": pol,
                "solver": name,
                "expected_order": solvers.get(name).order,
                "observed_order": orders[key],
                "error_at_max_steps": rows[-1][1],
                "max_steps": rows[-1][0],
            }
        )

    toy = GaussianToy.random(length, 2, generator=torch.Generator().manual_seed(0))
    # block-size sweep: same total budget K = 4 L for every block size (L a power of two)
    sizes = [2**i for i in range(int(math.log2(length)) + 1)]
    budget = 4 * length
    block_rows, block_curves = [], {}
    for b in sizes:
        pol = policies.Block(size=b)
        row = {"block_size": b, "n_blocks": pol.n_blocks(length), "steps": budget}
        for name in ("euler", "rk4"):
            grid = pol.grid(length, budget, dtype=torch.float64)
            row[f"error_{name}"] = _toy_error(toy, grid, schedule, name)
        block_rows.append(row)
        xs = [pol.n_blocks(length) * m for m in multipliers]
        ys = [
            _toy_error(toy, pol.grid(length, k, dtype=torch.float64), schedule, "rk4") for k in xs
        ]
        label = "AR" if b == 1 else ("synchronous" if b == length else f"block({b})")
        block_curves[f"{label}/rk4"] = (xs, ys)
    plot_convergence(
        block_curves,
        out / "toy_block_sweep.png",
        xlabel="global steps K",
        ylabel="max |mean/cov error|",
        title=f"Gaussian toy (L={length}): block size sweep, rk4",
    )

    # diagonal-width sweep: grid distances at K = L, toy error at K = 4 L
    ar_grid = policies.Autoregressive().grid(length, length, dtype=torch.float64)
    sync_grid = policies.Synchronous().grid(length, length, dtype=torch.float64)
    widths = sorted({1 / (4 * length), 1 / length, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 16.0})
    diag_rows, grids = [], {}
    for w in widths:
        pol = policies.Diagonal(width=w)
        g = pol.grid(length, length, dtype=torch.float64)
        diag_rows.append(
            {
                "width": w,
                "dist_to_AR_K=L": (g - ar_grid).abs().max().item(),
                "dist_to_sync_K=L": (g - sync_grid).abs().max().item(),
                "error_euler_K=4L": _toy_error(
                    toy, pol.grid(length, 4 * length, dtype=torch.float64), schedule, "euler"
                ),
                "error_rk4_K=4L": _toy_error(
                    toy, pol.grid(length, 4 * length, dtype=torch.float64), schedule, "rk4"
                ),
            }
        )
        if w in (1 / (4 * length), 0.25, 1.0, 16.0):
            grids[f"diagonal({w:.3g})"] = pol.grid(length, 2 * length)
    plot_time_grids(grids, out / "diagonal_grids.png", title=f"diagonal(w) grids, L={length}")
    _plot_xy(
        {
            "dist to AR grid": [(r["width"], r["dist_to_AR_K=L"]) for r in diag_rows],
            "dist to sync grid": [(r["width"], r["dist_to_sync_K=L"]) for r in diag_rows],
            "toy error rk4 (K=4L)": [(r["width"], r["error_rk4_K=4L"]) for r in diag_rows],
        },
        out / "diagonal_sweep.png",
        xlabel="diagonal width w",
        ylabel="max abs difference / error",
        title="diagonal(w): AR as w -> 0, synchronous as w grows",
        logy=True,
    )
    _write_csv(out / "toy_orders.csv", order_rows)
    _write_csv(out / "toy_block_sweep.csv", block_rows)
    _write_csv(out / "toy_diagonal_sweep.csv", diag_rows)
    return {"orders": order_rows, "block": block_rows, "diagonal": diag_rows}


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
    from flowtext.data import FlowTextDataModule

    if args.ckpt:
        from flowtext.checkpoint import load_checkpoint, read_checkpoint

        lm, _, note = load_checkpoint(args.ckpt)
        state = read_checkpoint(args.ckpt)
        dm_hp = dict(state.get("datamodule_hyper_parameters") or {})
        dm_hp.pop("_instantiator", None)
        if not dm_hp:
            dm_hp = {"corpus": "stdlib", "seq_len": lm.net.config.max_len, "batch_size": 16}
        dm = FlowTextDataModule(**dm_hp)
        what = f"checkpoint {args.ckpt} (step {state.get('global_step')}; {note})"
    else:
        from flowtext.training import cli_main

        overrides = TINY_OVERRIDES if args.quick else []
        steps = args.train_steps
        cli = cli_main(
            [
                "fit",
                "--config",
                str(ROOT / "experiments" / "configs" / "evo-tiny.yaml"),
                f"--trainer.default_root_dir={out / 'train'}",
                f"--trainer.max_steps={steps}",
                f"--trainer.max_time={args.train_time}",
                f"--trainer.val_check_interval={max(1, min(steps, 250))}",
                *overrides,
            ]
        )
        lm, dm = cli.model, cli.datamodule
        what = (
            f"NO CHECKPOINT GIVEN: a tiny Evo trained here for {cli.trainer.global_step} steps "
            f"(evo-tiny.yaml{' + tiny overrides' if args.quick else ''}); its numbers test the "
            "limit statements, not model quality"
        )
    dm.prepare_data()
    dm.setup("validate")
    lm.eval()
    return lm, dm, what


def _val_batches(dm, n: int) -> list[torch.Tensor]:
    out = []
    for batch in dm.val_dataloader():
        out.append(batch["tokens"] if isinstance(batch, dict) else batch)
        if len(out) >= n:
            break
    return out


@torch.no_grad()
def checkpoint_sections(lm, dm, out: Path, args) -> dict:
    """Sections 4-6 on a flow LM."""
    net, schedule = lm.net, lm.schedule
    bpt = float(dm.bytes_per_token)
    batches = _val_batches(dm, args.val_batches)
    length = batches[0].shape[1]
    m = args.steps_per_block
    gen = torch.Generator().manual_seed(args.seed)

    def mean_bpb(fn) -> tuple[float, float]:
        vals = torch.tensor(
            [float(fn(tok).nats.mean()) for _ in range(args.repeats) for tok in batches],
            dtype=torch.float64,
        )
        se = float(vals.std() / math.sqrt(len(vals))) if len(vals) > 1 else float("nan")
        return float(vals.mean()) / LN2 / bpt, se / LN2 / bpt

    # 4a. block-size sweep: B = 1 (AR, one jump per token), 2, 4, ..., L (synchronous)
    sizes = [2**i for i in range(int(math.log2(length)) + 1)]
    if sizes[-1] != length:
        sizes.append(length)
    block_rows = []
    for b in sizes:
        steps = 1 if b == 1 else m
        bpb, se = mean_bpb(
            lambda tok, b=b, steps=steps: two_stream_loss(
                net, tok, schedule, block_size=b, steps_per_block=steps, generator=gen
            )
        )
        label = "AR" if b == 1 else ("synchronous" if b == length else f"block({b})")
        block_rows.append(
            {"policy": label, "block_size": b, "steps_per_block": steps, "bpb": bpb, "stderr": se}
        )

    # 4b. diagonal-width sweep: single-stream estimator of the diagonal(w) bound
    t_min_diag = lm.t_min or 1.0 / max(2, m)
    diag_rows = []
    for w in sorted({1 / (4 * length), 0.05, 0.1, 0.25, 0.5, 1.0, 4.0}):
        grid = policies.Diagonal(width=w).grid(
            length, length * args.diagonal_steps, dtype=torch.float64
        )
        grid = with_t_min(grid, t_min_diag)
        bpb, se = mean_bpb(
            lambda tok, grid=grid: single_stream_loss(net, tok, grid, schedule, generator=gen)
        )
        diag_rows.append(
            {"width": w, "steps": grid.shape[0] - 1, "t_min": t_min_diag, "bpb": bpb, "stderr": se}
        )

    # 5. synchronous K-step ELBO -> continuous bound (fixed noise, t_min)
    tok = batches[0][: args.elbo_seqs]
    eps = torch.randn(
        (*tok.shape, net.config.d_embed), generator=torch.Generator().manual_seed(args.seed)
    )
    t_min = args.t_min
    cont = continuous_elbo(net, tok, schedule, t_min=t_min, eps=eps, n_points=args.quad_points)
    cont_bpb = float(cont.sum(1).mean()) / length / LN2 / bpt
    k_rows = []
    for k in args.ks:
        grid = with_t_min(policies.Synchronous().grid(length, k, dtype=torch.float64), t_min)
        e = discrete_elbo(net, tok, grid, schedule, eps=eps)
        e_bpb = float(e.sum(1).mean()) / length / LN2 / bpt
        k_rows.append(
            {"K": k, "elbo_bpb": e_bpb, "continuous_bpb": cont_bpb, "gap": abs(e_bpb - cont_bpb)}
        )
    fit = [r for r in k_rows if r["K"] >= 4 and r["gap"] > 0]
    slope = _fit_slope([r["K"] for r in fit], [r["gap"] for r in fit])
    plot_convergence(
        {"|ELBO_K - ELBO_cont|": ([r["K"] for r in k_rows], [r["gap"] for r in k_rows])},
        out / "elbo_vs_k.png",
        xlabel="synchronous steps K",
        ylabel="gap to continuous bound (bits/byte)",
        title=f"ELBO_K -> continuous (t_min={t_min}); fitted slope {slope:.2f}",
        slopes={"|ELBO_K - ELBO_cont|": 1},
    )

    # 6. ELBO under autoregressive (K = L passes) vs the teacher-forced AR NLL, float64
    net64 = copy.deepcopy(net).double()
    tok6 = batches[0][: args.elbo_seqs]
    ar_grid = policies.Autoregressive().grid(length, length, dtype=torch.float64)
    elbo_ar = discrete_elbo(net64, tok6, ar_grid, schedule, generator=gen)
    nll_ar = two_stream_loss(net64, tok6, schedule, block_size=1, generator=gen).nats
    ar_diff = float((elbo_ar - nll_ar).abs().max())
    ar_row = {
        "elbo_ar_bpb": float(elbo_ar.mean()) / LN2 / bpt,
        "ar_nll_bpb": float(nll_ar.mean()) / LN2 / bpt,
        "max_abs_diff_nats_per_token": ar_diff,
        "tokens": tok6.numel(),
    }

    _plot_xy(
        {
            "block(B) ELBO": [(r["block_size"], r["bpb"]) for r in block_rows],
        },
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
        hlines={
            "AR": block_rows[0]["bpb"],
            "synchronous": block_rows[-1]["bpb"],
        },
    )
    _write_csv(out / "ckpt_block_sweep.csv", block_rows)
    _write_csv(out / "ckpt_diagonal_sweep.csv", diag_rows)
    _write_csv(out / "elbo_vs_k.csv", k_rows)
    _write_csv(out / "ar_elbo_vs_nll.csv", [ar_row])
    return {
        "block": block_rows,
        "diagonal": diag_rows,
        "elbo_vs_k": k_rows,
        "elbo_vs_k_slope": slope,
        "continuous_bpb": cont_bpb,
        "ar_check": ar_row,
        "length": length,
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
        *_md_table(toy["orders"]),
        "",
        "Figures: `toy/convergence.png`, `toy/time_grids.png`.",
        "",
        "## 2. Gaussian toy: transport error per block size (K = 4L for all)",
        "",
        *_md_table(toy["block"]),
        "",
        "Figure: `toy_block_sweep.png` (rk4, error vs K per block size).",
        "",
        "## 3. Diagonal width: distance to the AR and synchronous grids (K = L), "
        "toy error (K = 4L)",
        "",
        *_md_table(toy["diagonal"]),
        "",
        "Figures: `diagonal_sweep.png`, `diagonal_grids.png`.",
        "",
        "## 4. Checkpoint: validation ELBO per block size and diagonal width",
        "",
        f"Sequence length {ck['length']}; {ck['val_batches']} validation batches x "
        f"{meta['repeats']} noise draws; mean and standard error in bits/byte.",
        "",
        *_md_table(ck["block"]),
        "",
        *_md_table(ck["diagonal"]),
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
        *_md_table(ck["elbo_vs_k"]),
        "",
        "Figure: `elbo_vs_k.png`.",
        "",
        "## 6. ELBO under `autoregressive` = AR NLL (float64)",
        "",
        *_md_table([ck["ar_check"]]),
        "",
    ]
    path = out / "limits.md"
    path.write_text("\n".join(lines))
    return path


def main(argv=None) -> int:
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
        "command": "python experiments/limits.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": what,
        "hardware": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} "
        f"torch threads, torch {torch.__version__}",
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
