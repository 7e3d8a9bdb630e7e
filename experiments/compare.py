"""AR, diffusion and Evo of the same size, on the same data, with the same budget (issue 6, part 2).

Trains the three tiny configs (``experiments/configs/{ar,diffusion,evo}-tiny.yaml``) through the
training CLI (:func:`flowtext.training.cli_main`) with one seed, one corpus and one budget
(``--max-time`` and ``--max-steps``, whichever comes first), or loads finished runs with
``--ckpt-dir DIR`` (``DIR/<name>/lightning_logs/version_*/checkpoints/{final,last}.ckpt``), then
reports for each model:

* **validation bits per byte under every static policy**: ``autoregressive`` (block 1, one jump),
  ``block(B)`` for ``B = 2, 4, ..., L/2`` and ``synchronous`` (one block), each at ``m`` steps
  per block for every ``m`` in ``--eval-m``: the two-stream estimator
  (:func:`flowtext.objectives.two_stream_loss`) averaged over the validation batches and
  ``--repeats`` noise draws. Every model is scored under every policy; the table marks the
  regimes each was trained on.
* **sample quality vs network evaluations (NFE)**: ``--samples`` continuations of ``--gen-len``
  tokens after the first ``--prompt-len`` tokens of validation windows, temperature 1, at several
  step counts per policy. **Quality measure**: the bits per byte of the generated tokens under
  the trained AR model (its exact AR NLL, ``two_stream_loss(..., block_size=1)``), lower is better;
  the same judge's score of the real continuations is printed as a reference. Caveat: the
  judge is one of the contestants (its own samples are typical under it) and rewards repetitive
  text, so the table also gives the fraction of distinct 4-grams (diversity).
* **decoding tokens/s** (generated tokens per second of each setting, batch ``--samples``) and
  **training tokens/s** (from the run's TensorBoard events: clean tokens per second between the
  first and last logged step, periodic validation included).
* **addition** (unless ``--skip-addition``): the three configs retrained on the ``addition`` task
  (``--digits`` digits) with the ``--addition-max-time`` budget; exact-match accuracy of greedy
  answers decoded from the prompt ``a+b=`` on validation problems (``Task.exact_match_ids``).

Every invocation writes ``OUT/<run id>/`` (``compare.md``, CSVs, figures, the config and
hyper-parameters of every run beside its result) and APPENDS its results to ``OUT/results.jsonl``
and ``OUT/results.csv`` (one line per number, with a timestamp); nothing is overwritten.

    python experiments/compare.py                              # full: about an hour on 2 cores
    python experiments/compare.py --ckpt-dir outputs/tiny      # evaluate finished runs
    python experiments/compare.py --quick                      # seconds, tiny sizes
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flowtext.objectives import LN2, two_stream_loss  # noqa: E402
from flowtext.training import TINY_OVERRIDES  # noqa: E402

MODELS = {"ar": "ar-tiny.yaml", "diffusion": "diffusion-tiny.yaml", "evo": "evo-tiny.yaml"}
"""Model name -> config file under ``experiments/configs``."""

PRIMARY = {"ar": "autoregressive", "diffusion": "synchronous K=32", "evo": "adaptive thr=0.9"}
"""Each model's own decoder, declared before any run: the addition goal is read on these."""


@dataclass
class Run:
    """One trained (or loaded) model with its data and provenance."""

    name: str
    lm: object
    dm: object
    tokenizer: object
    run_dir: Path | None
    ckpt: str
    train: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------ train / load
