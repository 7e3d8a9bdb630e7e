"""flowtext's AR special case (``ar-tiny``) against a plain GPT, same data, same wall time.

Two processes run concurrently, one torch thread each, so both see the same machine load:

* ``gpt``: :class:`plain_gpt.PlainGPT` (4 layers, width 256, learned positions, AdamW 1e-3,
  the issue's reference), trained by a bare loop on the training batches of the
  :class:`~flowtext.data.FlowTextDataModule` that ``ar-tiny``'s ``data:`` section describes;
* ``ar-tiny``: ``experiments/configs/ar-tiny.yaml`` through :func:`flowtext.training.cli_main`
  (the config as a user runs it, validation and checkpoints included) with
  ``--trainer.max_time`` set to the budget and ``--trainer.max_steps=-1`` (the time decides).

Both then score the same held-out windows: third-party Python sources from the venv's
``site-packages`` (never in the stdlib corpus): for each package in :data:`HELDOUT_PACKAGES`, its
``.py`` files sorted by path, joined with EOS as the corpus is, cut to the first ``--heldout-kib``
KiB, byte-tokenized and cut into non-overlapping windows of the training length ``L``. The GPT
scores every token of a window (it reads BOS first); flowtext's score is the exact AR bound of
the checkpoint (``two_stream_loss`` with ``block_size=1, steps_per_block=1``, the ``val/bpb_ar``
of validation), loaded back with :func:`flowtext.checkpoint.load_checkpoint`. Both in bits per
byte; the stdlib validation split is scored the same way for reference.

A second phase, again concurrent, measures training tokens/s at EQUAL sizes: the plain GPT with
``ar-tiny``'s width, depth, heads and MLP ratio against ``ar-tiny``'s own training loss
(``training_loss``), both in the same bare AdamW loop, for ``--bench-seconds``.

``--step-only`` measures just the training step at equal sizes, in ONE process and thread: the
plain GPT's and ``ar-tiny``'s optimizer steps (loss, backward, clip, AdamW; no data loading, no
Lightning) on one fixed batch of ``ar-tiny``'s shape, in ``--rounds`` interleaved rounds of
``--iters`` steps each, timed in CPU time (``time.process_time``). It reports each model's best
round and, more robust on a shared machine (whose load moves both by +-30% from step to step),
the median over rounds of the GPT's time over ``ar-tiny``'s in the same round.
``--profile N`` then prints the ``torch.profiler`` table (N rows) of a few steps of each.

    python benchmarks/ar_vs_gpt.py --minutes 4 --out runs/ar_vs_gpt
    python benchmarks/ar_vs_gpt.py --quick        # seconds, tiny sizes (the tests)
    python benchmarks/ar_vs_gpt.py --step-only [--rounds 10 --iters 3 --profile 30]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import multiprocessing as mp
import os
import shlex
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

from plain_gpt import (  # noqa: E402
    GPTConfig,
    PlainGPT,
    batches_forever,
    make_step,
    token_nats,
    train_for,
)

from flowtext.data import ByteTokenizer, FlowTextDataModule  # noqa: E402
from flowtext.objectives import LN2, two_stream_loss  # noqa: E402
from flowtext.training import TINY_OVERRIDES  # noqa: E402

CONFIG = ROOT / "experiments" / "configs" / "ar-tiny.yaml"
HELDOUT_PACKAGES = ("lightning", "torch/nn")
"""Held-out sources: folders under ``site-packages`` that every flowtext install has."""
REFERENCE_GPT = GPTConfig(d_model=256, n_layers=4, n_heads=4)
QUICK_GPT = GPTConfig(d_model=32, n_layers=1, n_heads=2)
BARRIER_TIMEOUT_S = 900.0


# ------------------------------------------------------------------------------------ config
def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    """``cfg`` with CLI overrides ``--a.b.c=value`` (YAML values) written into it (a copy)."""
    out = json.loads(json.dumps(cfg))
    for item in overrides:
        key, _, value = item.removeprefix("--").partition("=")
        *path, leaf = key.split(".")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return out


def flow_overrides(args: argparse.Namespace, run_dir: Path) -> list[str]:
    """CLI overrides of ``ar-tiny``: the budget, the run folder and (``--quick``) tiny sizes."""
    seconds = max(1, round(args.minutes * 60))
    out = [
        f"--trainer.max_time=00:00:{seconds // 60:02d}:{seconds % 60:02d}",
        "--trainer.max_steps=-1",
        "--trainer.accelerator=cpu",  # the comparison is one CPU thread each, GPU or not
        f"--trainer.default_root_dir={run_dir}",
    ]
    if args.quick:
        out += [*TINY_OVERRIDES, "--trainer.val_check_interval=3"]
    return out


# ---------------------------------------------------------------------------------- held-out
def heldout_tokens(
    kib: int, packages: tuple[str, ...] = HELDOUT_PACKAGES
) -> tuple[torch.Tensor, dict]:
    """Byte tokens of the first ``kib`` KiB of each package's ``.py`` files (sorted by path).

    Files are joined with EOS, as the corpus joins its documents; each package's stream is cut
    at ``kib * 1024`` tokens.

    Args:
        kib: Tokens per package, in KiB.
        packages: Folders under ``site-packages``.

    Returns:
        ``(ids [n], info)``; ``info`` names the folder, files used per package and a SHA-1.
    """
    tok = ByteTokenizer()
    site = Path(sysconfig.get_paths()["purelib"])
    streams, info, sha = [], {"site_packages": str(site), "packages": {}}, hashlib.sha1()
    for name in packages:
        files = sorted((site / name).rglob("*.py"), key=lambda p: p.relative_to(site).as_posix())
        if not files:
            raise FileNotFoundError(f"no .py files under {site / name}; is {name} installed?")
        ids: list[int] = []
        used = 0
        while len(ids) < kib * 1024 and used < len(files):
            ids += tok.encode_bytes(files[used].read_bytes()).tolist() + [tok.eos_id]
            used += 1
        streams.append(torch.tensor(ids[: kib * 1024], dtype=torch.int64))
        sha.update(streams[-1].numpy().tobytes())
        info["packages"][name] = {"files": used, "tokens": len(streams[-1])}
    info["sha1"] = sha.hexdigest()[:12]
    return torch.cat(streams), info


def heldout_windows(seq_len: int, kib: int) -> tuple[torch.Tensor, dict]:
    """Non-overlapping held-out windows ``[N, seq_len]`` (see :func:`heldout_tokens`) and info."""
    ids, info = heldout_tokens(kib)
    n = len(ids) // seq_len
    info.update(windows=n, seq_len=seq_len)
    return ids[: n * seq_len].view(n, seq_len), info


def bits_per_byte(nats_fn, windows: torch.Tensor, bytes_per_token: float, batch: int) -> float:
    """Mean bits per byte of ``nats_fn(tokens [b, L]) -> [b, L]`` over all windows."""
    total = 0.0
    with torch.no_grad():
        for chunk in windows.split(batch):
            total += float(nats_fn(chunk).double().sum())
    return total / windows.numel() / LN2 / bytes_per_token


def val_windows(dm: FlowTextDataModule) -> torch.Tensor:
    """The stdlib validation windows ``[N, L]`` of the data module (in-distribution reference)."""
    dm.setup("validate")
    return torch.cat([b["tokens"] for b in dm.val_dataloader()])


# ----------------------------------------------------------------------------------- workers
def _clock_callback():
    """A Lightning callback splitting training wall time into steps, validation and the rest."""
    from lightning.pytorch.callbacks import Callback

    class Clock(Callback):
        def __init__(self) -> None:
            self.totals = {"step": 0.0, "val": 0.0, "other": 0.0}
            self.phase, self.mark, self.cpu = None, 0.0, 0.0

        def _switch(self, phase: str | None) -> None:
            now = time.perf_counter()
            if self.phase is not None:
                self.totals[self.phase] += now - self.mark
            self.phase, self.mark = phase, now

        def on_train_start(self, trainer, pl_module) -> None:
            self._switch("other")
            self.cpu = time.process_time()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self._switch("step")  # a validation's sample and checkpoint count as validation

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self._switch("other")  # data loading, periodic checkpoints, logging

        def on_validation_start(self, trainer, pl_module) -> None:
            if self.phase is not None:
                self._switch("val")

        def on_train_end(self, trainer, pl_module) -> None:
            self._switch(None)
            self.cpu = time.process_time() - self.cpu

    return Clock()


def gpt_worker(spec: dict, barrier) -> dict:
    """Train the plain GPT for the budget, score it, then time it at ``ar-tiny``'s sizes."""
    torch.manual_seed(spec["seed"])
    dm = FlowTextDataModule(**spec["data"])
    dm.setup("fit")
    bos, bpt = dm.tokenizer.bos_id, dm.bytes_per_token
    model = PlainGPT(GPTConfig(**spec["gpt"]))
    batches = batches_forever(dm.train_dataloader())
    heldout, _ = heldout_windows(dm.seq_len, spec["heldout_kib"])
    barrier.wait(BARRIER_TIMEOUT_S)
    out = train_for(
        lambda b: token_nats(model, b, bos).mean(),
        list(model.parameters()),
        batches,
        spec["seconds"],
    )
    model.eval()
    nats = lambda b: token_nats(model, b, bos)  # noqa: E731
    out["heldout_bpb"] = bits_per_byte(nats, heldout, bpt, spec["eval_batch"])
    out["val_bpb"] = bits_per_byte(nats, val_windows(dm), bpt, spec["eval_batch"])
    out["params"] = sum(p.numel() for p in model.parameters())
    barrier.wait(BARRIER_TIMEOUT_S)
    twin = PlainGPT(GPTConfig(**spec["gpt_equal"]))
    out["equal"] = train_for(
        lambda b: token_nats(twin, b, bos).mean(),
        list(twin.parameters()),
        batches,
        spec["bench_seconds"],
    )
    out["equal"]["params"] = sum(p.numel() for p in twin.parameters())
    return out


