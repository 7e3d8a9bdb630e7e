"""AR, diffusion and Evo of the same size, on the same data, with the same budget (issue 6, part 2).

Trains the three tiny configs (``experiments/configs/{ar,diffusion,evo}-tiny.yaml``) through the
training CLI (:func:`flowtext.training.cli_main`) with one seed, one corpus and one budget
(``--max-time`` and ``--max-steps``, whichever comes first), or loads finished runs with
``--ckpt-dir DIR`` (``DIR/<name>/lightning_logs/version_*/checkpoints/{final,last}.ckpt``), then
reports for each model:

* **validation bits per byte under every static policy**: ``autoregressive`` (block 1, one jump),
  ``block(B)`` for ``B = 2, 4, ..., L/2`` and ``synchronous`` (one block), each at ``m`` steps
  per block for every ``m`` in ``--eval-m``: the two-stream estimator
  (:meth:`flowtext.lm.FlowLM.policy_bound`) averaged over the validation batches and
  ``--repeats`` noise draws. Every model is scored under every policy; the table marks the
  regimes each was trained on.
* **sample quality vs network evaluations (NFE)**: ``--samples`` continuations of ``--gen-len``
  tokens after the first ``--prompt-len`` tokens of validation windows, temperature 1, at several
  step counts per policy. **Quality measure**: the bits per byte of the generated tokens under
  the trained AR model (its exact AR NLL, ``policy_bound(..., "autoregressive", L)``), lower is
  better; the same judge's score of the real continuations is printed as a reference. Caveat: the
  judge is one of the contestants (its own samples are typical under it) and rewards repetitive
  text, so the table also gives the fraction of distinct 4-grams (diversity).
* **decoding tokens/s** (generated tokens per second of each setting, batch ``--samples``) and
  **training tokens/s** (from the run's TensorBoard events: clean tokens per second between the
  first and last logged step, periodic validation included).
* **addition** (unless ``--skip-addition``): the three configs retrained on the ``addition`` task
  (``--digits`` digits) with the ``--addition-max-time`` budget; exact-match accuracy of greedy
  answers decoded from the prompt ``a+b=`` on validation problems (``Task.exact_match_ids``).
  Each model's own (primary) decoder is declared in :func:`addition_decoders` before any run;
  the addition goal is read on those, and a model without exactly one is an error.

Every invocation writes ``OUT/<run id>/`` (``compare.md``, CSVs, figures, the config and
hyper-parameters of every run beside its result) and APPENDS its results to ``OUT/results.jsonl``
and ``OUT/results.csv`` (one line per number, with a timestamp); nothing is overwritten.

    python -m experiments.compare                              # full: about an hour on 2 cores
    python -m experiments.compare --ckpt-dir outputs/tiny      # evaluate finished runs
    python -m experiments.compare --quick                      # seconds, tiny sizes
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from experiments.common import (
    bound_bpb,
    datamodule,
    fit_config,
    hardware,
    md_table,
    val_batches,
    write_csv,
)
from flowtext.objectives import LN2
from flowtext.regime import block_bound
from flowtext.training import TINY_OVERRIDES

MODELS = {"ar": "ar-tiny.yaml", "diffusion": "diffusion-tiny.yaml", "evo": "evo-tiny.yaml"}
"""Model name -> config file under ``experiments/configs``."""


@dataclass(frozen=True)
class Decoder:
    """One decoding setting of :func:`flowtext.decoding.generate`.

    Attributes:
        label: Name in the tables (unique per model).
        policy: Policy name.
        steps: Global steps ``K`` (``None``: the policy's default).
        options: Policy arguments as ``(name, value)`` pairs.
        primary: The model's own decoder, on which the addition goal is read.
    """

    label: str
    policy: str
    steps: int | None = None
    options: tuple[tuple[str, float], ...] = ()
    primary: bool = False

    def kwargs(self) -> dict:
        """Keyword arguments of ``generate``."""
        kw: dict = {"policy": self.policy}
        if self.options:
            kw["policy_kwargs"] = dict(self.options)
        if self.steps is not None:
            kw["steps"] = self.steps
        return kw


def _ar(primary: bool = False) -> Decoder:
    return Decoder("autoregressive", "autoregressive", primary=primary)


def _sync(k: int, primary: bool = False) -> Decoder:
    return Decoder(f"synchronous K={k}", "synchronous", k, primary=primary)


def _adaptive(label: str, steps: int | None = None, primary: bool = False, **opts) -> Decoder:
    return Decoder(label, "adaptive", steps, tuple(opts.items()), primary)


def _speculative(draft: int = 4) -> Decoder:
    """Self-speculative decoding: the AR decoder's law, drafts from a ``block(draft)`` state."""
    return Decoder(f"speculative draft={draft}", "speculative", None, (("draft", draft),))


def primary_decoder(model: str, decoders: list[Decoder]) -> Decoder:
    """The one decoder of ``model`` marked primary; anything else is an error."""
    found = [d for d in decoders if d.primary]
    if len(found) != 1:
        raise ValueError(
            f"{model} must declare exactly one primary decoder, found {len(found)} among "
            f"{[d.label for d in decoders]}"
        )
    return found[0]


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


def find_checkpoint(name: str, ckpt_dir: Path) -> tuple[Path, Path]:
    """``(version dir, checkpoint)``: the newest version with ``final.ckpt`` or ``last.ckpt``."""
    versions = sorted(
        (ckpt_dir / name).glob("lightning_logs/version_*"),
        key=lambda p: int(p.name.split("_")[-1]),
    )
    for vdir in reversed(versions):
        for fname in ("final.ckpt", "last.ckpt"):
            if (vdir / "checkpoints" / fname).is_file():
                return vdir, vdir / "checkpoints" / fname
    raise FileNotFoundError(
        f"no {ckpt_dir}/{name}/lightning_logs/version_*/checkpoints/last.ckpt; train it with "
        f"flowtext fit --config experiments/configs/{MODELS.get(name, name)} "
        f"--trainer.default_root_dir={ckpt_dir}/{name}"
    )


def load_run(name: str, ckpt_dir: Path, dest: Path) -> Run:
    """Load ``ckpt_dir/<name>`` and copy its config beside the results in ``dest``."""
    from flowtext.checkpoint import load_checkpoint, read_checkpoint

    vdir, ckpt = find_checkpoint(name, ckpt_dir)
    lm, tok, _ = load_checkpoint(ckpt)
    state = read_checkpoint(ckpt)
    dm = datamodule(state.get("datamodule_hyper_parameters"))
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
    t0 = time.perf_counter()
    cli, argv = fit_config(MODELS[name], root, [f"--seed_everything={args.seed}", *extra])
    wall = time.perf_counter() - t0
    vdir = Path(cli.trainer.log_dir)
    cli.trainer.save_checkpoint(vdir / "checkpoints" / "final.ckpt", weights_only=False)
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
def static_policies(length: int) -> list[tuple[str, int]]:
    """(label, block size) from AR to synchronous."""
    sizes = [2**i for i in range(1, int(math.log2(length)) + 1) if 2**i < length]
    return [("autoregressive", 1), *[(f"block({b})", b) for b in sizes], ("synchronous", length)]


def _trained_sizes(lm, length: int) -> set[int]:
    regime = lm.regime
    sizes = {length if b == 0 else min(b, length) for b in regime.block_sizes}
    return sizes if regime.single_stream_fraction < 1 else set()


def eval_bpb(run: Run, batches, ms: list[int], repeats: int, seed: int) -> list[dict]:
    """Validation bits per byte under every static policy and steps-per-block ``m``."""
    length = batches[0].shape[1]
    trained = _trained_sizes(run.lm, length)
    rows = []
    for label, b in static_policies(length):
        for m in [1] if b == 1 else ms:
            bound = block_bound(b, m, length)
            bpb, se = bound_bpb(
                run.lm,
                batches,
                bound.policy,
                bound.steps,
                bytes_per_token=float(run.dm.bytes_per_token),
                repeats=repeats,
                generator=torch.Generator().manual_seed(seed),
            )
            rows.append(
                {
                    "model": run.name,
                    "policy": label,
                    "block_size": b,
                    "steps_per_block": m,
                    "bpb": bpb,
                    "stderr": se,
                    "trained_regime": b in trained,
                }
            )
    return rows


def decode_settings(name: str, gen_len: int, quick: bool) -> list[Decoder]:
    """Each model's decoders for the samples: the policies it was trained for."""
    sync = [_sync(k) for k in ([4, 8] if quick else [8, 16, 32, 64, 128])]
    if name == "ar":
        return [_ar()]
    if name == "diffusion":
        return sync
    n8 = max(1, gen_len // 8)
    blocks = [
        Decoder(f"block(8) K={n8 * j}", "block", n8 * j, (("size", 8),))
        for j in ((1, 2) if quick else (1, 2, 4, 8))
    ]
    diag = [
        Decoder(f"diagonal(0.25) K={k}", "diagonal", k, (("width", 0.25),))
        for k in ((gen_len,) if quick else (gen_len // 2, gen_len, 2 * gen_len))
    ]
    adaptive = [
        _adaptive("adaptive thr=0.9", threshold=0.9),
        _adaptive("adaptive thr=0.7 rate=1", threshold=0.7, rate=1.0),
        _adaptive("adaptive thr=0.9 K=L/2", gen_len // 2, threshold=0.9),
        _adaptive(
            "adaptive thr=0.5 rate=1 w=32 K=L/4",
            max(1, gen_len // 4),
            threshold=0.5,
            rate=1.0,
            window=32,
        ),
    ]
    return [_ar(), *blocks, *diag, *sync, *adaptive, _speculative()]


def addition_decoders(name: str, length: int, quick: bool) -> list[Decoder]:
    """Each model's addition decoders, its primary one marked (declared before any run)."""
    ks = list(dict.fromkeys((length,) if quick else (length, 32)))
    if name == "ar":
        return [_ar(primary=True)]
    if name == "diffusion":
        return [_sync(k, primary=k == ks[-1]) for k in ks]
    adaptive = _adaptive("adaptive thr=0.9", primary=True, threshold=0.9)
    return [_ar(), *[_sync(k) for k in ks], adaptive, _speculative()]


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() or c == " " else "·" for c in text.replace("\n", "⏎"))


def _distinct4(rows: list[list[int]]) -> float:
    grams = [tuple(r[i : i + 4]) for r in rows for i in range(len(r) - 3)]
    return len(set(grams)) / max(1, len(grams))


@torch.no_grad()
def judge_bpb(judge: Run, seqs: torch.Tensor, prompt_len: int) -> float:
    """Bits per byte of ``seqs[:, prompt_len:]`` under the judge's exact AR NLL."""
    # the AR bound does not depend on the noise, but its draws advance the global generator,
    # which the (unseeded) addition decoding reads after: keep drawing from it
    gen = torch.default_generator
    nats = judge.lm.policy_bound(seqs, "autoregressive", seqs.shape[1], generator=gen).nats
    return float(nats[:, prompt_len:].mean()) / LN2 / float(judge.dm.bytes_per_token)


@torch.no_grad()
def eval_samples(run: Run, judge: Run, windows: torch.Tensor, args) -> list[dict]:
    """Sample quality, NFE and decoding speed of every decode setting of ``run``."""
    p, g = args.prompt_len, args.gen_len
    prompts = windows[:, :p]
    rows = []
    run.lm.generate(prompt=prompts[:1], length=min(g, 4))  # warm-up (one-time costs)
    for dec in decode_settings(run.name, g, args.quick):
        res = run.lm.generate(
            prompt=prompts,
            length=g,
            temperature=1.0,
            generator=torch.Generator().manual_seed(args.seed),
            **dec.kwargs(),
            **_solver(args.solver),
        )
        ids, _ = res.padded(0)
        seqs = torch.cat([prompts, ids], 1)
        s = res.stats
        rows.append(
            {
                "model": run.name,
                "policy": dec.label,
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
def eval_addition(run: Run, n: int, quick: bool, solver: str | None = None) -> list[dict]:
    """Greedy exact-match accuracy on ``n`` validation problems, per decode setting.

    ``solver``: every decoder's solver (``None``: ``generate``'s default).
    """
    task, tok, dm = run.dm.source, run.tokenizer, run.dm
    exs = [task.example("val", i, seed=dm.seed) for i in range(n)]
    prompts = [tok.encode(ex.prompt) for ex in exs]
    length = dm.seq_len - max(len(x) for x in prompts)
    decoders = addition_decoders(run.name, length, quick)
    primary_decoder(run.name, decoders)
    rows = []
    for dec in decoders:
        res = run.lm.generate(
            prompt=prompts,
            length=length,
            greedy=True,
            eos_id=tok.eos_id,
            **dec.kwargs(),
            **_solver(solver),
        )
        hits = [task.exact_match_ids(res.tokens[i], ex, tok) for i, ex in enumerate(exs)]
        rows.append(
            {
                "model": run.name,
                "policy": dec.label,
                "primary": dec.primary,
                "exact_match": sum(hits) / len(hits),
                "problems": len(hits),
                "nfe": res.stats.nfe,
                "example": _printable(f"{exs[0].prompt}{tok.decode(res.tokens[0])}"),
            }
        )
    return rows


def _solver(name: str | None) -> dict:
    return {} if name is None else {"solver": name}


# ---------------------------------------------------------------------------------- reporting
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


def _axes(title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    return plt, fig, ax


def plot_quality(rows: list[dict], ref: float, path: Path, title: str) -> None:
    plt, fig, ax = _axes(title)
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
    ax.legend(fontsize=7, ncol=2)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_bpb(rows: list[dict], path: Path, title: str) -> None:
    plt, fig, ax = _axes(title)
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
    ax.legend()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _best(bpb: list[dict], model: str) -> dict | None:
    rs = [r for r in bpb if r["model"] == model]
    return min(rs, key=lambda r: r["bpb"]) if rs else None


def _bpb_goals(bpb: list[dict]) -> list[dict]:
    ar = next((r for r in bpb if r["model"] == "ar" and r["block_size"] == 1), None)
    out = []
    for model, goal, met in (
        ("evo", "Evo best static policy within 5% of AR bpb", lambda rel: rel <= 0.05),
        ("diffusion", "diffusion at least 10% behind AR bpb", lambda rel: rel >= 0.10),
    ):
        best = _best(bpb, model)
        if ar and best:
            rel = best["bpb"] / ar["bpb"] - 1
            name = "Evo" if model == "evo" else model
            out.append(
                {
                    "goal": goal,
                    "numbers": f"{name} {best['bpb']:.3f} ({best['policy']} "
                    f"m={best['steps_per_block']}) vs AR {ar['bpb']:.3f}: {100 * rel:+.1f}%",
                    "met": met(rel),
                }
            )
    return out


def _pareto_goal(samples: list[dict]) -> list[dict]:
    ev = [r for r in samples if r["model"] == "evo"]
    base = [(r["nfe"], r["judge_bpb"]) for r in samples if r["model"] != "evo"]
    if not (ev and base):
        return []
    front = pareto([(r["nfe"], r["judge_bpb"]) for r in ev], base)
    on = [r["policy"] for r, f in zip(ev, front) if f]
    return [
        {
            "goal": "Evo on the Pareto front (judge bpb vs NFE) against AR and diffusion",
            "numbers": f"{len(on)}/{len(ev)} Evo settings undominated"
            + (f": {', '.join(on)}" if on else ""),
            "met": bool(on),
        }
    ]


def _addition_goal(addition: list[dict]) -> list[dict]:
    if not addition:
        return []
    prim = {r["model"]: r["exact_match"] for r in addition if r["primary"]}
    missing = [m for m in MODELS if m not in prim]
    if missing:
        raise ValueError(f"no primary-decoder result for {missing}: see addition_decoders")
    best = {m: max(r["exact_match"] for r in addition if r["model"] == m) for m in MODELS}
    a, e, d = prim["ar"], prim["evo"], prim["diffusion"]
    return [
        {
            "goal": "Evo or diffusion beats AR on addition (exact match, own decoders)",
            "numbers": f"AR {a:.3f}, Evo {e:.3f}, diffusion {d:.3f} (best over all decoders: "
            f"Evo {best['evo']:.3f}, diffusion {best['diffusion']:.3f})",
            "met": max(e, d) > a,
        }
    ]


def goals(bpb: list[dict], samples: list[dict], addition: list[dict]) -> list[dict]:
    """The issue's goals, each with its numbers and met / missed."""
    return _bpb_goals(bpb) + _pareto_goal(samples) + _addition_goal(addition)


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
    p.add_argument(
        "--solver", default=None, help="every decoder's solver (default: generate's own)"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.max_steps, args.addition_max_steps = min(args.max_steps, 3), 3
        args.eval_m, args.val_batches, args.repeats = "4", 2, 1
        args.samples, args.prompt_len, args.gen_len = 4, 8, 16
        args.addition_problems = min(args.addition_problems, 16)
    args.eval_m = [int(m) for m in args.eval_m.split(",")]
    args.argv = sys.argv[1:] if argv is None else list(argv)
    return args


@dataclass
class Results:
    """Everything one invocation measured."""

    train: list[dict] = field(default_factory=list)
    bpb: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    addition: list[dict] = field(default_factory=list)
    addition_train: list[dict] = field(default_factory=list)
    goals: list[dict] = field(default_factory=list)
    ref: float = math.nan
    length: int = 0
    val_batches: int = 0
    wall_s: float = 0.0


class Clock:
    """Seconds since the start, printed with each stage."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def log(self, what: str) -> None:
        print(f"[compare] {what} ({self.elapsed():.0f} s)", flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def new_run_dir(out: Path, quick: bool) -> tuple[Path, str, str]:
    """``(OUT/<run id>, run id, timestamp)``; never an existing directory."""
    now = datetime.now(timezone.utc)
    run_id = now.strftime("%Y%m%dT%H%M%SZ") + ("-quick" if quick else "")
    while (out / run_id).exists():  # never overwrite a previous invocation
        run_id += "x"
    (out / run_id).mkdir(parents=True)
    return out / run_id, run_id, now.isoformat(timespec="seconds")


def lm_stage(args, dest: Path, res: Results, clock: Clock) -> None:
    """Train or load the three models on the default corpus and evaluate them."""
    budget = [f"--trainer.max_time={args.max_time}", f"--trainer.max_steps={args.max_steps}"]
    if args.quick:
        budget += [*TINY_OVERRIDES, f"--trainer.val_check_interval={args.max_steps}"]
    runs: dict[str, Run] = {}
    for name in MODELS:
        if args.ckpt_dir:
            runs[name] = load_run(name, Path(args.ckpt_dir), dest / "lm" / name)
        else:
            runs[name] = train_run(name, dest / "lm" / name, budget, args)
        clock.log(f"{name} ready")
    res.train = [{"model": n, "source": r.ckpt, **r.train} for n, r in runs.items()]
    batches = val_batches(runs["evo"].dm, args.val_batches)
    res.length, res.val_batches = batches[0].shape[1], len(batches)
    for r in runs.values():
        res.bpb += eval_bpb(r, batches, args.eval_m, args.repeats, args.seed)
    clock.log("bpb table")
    windows = torch.cat(batches)[: args.samples, : args.prompt_len + args.gen_len]
    judge = runs["ar"]
    res.ref = judge_bpb(judge, windows, args.prompt_len)
    for r in runs.values():
        res.samples += eval_samples(r, judge, windows, args)
    clock.log("samples")


def addition_stage(args, dest: Path, res: Results, clock: Clock) -> None:
    """Train or load the three models on the addition task and score their decoders."""
    seq_len = f"--data.seq_len={3 * args.digits + 4 + 1}"
    extra = [
        "--data.corpus=addition",
        f'--data.corpus_options={{"digits": {args.digits}}}',
        seq_len,
        f"--data.eval_samples={min(128, args.addition_problems)}",
        f"--data.batch_size={args.addition_batch_size}",
        f"--trainer.max_time={args.addition_max_time}",
        f"--trainer.max_steps={args.addition_max_steps}",
    ]
    if args.quick:  # TINY_OVERRIDES sets seq_len 32: the task's own length comes last
        extra += [*TINY_OVERRIDES, "--trainer.val_check_interval=3", seq_len]
    for name in MODELS:
        if args.addition_ckpt_dir:
            r = load_run(name, Path(args.addition_ckpt_dir), dest / "addition" / name)
        else:
            r = train_run(name, dest / "addition" / name, extra, args)
        res.addition += eval_addition(r, args.addition_problems, args.quick, args.solver)
        res.addition_train.append({"model": name, "source": r.ckpt, **r.train})
        clock.log(f"addition {name}")


def write_results(out: Path, dest: Path, run_id: str, stamp: str, res: Results, args) -> None:
    """CSVs and figures into ``dest``; results appended to ``out/results.{jsonl,csv}``."""
    write_csv(dest / "bpb.csv", res.bpb)
    write_csv(dest / "samples.csv", res.samples)
    write_csv(dest / "train.csv", _train_rows(res))
    write_csv(dest / "addition.csv", res.addition)
    write_csv(dest / "goals.csv", res.goals)
    if res.bpb:
        plot_bpb(res.bpb, dest / "bpb_by_policy.png", "validation bits/byte per static policy")
        plot_quality(res.samples, res.ref, dest / "quality_vs_nfe.png", "sample quality vs NFE")
    for section, rows, keys in (
        ("train", res.train, ["train_tokens_per_s", "train_wall_s", "checkpoint_step"]),
        ("bpb", res.bpb, ["bpb", "stderr"]),
        ("samples", res.samples, ["nfe", "judge_bpb", "distinct4", "decode_tokens_per_s"]),
        ("addition", res.addition, ["exact_match", "nfe"]),
        ("addition_train", res.addition_train, ["train_tokens_per_s", "checkpoint_step"]),
    ):
        append_log(out, run_id, stamp, section, rows, keys)
    record = {"timestamp": stamp, "run_id": run_id, "section": "goals", "goals": res.goals}
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps({**record, "argv": args.argv}) + "\n")
    summary = {
        "run_id": run_id,
        "train": res.train,
        "bpb": res.bpb,
        "samples": res.samples,
        "addition": res.addition,
        "addition_train": res.addition_train,
        "goals": res.goals,
        "wall_s": res.wall_s,
    }
    (dest / "summary.json").write_text(json.dumps(summary, indent=1, default=str))


def _train_rows(res: Results) -> list[dict]:
    return res.train + [{**r, "model": "addition/" + r["model"]} for r in res.addition_train]


def bpb_pivot(bpb: list[dict], length: int, ms: list[int]) -> list[dict]:
    """One row per (policy, m) with each model's bpb and the models trained on that size."""
    pivot = []
    for label, b in static_policies(length) if length else []:
        for m in [1] if b == 1 else ms:
            row: dict = {"policy": label, "m": m}
            rows = [r for r in bpb if r["block_size"] == b and r["steps_per_block"] == m]
            row.update({r["model"]: r["bpb"] for r in rows})
            row["trained"] = ", ".join(r["model"] for r in rows if r["trained_regime"])
            pivot.append(row)
    return pivot


def _md_bpb(res: Results, args) -> list[str]:
    best = {m: _best(res.bpb, m) for m in MODELS if _best(res.bpb, m)}
    return [
        "## Validation bits/byte per static policy",
        "",
        "Two-stream ELBO estimator, "
        f"{res.val_batches} validation batches x {args.repeats} noise draws; `m` = steps per "
        "block; 'trained' lists the models trained on that block size (at their own m).",
        "",
        *md_table(
            bpb_pivot(res.bpb, res.length, args.eval_m),
            ["policy", "m", "ar", "diffusion", "evo", "trained"],
        ),
        "",
        "Best static policy per model: "
        + "; ".join(
            f"{k} {v['bpb']:.3f} ({v['policy']}, m={v['steps_per_block']})" for k, v in best.items()
        ),
        "",
    ]


def _md_samples(res: Results, args) -> list[str]:
    cols = ["model", "policy", "nfe", "tokens_per_nfe", "decode_tokens_per_s", "judge_bpb"]
    return [
        "## Sample quality vs network evaluations",
        "",
        f"{args.samples} samples of {args.gen_len} tokens after {args.prompt_len}-token validation "
        "prompts, temperature 1. judge_bpb: bits/byte of the generated tokens under the AR "
        f"model's exact NLL (real continuations: {res.ref:.3f}). distinct4: distinct 4-gram "
        "fraction.",
        "",
        *md_table(res.samples, [*cols, "distinct4", "sample"]),
        "",
    ]


def _md_addition(res: Results, args) -> list[str]:
    if not res.addition:
        return []
    return [
        "## Addition (exact match, greedy)",
        "",
        f"{args.digits}-digit addition, {args.addition_problems} validation problems, prompt "
        "`a+b=`; primary = each model's own decoder, declared before the runs.",
        "",
        *md_table(res.addition, ["model", "policy", "primary", "exact_match", "nfe", "example"]),
        "",
    ]


def report(res: Results, run_id: str, args) -> list[str]:
    """The lines of ``compare.md``."""
    train_cols = ["model", "checkpoint_step", "params", "train_tokens_per_s", "train_wall_s"]
    return [
        f"# AR vs diffusion vs Evo ({run_id})",
        "",
        f"command: `python -m experiments.compare {' '.join(args.argv)}`  ",
        f"hardware: {hardware()}; wall time {res.wall_s:.0f} s",
        "",
        "## Goals",
        "",
        *md_table(res.goals, ["goal", "numbers", "met"]),
        "",
        "## Training runs",
        "",
        *md_table(_train_rows(res), [*train_cols, "source"]),
        "",
        *_md_bpb(res, args),
        *_md_samples(res, args),
        *_md_addition(res, args),
        "Figures: `bpb_by_policy.png`, `quality_vs_nfe.png`.",
        "",
    ]


def main(argv=None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    clock, out = Clock(), Path(args.out)
    dest, run_id, stamp = new_run_dir(out, args.quick)
    res = Results()
    if not args.skip_lm:
        lm_stage(args, dest, res, clock)
    if not args.skip_addition:
        addition_stage(args, dest, res, clock)
    res.goals = goals(res.bpb, res.samples, res.addition)
    res.wall_s = clock.elapsed()
    write_results(out, dest, run_id, stamp, res, args)
    lines = report(res, run_id, args)
    (dest / "compare.md").write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"written to {dest}; appended to {out / 'results.jsonl'} and {out / 'results.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