def train_stats(run_dir: Path | None, batch_size: int, seq_len: int) -> dict:
    """Training throughput from a run's TensorBoard events (``loss`` is logged every few steps)."""
    if run_dir is None:
        return {}
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:  # pragma: no cover
        return {}
    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    ea.Reload()
    if "loss" not in ea.Tags().get("scalars", []):
        return {}
    ev = ea.Scalars("loss")
    stats = {"logged_steps": ev[-1].step + 1 if ev else 0}
    if len(ev) >= 2 and ev[-1].wall_time > ev[0].wall_time:
        dt = ev[-1].wall_time - ev[0].wall_time
        stats["train_wall_s"] = dt
        stats["train_tokens_per_s"] = (ev[-1].step - ev[0].step) * batch_size * seq_len / dt
        stats["final_train_loss_bpt"] = ev[-1].value / LN2
    return stats


def _data_module(hp: dict):
    from flowtext.data import FlowTextDataModule

    hp = {k: v for k, v in (hp or {}).items() if not k.startswith("_")}
    dm = FlowTextDataModule(**hp)
    dm.prepare_data()
    dm.setup("validate")
    return dm


def load_run(name: str, ckpt_dir: Path, dest: Path) -> Run:
    """Load ``ckpt_dir/<name>`` (newest version with a checkpoint; ``final`` before ``last``)."""
    from flowtext.checkpoint import load_checkpoint, read_checkpoint

    versions = sorted(
        (ckpt_dir / name).glob("lightning_logs/version_*"),
        key=lambda p: int(p.name.split("_")[-1]),
    )
    found = None
    for vdir in reversed(versions):
        for fname in ("final.ckpt", "last.ckpt"):
            if (vdir / "checkpoints" / fname).is_file():
                found = (vdir, vdir / "checkpoints" / fname)
                break
        if found:
            break
    if found is None:
        raise FileNotFoundError(
            f"no {ckpt_dir}/{name}/lightning_logs/version_*/checkpoints/last.ckpt; train it with "
            f"flowtext fit --config experiments/configs/{MODELS.get(name, name)} "
            f"--trainer.default_root_dir={ckpt_dir}/{name}"
        )
    vdir, ckpt = found
    lm, tok, _ = load_checkpoint(ckpt)
    state = read_checkpoint(ckpt)
    dm = _data_module(state.get("datamodule_hyper_parameters") or {})
    dest.mkdir(parents=True, exist_ok=True)
    for f in ("config.yaml", "hparams.yaml"):
        if (vdir / f).is_file() and (vdir / f).resolve() != (dest / f).resolve():
            shutil.copy(vdir / f, dest / f)
    stats = train_stats(vdir, dm.batch_size, dm.seq_len)
    stats["checkpoint_step"] = int(state.get("global_step", -1))
    stats["params"] = sum(p.numel() for p in lm.parameters())
    return Run(name, lm.eval(), dm, tok, vdir, str(ckpt), stats)


def train_run(name: str, root: Path, extra: list[str], args) -> Run:
    """Train ``name`` through the CLI into ``root`` (config saved there), then load it back."""
    from flowtext.training import cli_main

    argv = [
        "fit",
        "--config",
        str(ROOT / "experiments" / "configs" / MODELS[name]),
        f"--trainer.default_root_dir={root}",
        f"--seed_everything={args.seed}",
        *extra,
    ]
    t0 = time.perf_counter()
    cli = cli_main(argv)
    wall = time.perf_counter() - t0
    vdir = Path(cli.trainer.log_dir)
    cli.trainer.save_checkpoint(vdir / "checkpoints" / "final.ckpt")
    (root / "argv.json").write_text(json.dumps(argv, indent=1))
    run = load_run(name, root.parent, root)
    run.train["fit_wall_s"] = wall
    run.train["global_step"] = cli.trainer.global_step
    if "train_tokens_per_s" not in run.train:  # too few logged steps: use the whole fit
        dm = cli.datamodule
        run.train["train_tokens_per_s"] = (
            cli.trainer.global_step * dm.batch_size * dm.seq_len / wall
        )
        run.train["train_wall_s"] = wall
    return run