def _flow_nats(lm):
    gen = torch.Generator().manual_seed(0)  # the AR bound is exact: no noise is read

    def nats(tokens: torch.Tensor) -> torch.Tensor:
        return two_stream_loss(
            lm.net, tokens, lm.schedule, block_size=1, steps_per_block=1, generator=gen
        ).nats

    return nats


def flow_worker(spec: dict, barrier) -> dict:
    """Fit ``ar-tiny`` through the CLI for the budget, score its checkpoint, then time it."""
    from flowtext.checkpoint import load_checkpoint
    from flowtext.training import cli_main

    cli = cli_main(["--config", str(CONFIG), *spec["flow_overrides"]], run=False)
    clock = _clock_callback()
    cli.trainer.callbacks.append(clock)
    dm = cli.datamodule
    heldout, _ = heldout_windows(dm.seq_len, spec["heldout_kib"])
    barrier.wait(BARRIER_TIMEOUT_S)
    t0 = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=dm)
    fit_s = time.perf_counter() - t0
    ckpt = Path(cli.trainer.log_dir) / "checkpoints" / "final.ckpt"
    cli.trainer.save_checkpoint(ckpt, weights_only=False)
    lm, _, _ = load_checkpoint(ckpt)
    tokens = cli.trainer.global_step * dm.batch_size * dm.seq_len
    train_s = sum(clock.totals.values())
    out = {
        "steps": cli.trainer.global_step,
        "tokens": tokens,
        "seconds": train_s,
        "fit_seconds": fit_s,
        "cpu_seconds": clock.cpu,
        "tokens_per_s": tokens / train_s,
        "step_tokens_per_s": tokens / max(clock.totals["step"], 1e-9),
        "time_split_s": clock.totals,
        "checkpoint": str(ckpt),
        "params": sum(p.numel() for p in lm.parameters()),
    }
    nats = _flow_nats(lm)
    out["heldout_bpb"] = bits_per_byte(nats, heldout, lm.bytes_per_token, spec["eval_batch"])
    out["val_bpb"] = bits_per_byte(nats, val_windows(dm), lm.bytes_per_token, spec["eval_batch"])
    barrier.wait(BARRIER_TIMEOUT_S)
    bench = cli.model.train()
    batches = batches_forever(dm.train_dataloader())
    out["equal"] = train_for(
        lambda b: bench.training_loss(b)[0],
        list(bench.parameters()),
        batches,
        spec["bench_seconds"],
    )
    out["equal"]["params"] = out["params"]
    return out