# ---------------------------------------------------------------------------------- evaluation
def _val_batches(dm, n: int) -> list[torch.Tensor]:
    out = []
    for batch in dm.val_dataloader():
        out.append(batch["tokens"] if isinstance(batch, dict) else batch)
        if len(out) >= n:
            break
    return out


def static_policies(length: int) -> list[tuple[str, int]]:
    """(label, block size) from AR to synchronous."""
    sizes = [2**i for i in range(1, int(math.log2(length)) + 1) if 2**i < length]
    return [("autoregressive", 1), *[(f"block({b})", b) for b in sizes], ("synchronous", length)]


def _trained_sizes(lm, length: int) -> set[int]:
    sizes = {length if b == 0 else min(b, length) for b in lm.train_block_sizes}
    return sizes if lm.single_stream_fraction < 1 else set()


@torch.no_grad()
def eval_bpb(run: Run, batches, ms: list[int], repeats: int, seed: int) -> list[dict]:
    """Validation bits per byte under every static policy and steps-per-block ``m``."""
    lm, bpt = run.lm, float(run.dm.bytes_per_token)
    length = batches[0].shape[1]
    trained = _trained_sizes(lm, length)
    rows = []
    for label, b in static_policies(length):
        for m in [1] if b == 1 else ms:
            gen = torch.Generator().manual_seed(seed)
            vals = torch.tensor(
                [
                    float(
                        two_stream_loss(
                            lm.net,
                            tok,
                            lm.schedule,
                            block_size=b,
                            steps_per_block=m,
                            t_min=lm.t_min if m > 1 else None,
                            generator=gen,
                        ).nats.mean()
                    )
                    for _ in range(repeats)
                    for tok in batches
                ],
                dtype=torch.float64,
            )
            se = float(vals.std() / math.sqrt(len(vals))) if len(vals) > 1 else float("nan")
            rows.append(
                {
                    "model": run.name,
                    "policy": label,
                    "block_size": b,
                    "steps_per_block": m,
                    "bpb": float(vals.mean()) / LN2 / bpt,
                    "stderr": se / LN2 / bpt,
                    "trained_regime": b in trained,
                }
            )
    return rows