WORKERS = {"gpt": gpt_worker, "ar-tiny": flow_worker}


def _worker_main(role: str, spec: dict, barrier, path: str) -> None:
    torch.set_num_threads(1)
    result = WORKERS[role](spec, barrier)
    Path(path).write_text(json.dumps(result))


def run_pair(spec: dict, tmp: Path) -> dict[str, dict]:
    """Run both workers concurrently (spawned processes); their results by role.

    Raises:
        RuntimeError: A worker failed (the other one is stopped).
    """
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(len(WORKERS))
    paths = {role: tmp / f"{role}.json" for role in WORKERS}
    procs = {
        role: ctx.Process(target=_worker_main, args=(role, spec, barrier, str(paths[role])))
        for role in WORKERS
    }
    for p in procs.values():
        p.start()
    while any(p.is_alive() for p in procs.values()):
        failed = [r for r, p in procs.items() if p.exitcode not in (None, 0)]
        if failed:
            barrier.abort()
            for p in procs.values():
                if p.is_alive():
                    p.terminate()
            raise RuntimeError(f"worker {failed[0]} failed (exit code {procs[failed[0]].exitcode})")
        time.sleep(0.5)
    bad = [r for r, p in procs.items() if p.exitcode != 0]
    if bad:
        raise RuntimeError(f"worker {bad[0]} failed (exit code {procs[bad[0]].exitcode})")
    return {role: json.loads(paths[role].read_text()) for role in WORKERS}


# --------------------------------------------------------------------------------- step only
StepFn = Callable[[torch.Tensor], torch.Tensor]


def step_models(spec: dict) -> tuple[dict[str, StepFn], dict[str, int]]:
    """The two optimizer steps at equal sizes, ``gpt`` then ``ar-tiny``, and parameter counts.

    ``ar-tiny`` is the model the CLI builds from the config (overrides in); its step is the loss
    it trains on (:meth:`~flowtext.lm.FlowLM.training_loss`), the GPT's its mean token NLL; both
    go through :func:`plain_gpt.make_step` (AdamW, clip 1.0).
    """
    from flowtext.training import cli_main

    torch.manual_seed(spec["seed"])
    gpt = PlainGPT(GPTConfig(**spec["gpt_equal"]))
    lm = cli_main(["--config", str(CONFIG), *spec["flow_overrides"]], run=False).model.train()
    bos = ByteTokenizer().bos_id
    steps = {
        "gpt": make_step(lambda b: token_nats(gpt, b, bos).mean(), list(gpt.parameters())),
        "ar-tiny": make_step(lambda b: lm.training_loss(b)[0], list(lm.parameters())),
    }
    params = {"gpt": sum(p.numel() for p in gpt.parameters())}
    params["ar-tiny"] = sum(p.numel() for p in lm.parameters())
    return steps, params


def interleaved_steps(
    steps: dict[str, StepFn], batch: torch.Tensor, rounds: int, iters: int, warmup: int
) -> dict[str, list[float]]:
    """CPU seconds per step of each model in each of ``rounds`` interleaved rounds.

    Args:
        steps: Step functions by name (in this order in even rounds, reversed in odd ones, so
            neither model always runs first).
        batch: The batch every step trains on, ``[B, L]``.
        rounds: Rounds; each runs ``iters`` steps of every model in turn.
        iters: Steps per model and round (one clock reading around them).
        warmup: Untimed steps of each model first.

    Returns:
        ``{name: [seconds per step of each round]}`` (``time.process_time``).
    """
    for step in steps.values():
        for _ in range(warmup):
            step(batch)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(rounds):
        order = list(steps.items())
        for name, step in order if r % 2 == 0 else order[::-1]:
            c0 = time.process_time()
            for _ in range(iters):
                step(batch)
            times[name].append((time.process_time() - c0) / iters)
    return times