def decode_settings(name: str, gen_len: int, quick: bool) -> list[tuple[str, dict]]:
    """(label, generate kwargs) per model: each model under the policies it was trained for."""
    ks = [4, 8] if quick else [8, 16, 32, 64, 128]
    sync = [(f"synchronous K={k}", {"policy": "synchronous", "steps": k}) for k in ks]
    if name == "ar":
        return [("autoregressive", {"policy": "autoregressive"})]
    if name == "diffusion":
        return sync
    n8 = max(1, gen_len // 8)
    blocks = [
        (f"block(8) K={n8 * j}", {"policy": "block", "policy_kwargs": {"size": 8}, "steps": n8 * j})
        for j in ((1, 2) if quick else (1, 2, 4, 8))
    ]
    diag = [
        (
            f"diagonal(0.25) K={k}",
            {"policy": "diagonal", "policy_kwargs": {"width": 0.25}, "steps": k},
        )
        for k in ((gen_len,) if quick else (gen_len // 2, gen_len, 2 * gen_len))
    ]
    adaptive = [
        ("adaptive thr=0.9", {"policy": "adaptive", "policy_kwargs": {"threshold": 0.9}}),
        (
            "adaptive thr=0.7 rate=1",
            {"policy": "adaptive", "policy_kwargs": {"threshold": 0.7, "rate": 1.0}},
        ),
        (
            "adaptive thr=0.9 K=L/2",
            {"policy": "adaptive", "policy_kwargs": {"threshold": 0.9}, "steps": gen_len // 2},
        ),
        (
            "adaptive thr=0.5 rate=1 w=32 K=L/4",
            {
                "policy": "adaptive",
                "policy_kwargs": {"threshold": 0.5, "rate": 1.0, "window": 32},
                "steps": max(1, gen_len // 4),
            },
        ),
    ]
    return [("autoregressive", {"policy": "autoregressive"}), *blocks, *diag, *sync, *adaptive]


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() or c == " " else "·" for c in text.replace("\n", "⏎"))


def _distinct4(rows: list[list[int]]) -> float:
    grams = [tuple(r[i : i + 4]) for r in rows for i in range(len(r) - 3)]
    return len(set(grams)) / max(1, len(grams))


@torch.no_grad()
def judge_bpb(judge: Run, seqs: torch.Tensor, prompt_len: int) -> float:
    """Bits per byte of ``seqs[:, prompt_len:]`` under the judge's exact AR NLL."""
    nats = two_stream_loss(judge.lm.net, seqs, judge.lm.schedule, block_size=1).nats
    return float(nats[:, prompt_len:].mean()) / LN2 / float(judge.dm.bytes_per_token)


@torch.no_grad()
def eval_samples(run: Run, judge: Run, windows: torch.Tensor, args) -> list[dict]:
    """Sample quality, NFE and decoding speed of every decode setting of ``run``."""
    p, g = args.prompt_len, args.gen_len
    prompts = windows[:, :p]
    rows = []
    run.lm.generate(prompt=prompts[:1], length=min(g, 4))  # warm-up (one-time costs)
    for label, kw in decode_settings(run.name, g, args.quick):
        res = run.lm.generate(
            prompt=prompts,
            length=g,
            temperature=1.0,
            generator=torch.Generator().manual_seed(args.seed),
            **kw,
        )
        ids, _ = res.padded(0)
        seqs = torch.cat([prompts, ids], 1)
        s = res.stats
        rows.append(
            {
                "model": run.name,
                "policy": label,
                "nfe": s.nfe,
                "tokens_per_nfe": s.tokens_per_eval,
                "decode_tokens_per_s": s.tokens_per_second,
                "judge_bpb": judge_bpb(judge, seqs, p),
                "distinct4": _distinct4(ids.tolist()),
                "sample": _printable(run.tokenizer.decode(ids[0].tolist()))[:80],
            }
        )
    return rows


def pareto(points: list[tuple[float, float]], others: list[tuple[float, float]]) -> list[bool]:
    """For each ``(nfe, bpb)`` in ``points``: not dominated by any point of ``others``."""
    out = []
    for x, y in points:
        dominated = any((ox <= x and oy <= y) and (ox < x or oy < y) for ox, oy in others)
        out.append(not dominated)
    return out


@torch.no_grad()
def eval_addition(run: Run, n: int, quick: bool) -> list[dict]:
    """Greedy exact-match accuracy on ``n`` validation problems, per decode setting."""
    task, tok, dm = run.dm.source, run.tokenizer, run.dm
    exs = [task.example("val", i, seed=dm.seed) for i in range(n)]
    prompts = [tok.encode(ex.prompt) for ex in exs]
    length = dm.seq_len - max(len(x) for x in prompts)
    ks = (length,) if quick else (length, 32)
    settings = {
        "ar": [("autoregressive", {"policy": "autoregressive"})],
        "diffusion": [(f"synchronous K={k}", {"policy": "synchronous", "steps": k}) for k in ks],
        "evo": [
            ("autoregressive", {"policy": "autoregressive"}),
            *[(f"synchronous K={k}", {"policy": "synchronous", "steps": k}) for k in ks],
            ("adaptive thr=0.9", {"policy": "adaptive", "policy_kwargs": {"threshold": 0.9}}),
        ],
    }[run.name]
    rows = []
    for label, kw in settings:
        res = run.lm.generate(prompt=prompts, length=length, greedy=True, eos_id=tok.eos_id, **kw)
        hits = [task.exact_match_ids(res.tokens[i], ex, tok) for i, ex in enumerate(exs)]
        rows.append(
            {
                "model": run.name,
                "policy": label,
                "primary": label == PRIMARY[run.name]
                or (run.name == "diffusion" and label.startswith("synchronous") and quick),
                "exact_match": sum(hits) / len(hits),
                "problems": len(hits),
                "nfe": res.stats.nfe,
                "example": _printable(f"{exs[0].prompt}{tok.decode(res.tokens[0])}"),
            }
        )
    return rows


# ---------------------------------------------------------------------------------- reporting
def _fmt(x) -> str:
    if isinstance(x, bool):
        return "yes" if x else ""
    if isinstance(x, float):
        if math.isnan(x):
            return "-"
        return f"{x:.3e}" if (x != 0 and abs(x) < 1e-3) or abs(x) >= 1e5 else f"{x:.3f}"
    return str(x).replace("|", "\\|").replace("\n", "\\n")


def md_table(rows: list[dict], cols: list[str]) -> list[str]:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return out


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def append_log(out: Path, run_id: str, stamp: str, section: str, rows: list[dict], keys) -> None:
    """Append ``rows`` to ``out/results.jsonl`` and (one line per number) ``out/results.csv``."""
    with open(out / "results.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps({"timestamp": stamp, "run_id": run_id, "section": section, **r}))
            f.write("\n")
    new = not (out / "results.csv").exists()
    with open(out / "results.csv", "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["timestamp", "run_id", "section", "model", "setting", "metric", "value"])
        for r in rows:
            setting = r.get("policy", "")
            if "steps_per_block" in r:
                setting = f"{setting} m={r['steps_per_block']}"
            for k in keys:
                if k in r:
                    w.writerow([stamp, run_id, section, r["model"], setting, k, r[k]])


def plot_quality(rows: list[dict], ref: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    families: dict[str, list[dict]] = {}
    for r in rows:
        fam = r["policy"].split(" K=")[0]
        families.setdefault(f"{r['model']}: {fam}", []).append(r)
    for label, rs in families.items():
        rs = sorted(rs, key=lambda r: r["nfe"])
        ax.plot([r["nfe"] for r in rs], [r["judge_bpb"] for r in rs], "o-", label=label)
    ax.axhline(ref, linestyle="--", color="gray", linewidth=1, label="real text")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("network evaluations (NFE)")
    ax.set_ylabel("judge (AR model) bits/byte of samples")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_bpb(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for model in MODELS:
        best: dict[int, float] = {}
        for r in rows:
            if r["model"] == model:
                best[r["block_size"]] = min(best.get(r["block_size"], math.inf), r["bpb"])
        if best:
            xs = sorted(best)
            ax.plot(xs, [best[x] for x in xs], "o-", label=model)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("block size B of the evaluated policy (1 = AR, L = synchronous)")
    ax.set_ylabel("validation bits/byte (best m)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def goals(bpb: list[dict], samples: list[dict], addition: list[dict]) -> list[dict]:
    """The issue's goals, each with its numbers and met / missed."""
    out = []

    def best(model):
        rs = [r for r in bpb if r["model"] == model]
        return min(rs, key=lambda r: r["bpb"]) if rs else None

    ar = next((r for r in bpb if r["model"] == "ar" and r["block_size"] == 1), None)
    evo, dif = best("evo"), best("diffusion")
    if ar and evo:
        rel = evo["bpb"] / ar["bpb"] - 1
        out.append(
            {
                "goal": "Evo best static policy within 5% of AR bpb",
                "numbers": f"Evo {evo['bpb']:.3f} ({evo['policy']} m={evo['steps_per_block']}) "
                f"vs AR {ar['bpb']:.3f}: {100 * rel:+.1f}%",
                "met": rel <= 0.05,
            }
        )
    if ar and dif:
        rel = dif["bpb"] / ar["bpb"] - 1
        out.append(
            {
                "goal": "diffusion at least 10% behind AR bpb",
                "numbers": f"diffusion {dif['bpb']:.3f} ({dif['policy']} "
                f"m={dif['steps_per_block']}) vs AR {ar['bpb']:.3f}: {100 * rel:+.1f}%",
                "met": rel >= 0.10,
            }
        )
    ev = [r for r in samples if r["model"] == "evo"]
    base = [(r["nfe"], r["judge_bpb"]) for r in samples if r["model"] != "evo"]
    if ev and base:
        front = pareto([(r["nfe"], r["judge_bpb"]) for r in ev], base)
        on = [r["policy"] for r, f in zip(ev, front) if f]
        out.append(
            {
                "goal": "Evo on the Pareto front (judge bpb vs NFE) against AR and diffusion",
                "numbers": f"{len(on)}/{len(ev)} Evo settings undominated"
                + (f": {', '.join(on)}" if on else ""),
                "met": bool(on),
            }
        )
    if addition:
        prim = {r["model"]: r for r in addition if r["primary"]}
        bestacc = {}
        for r in addition:
            bestacc[r["model"]] = max(bestacc.get(r["model"], -1.0), r["exact_match"])
        if "ar" in prim:
            a = prim["ar"]["exact_match"]
            e = prim.get("evo", {}).get("exact_match", -1)
            d = prim.get("diffusion", {}).get("exact_match", -1)
            out.append(
                {
                    "goal": "Evo or diffusion beats AR on addition (exact match, own decoders)",
                    "numbers": f"AR {a:.3f}, Evo {e:.3f}, diffusion {d:.3f} (best over all "
                    f"decoders: Evo {bestacc.get('evo', -1):.3f}, diffusion "
                    f"{bestacc.get('diffusion', -1):.3f})",
                    "met": max(e, d) > a,
                }
            )
    return out


# ---------------------------------------------------------------------------------------- main
def parse(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="outputs/compare")
    p.add_argument(
        "--ckpt-dir", default=None, help="load DIR/{ar,diffusion,evo} instead of training"
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes, a few steps (the tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-time", default="00:00:15:00", help="training budget per model")
    p.add_argument("--max-steps", type=int, default=2000, help="step cap per model")
    p.add_argument("--skip-addition", action="store_true")
    p.add_argument("--skip-lm", action="store_true", help="only the addition task")
    p.add_argument("--addition-ckpt-dir", default=None, help="load addition runs instead")
    p.add_argument("--addition-max-time", default="00:00:05:00")
    p.add_argument(
        "--addition-batch-size",
        type=int,
        default=128,
        help="addition batch (128 x 14 tokens is about the LM runs' 16 x 128 tokens per batch)",
    )
    p.add_argument("--addition-max-steps", type=int, default=100000)
    p.add_argument("--digits", type=int, default=3)
    p.add_argument("--addition-problems", type=int, default=256)
    p.add_argument("--eval-m", default="16,64", help="steps per block of the bpb table")
    p.add_argument("--val-batches", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2, help="noise draws per validation batch")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.quick:
        args.max_steps, args.addition_max_steps = min(args.max_steps, 3), 3
        args.eval_m, args.val_batches, args.repeats = "4", 2, 1
        args.samples, args.prompt_len, args.gen_len = 4, 8, 16
        args.addition_problems = min(args.addition_problems, 16)
    args.eval_m = [int(m) for m in args.eval_m.split(",")]
    return args


def main(argv=None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    now = datetime.now(timezone.utc)
    stamp = now.isoformat(timespec="seconds")
    run_id = now.strftime("%Y%m%dT%H%M%SZ") + ("-quick" if args.quick else "")
    out = Path(args.out)
    dest = out / run_id
    while dest.exists():  # never overwrite a previous invocation
        run_id += "x"
        dest = out / run_id
    dest.mkdir(parents=True)
    budget = [
        f"--trainer.max_time={args.max_time}",
        f"--trainer.max_steps={args.max_steps}",
        *(
            TINY_OVERRIDES + [f"--trainer.val_check_interval={args.max_steps}"]
            if args.quick
            else []
        ),
    ]

    # ---- the default corpus
    runs: dict[str, Run] = {}
    train_rows, bpb, samples, batches, ref = [], [], [], [], math.nan
    for name in [] if args.skip_lm else MODELS:
        if args.ckpt_dir:
            runs[name] = load_run(name, Path(args.ckpt_dir), dest / "lm" / name)
        else:
            runs[name] = train_run(name, dest / "lm" / name, budget, args)
        print(f"[compare] {name} ready ({time.perf_counter() - t0:.0f} s)", flush=True)
    if runs:
        train_rows = [{"model": n, "source": r.ckpt, **r.train} for n, r in runs.items()]
        batches = _val_batches(runs["evo"].dm, args.val_batches)
        bpb = [
            row
            for r in runs.values()
            for row in eval_bpb(r, batches, args.eval_m, args.repeats, args.seed)
        ]
        print(f"[compare] bpb table ({time.perf_counter() - t0:.0f} s)", flush=True)
        windows = torch.cat(batches)[: args.samples, : args.prompt_len + args.gen_len]
        judge = runs["ar"]
        ref = judge_bpb(judge, windows, args.prompt_len)
        samples = [row for r in runs.values() for row in eval_samples(r, judge, windows, args)]
        print(f"[compare] samples ({time.perf_counter() - t0:.0f} s)", flush=True)

    # ---- the addition task
    addition, add_train = [], []
    if not args.skip_addition:
        extra = [
            "--data.corpus=addition",
            f'--data.corpus_options={{"digits": {args.digits}}}',
            f"--data.seq_len={3 * args.digits + 4 + 1}",
            f"--data.eval_samples={min(128, args.addition_problems)}",
            f"--data.batch_size={args.addition_batch_size}",
            f"--trainer.max_time={args.addition_max_time}",
            f"--trainer.max_steps={args.addition_max_steps}",
            *(TINY_OVERRIDES + ["--trainer.val_check_interval=3"] if args.quick else []),
        ]
        if args.quick:  # TINY_OVERRIDES sets seq_len 32: the task's own length comes last
            extra.append(f"--data.seq_len={3 * args.digits + 4 + 1}")
        for name in MODELS:
            if args.addition_ckpt_dir:
                r = load_run(name, Path(args.addition_ckpt_dir), dest / "addition" / name)
            else:
                r = train_run(name, dest / "addition" / name, extra, args)
            addition += eval_addition(r, args.addition_problems, args.quick)
            add_train.append({"model": name, "source": r.ckpt, **r.train})
            print(f"[compare] addition {name} ({time.perf_counter() - t0:.0f} s)", flush=True)

    gl = goals(bpb, samples, addition)
    wall = time.perf_counter() - t0

    # ---- write
    write_csv(dest / "bpb.csv", bpb)
    write_csv(dest / "samples.csv", samples)
    write_csv(
        dest / "train.csv",
        train_rows + [{**r, "model": "addition/" + r["model"]} for r in add_train],
    )
    write_csv(dest / "addition.csv", addition)
    write_csv(dest / "goals.csv", gl)
    if bpb:
        plot_bpb(bpb, dest / "bpb_by_policy.png", "validation bits/byte per static policy")
        plot_quality(samples, ref, dest / "quality_vs_nfe.png", "sample quality vs NFE")
    for section, rows, keys in (
        ("train", train_rows, ["train_tokens_per_s", "train_wall_s", "checkpoint_step"]),
        ("bpb", bpb, ["bpb", "stderr"]),
        ("samples", samples, ["nfe", "judge_bpb", "distinct4", "decode_tokens_per_s"]),
        ("addition", addition, ["exact_match", "nfe"]),
        ("addition_train", add_train, ["train_tokens_per_s", "checkpoint_step"]),
    ):
        append_log(out, run_id, stamp, section, rows, keys)
    with open(out / "results.jsonl", "a") as f:
        f.write(
            json.dumps(
                {
                    "timestamp": stamp,
                    "run_id": run_id,
                    "section": "goals",
                    "goals": gl,
                    "argv": sys.argv[1:] if argv is None else list(argv),
                }
            )
            + "\n"
        )

    best = {}
    for r in bpb:
        if r["model"] not in best or r["bpb"] < best[r["model"]]["bpb"]:
            best[r["model"]] = r
    pivot = []
    for label, b in static_policies(batches[0].shape[1]) if batches else []:
        for m in [1] if b == 1 else args.eval_m:
            row = {"policy": label, "m": m, "trained": []}
            for r in bpb:
                if r["block_size"] == b and r["steps_per_block"] == m:
                    row[r["model"]] = r["bpb"]
                    if r["trained_regime"]:
                        row["trained"].append(r["model"])
            row["trained"] = ", ".join(row["trained"])
            pivot.append(row)
    cmd = "python experiments/compare.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        f"# AR vs diffusion vs Evo ({run_id})",
        "",
        f"command: `{cmd}`  ",
        f"hardware: {platform.machine()}, {torch.get_num_threads()} torch thread(s), torch "
        f"{torch.__version__}; wall time {wall:.0f} s",
        "",
        "## Goals",
        "",
        *md_table(gl, ["goal", "numbers", "met"]),
        "",
        "## Training runs",
        "",
        *md_table(
            train_rows + [{**r, "model": "addition/" + r["model"]} for r in add_train],
            ["model", "checkpoint_step", "params", "train_tokens_per_s", "train_wall_s", "source"],
        ),
        "",
        "## Validation bits/byte per static policy",
        "",
        "Two-stream ELBO estimator, "
        f"{len(batches)} validation batches x {args.repeats} noise draws; `m` = steps per block; "
        "'trained' lists the models trained on that block size (at their own m).",
        "",
        *md_table(
            pivot,
            ["policy", "m", "ar", "diffusion", "evo", "trained"],
        ),
        "",
        "Best static policy per model: "
        + "; ".join(
            f"{k} {v['bpb']:.3f} ({v['policy']}, m={v['steps_per_block']})" for k, v in best.items()
        ),
        "",
        "## Sample quality vs network evaluations",
        "",
        f"{args.samples} samples of {args.gen_len} tokens after {args.prompt_len}-token validation "
        "prompts, temperature 1. judge_bpb: bits/byte of the generated tokens under the AR "
        f"model's exact NLL (real continuations: {ref:.3f}). distinct4: distinct 4-gram fraction.",
        "",
        *md_table(
            samples,
            [
                "model",
                "policy",
                "nfe",
                "tokens_per_nfe",
                "decode_tokens_per_s",
                "judge_bpb",
                "distinct4",
                "sample",
            ],
        ),
        "",
    ]
    if addition:
        lines += [
            "## Addition (exact match, greedy)",
            "",
            f"{args.digits}-digit addition, {args.addition_problems} validation problems, prompt "
            "`a+b=`; primary = each model's own decoder, declared before the runs.",
            "",
            *md_table(addition, ["model", "policy", "primary", "exact_match", "nfe", "example"]),
            "",
        ]
    lines += ["Figures: `bpb_by_policy.png`, `quality_vs_nfe.png`.", ""]
    (dest / "compare.md").write_text("\n".join(lines))
    (dest / "summary.json").write_text(
        json.dumps(
            {
                "run_id": run_id,
                "train": train_rows,
                "bpb": bpb,
                "samples": samples,
                "addition": addition,
                "addition_train": add_train,
                "goals": gl,
                "wall_s": wall,
            },
            indent=1,
            default=str,
        )
    )
    print("\n".join(lines))
    print(f"written to {dest}; appended to {out / 'results.jsonl'} and {out / 'results.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