def profile_steps(steps: dict[str, StepFn], batch: torch.Tensor, rows: int) -> None:
    """Print the ``torch.profiler`` table (self CPU time, ``rows`` rows) of 3 steps of each."""
    from torch.profiler import ProfilerActivity, profile

    for name, step in steps.items():
        step(batch)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                step(batch)
        print(f"=== {name}, 3 steps")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def step_only(args: argparse.Namespace) -> dict:
    """Time both steps interleaved in this process (one thread); print and return the row."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        spec = make_spec(args, Path(tmp) / "ar-tiny-run")
        steps, params = step_models(spec)
        data = spec["data"]
        gen = torch.Generator().manual_seed(args.seed)
        batch = torch.randint(0, 256, (data["batch_size"], data["seq_len"]), generator=gen)
        load_before = os.getloadavg()
        times = interleaved_steps(steps, batch, args.rounds, args.iters, args.warmup)
        load_after = os.getloadavg()
        if args.profile:
            profile_steps(steps, batch, args.profile)
    best = {name: min(t) for name, t in times.items()}
    # each round's GPT time over its ar-tiny time: neighbours in time share the machine's load
    paired = statistics.median(g / a for g, a in zip(times["gpt"], times["ar-tiny"]))
    row = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(),
        "batch": f"{data['batch_size']}x{data['seq_len']}",
        "rounds": args.rounds,
        "iters": args.iters,
        "gpt_cpu_s_per_step": best["gpt"],
        "ar_cpu_s_per_step": best["ar-tiny"],
        "gpt_tokens_per_cpu_s": batch.numel() / best["gpt"],
        "ar_tokens_per_cpu_s": batch.numel() / best["ar-tiny"],
        "ratio_ar_over_gpt": best["gpt"] / best["ar-tiny"],
        "median_round_ratio": paired,
        "gpt_params": params["gpt"],
        "ar_params": params["ar-tiny"],
        "loadavg_before": " ".join(f"{x:.2f}" for x in load_before),
        "loadavg_after": " ".join(f"{x:.2f}" for x in load_after),
    }
    print("\n".join(step_markdown(row)))
    return row


def step_markdown(row: dict) -> list[str]:
    """The step-only table (markdown lines)."""
    r = row
    return [
        f"training step at equal width and depth, batch {r['batch']}, one thread, best of "
        f"{r['rounds']} interleaved rounds of {r['iters']} steps (CPU time), commit {r['commit']}",
        "",
        "| | plain GPT | ar-tiny | ar-tiny / GPT |",
        "|---|---|---|---|",
        f"| CPU ms per step | {1e3 * r['gpt_cpu_s_per_step']:.1f} "
        f"| {1e3 * r['ar_cpu_s_per_step']:.1f} "
        f"| {r['ar_cpu_s_per_step'] / r['gpt_cpu_s_per_step']:.3f} |",
        f"| tokens per CPU second | {r['gpt_tokens_per_cpu_s']:.0f} "
        f"| {r['ar_tokens_per_cpu_s']:.0f} | {r['ratio_ar_over_gpt']:.3f} |",
        f"| tokens/s ratio, median over rounds | | | {r['median_round_ratio']:.3f} |",
        f"| parameters | {r['gpt_params']} | {r['ar_params']} | |",
        "",
        f"load average (1/5/15 min) before {r['loadavg_before']}, after {r['loadavg_after']}",
    ]


# ------------------------------------------------------------------------------------ report
def summary_row(res: dict[str, dict], meta: dict) -> dict:
    """One flat row: the numbers the issue asks for, plus provenance."""
    g, f = res["gpt"], res["ar-tiny"]
    split = f["time_split_s"]
    return {
        **meta,
        "gpt_heldout_bpb": g["heldout_bpb"],
        "ar_heldout_bpb": f["heldout_bpb"],
        "bpb_ratio_ar_over_gpt": f["heldout_bpb"] / g["heldout_bpb"],
        "gpt_val_bpb": g["val_bpb"],
        "ar_val_bpb": f["val_bpb"],
        "gpt_cpu_s": g["cpu_seconds"],
        "ar_cpu_s": f["cpu_seconds"],
        "gpt_steps": g["steps"],
        "ar_steps": f["steps"],
        "gpt_tokens_per_s": g["tokens_per_s"],
        "ar_tokens_per_s": f["tokens_per_s"],
        "ar_step_tokens_per_s": f["step_tokens_per_s"],
        "ar_time_step_s": split["step"],
        "ar_time_val_s": split["val"],
        "ar_time_other_s": split["other"],
        "gpt_params": g["params"],
        "ar_params": f["params"],
        "equal_gpt_tokens_per_s": g["equal"]["tokens_per_s"],
        "equal_ar_tokens_per_s": f["equal"]["tokens_per_s"],
        "equal_ratio_ar_over_gpt": f["equal"]["tokens_per_s"] / g["equal"]["tokens_per_s"],
        "equal_gpt_params": g["equal"]["params"],
    }


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}" if abs(x) < 1e4 else f"{x:.0f}"
    return str(x)


def markdown(row: dict) -> list[str]:
    """The side-by-side table (markdown lines)."""
    r = row
    lines = [
        "| | plain GPT | ar-tiny | ar-tiny / GPT |",
        "|---|---|---|---|",
        f"| held-out bits/byte | {_fmt(r['gpt_heldout_bpb'])} | {_fmt(r['ar_heldout_bpb'])} "
        f"| {_fmt(r['bpb_ratio_ar_over_gpt'])} |",
        f"| stdlib val bits/byte | {_fmt(r['gpt_val_bpb'])} | {_fmt(r['ar_val_bpb'])} "
        f"| {_fmt(r['ar_val_bpb'] / r['gpt_val_bpb'])} |",
        f"| optimizer steps | {r['gpt_steps']} | {r['ar_steps']} "
        f"| {_fmt(r['ar_steps'] / max(r['gpt_steps'], 1))} |",
        f"| training tokens/s (whole budget) | {_fmt(r['gpt_tokens_per_s'])} "
        f"| {_fmt(r['ar_tokens_per_s'])} | {_fmt(r['ar_tokens_per_s'] / r['gpt_tokens_per_s'])} |",
        f"| CPU seconds while training | {_fmt(r['gpt_cpu_s'])} | {_fmt(r['ar_cpu_s'])} "
        f"| {_fmt(r['ar_cpu_s'] / r['gpt_cpu_s'])} |",
        f"| parameters | {r['gpt_params']} | {r['ar_params']} | |",
        f"| tokens/s at equal width and depth | {_fmt(r['equal_gpt_tokens_per_s'])} "
        f"| {_fmt(r['equal_ar_tokens_per_s'])} | {_fmt(r['equal_ratio_ar_over_gpt'])} |",
    ]
    lines.append(
        f"\nar-tiny's {r['train_seconds']:.0f} s: training steps {r['ar_time_step_s']:.1f} s, "
        f"validation (with its sample and checkpoint) {r['ar_time_val_s']:.1f} s, other (data, "
        f"periodic checkpoints, logging) {r['ar_time_other_s']:.1f} s; its step-only training "
        f"tokens/s {_fmt(r['ar_step_tokens_per_s'])}."
    )
    return lines


def append_csv(path: Path, row: dict) -> None:
    """Append ``row`` to the CSV at ``path``, with a header when the file is new."""
    new = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def write_outputs(out: Path, row: dict, details: dict) -> None:
    """``ar_vs_gpt.json`` (this run), ``ar_vs_gpt.csv`` (one row appended), ``ar_vs_gpt.md``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "ar_vs_gpt.json").write_text(json.dumps({"row": row, **details}, indent=1))
    append_csv(out / "ar_vs_gpt.csv", row)
    (out / "ar_vs_gpt.md").write_text("\n".join(markdown(row)) + "\n")


def write_step_outputs(out: Path, row: dict) -> None:
    """``ar_vs_gpt_steps.csv`` (one row appended) and ``ar_vs_gpt_steps.md`` (this run)."""
    out.mkdir(parents=True, exist_ok=True)
    append_csv(out / "ar_vs_gpt_steps.csv", row)
    (out / "ar_vs_gpt_steps.md").write_text("\n".join(step_markdown(row)) + "\n")


# -------------------------------------------------------------------------------------- main
def parse(argv=None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=4.0, help="training wall time of each")
    p.add_argument("--quick", action="store_true", help="seconds, tiny sizes (the tests)")
    p.add_argument("--out", default=None, help="folder for the JSON/CSV row and markdown table")
    p.add_argument("--bench-seconds", type=float, default=30.0, help="equal-size timing")
    p.add_argument("--heldout-kib", type=int, default=256, help="held-out KiB per package")
    p.add_argument("--eval-batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step-only", action="store_true", help="time the two steps, one process")
    p.add_argument("--rounds", type=int, default=30, help="--step-only: interleaved rounds")
    p.add_argument("--iters", type=int, default=1, help="--step-only: steps per round")
    p.add_argument("--warmup", type=int, default=2, help="--step-only: untimed steps first")
    p.add_argument("--profile", type=int, default=0, help="--step-only: profiler table rows")
    args = p.parse_args(argv)
    if args.quick:
        args.minutes, args.bench_seconds, args.heldout_kib = 3 / 60, 1.0, 2
        args.rounds, args.iters, args.warmup = min(args.rounds, 2), 1, 1
    return args


def make_spec(args: argparse.Namespace, run_dir: Path) -> dict:
    """What both workers need: data, sizes, budgets (the data is ``ar-tiny``'s, overrides in)."""
    overrides = flow_overrides(args, run_dir)
    cfg = apply_overrides(yaml.safe_load(CONFIG.read_text()), overrides)
    data, net = cfg["data"], cfg["model"]["init_args"]["net"]
    ref = QUICK_GPT if args.quick else REFERENCE_GPT
    gpt = {**vars(ref), "max_len": data["seq_len"]}
    equal = {
        "max_len": data["seq_len"],
        "d_model": net["d_model"],
        "n_layers": net["n_layers"],
        "n_heads": net["n_heads"],
        "mlp_ratio": net.get("mlp_ratio", 4.0),
    }
    return {
        "data": data,
        "gpt": gpt,
        "gpt_equal": equal,
        "flow_overrides": overrides,
        "seconds": max(1, round(args.minutes * 60)),
        "bench_seconds": args.bench_seconds,
        "heldout_kib": args.heldout_kib,
        "eval_batch": args.eval_batch,
        "seed": args.seed,
    }


def main(argv=None) -> int:
    """Train both, print the table, write ``--out`` files; returns the exit code."""
    args = parse(argv)
    if args.step_only:
        row = step_only(args)
        if args.out:
            write_step_outputs(Path(args.out), row)
        return 0
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        run_dir = Path(args.out) / "ar-tiny-run" if args.out else tmp / "ar-tiny-run"
        spec = make_spec(args, run_dir)
        FlowTextDataModule(**spec["data"]).prepare_data()  # tokenize once, not in both workers
        load_before = os.getloadavg()
        started = datetime.now(timezone.utc)
        res = run_pair(spec, tmp)
        load_after = os.getloadavg()
    _, info = heldout_windows(spec["data"]["seq_len"], spec["heldout_kib"])
    meta = {
        "date": started.isoformat(timespec="seconds"),
        "command": shlex.join(
            ["python", "benchmarks/ar_vs_gpt.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "train_seconds": spec["seconds"],
        "loadavg_before": " ".join(f"{x:.2f}" for x in load_before),
        "loadavg_after": " ".join(f"{x:.2f}" for x in load_after),
        "heldout": f"{'+'.join(HELDOUT_PACKAGES)} {info['windows']}x{info['seq_len']} "
        f"sha1 {info['sha1']}",
    }
    row = summary_row(res, meta)
    print("\n".join(markdown(row)))
    print(
        f"\nload average (1/5/15 min) before {meta['loadavg_before']}, after "
        f"{meta['loadavg_after']}; held-out: {meta['heldout']}"
    )
    if args.out:
        write_outputs(Path(args.out), row, {"spec": spec, "heldout": info, "workers": res})
    return 0


if __name__ == "__main__":
    sys.exit(main())
