"""Training step cost: flowtext's flow model against a plain causal Transformer, side by side.

Same width, depth, MLP ratio, heads, batch and sequence length for every model:

* ``plain``: ``torch.nn.TransformerEncoder`` (pre-norm, causal mask through SDPA), the baseline;
* ``single``: the FlowTransformer on one stream of ``L`` tokens with per-token times (the
  diffusion / Evo single-stream regime);
* ``ar2``: the AR special case on the two-stream layout, ``2L`` tokens per pass (clean + noisy
  stream, :func:`~flowtext.objectives.two_stream_loss` with ``block_size=1``);
* ``evo``: ``Evo.training_loss`` (its mixture of regimes, through
  :class:`~flowtext.regime.TrainingRegime` and :meth:`~flowtext.lm.FlowLM.policy_bound`).

Every model gets ``--rounds`` interleaved rounds of ``--iters`` optimizer steps (plain, single,
ar2, evo, plain, single, ...) and keeps its best round, so a shared, noisy machine slows every
model alike. The clock is CPU time of the process on CPU (``--clock cpu``, the default there)
and wall time with CUDA synchronisation on a GPU. ``--compile`` adds each model again with its
backbone compiled (``FlowTransformerConfig.compile``; the plain model's encoder layers through
``nn.Module.compile``). ``--profile`` prints the ``torch.profiler`` table of one step per model.

Goals (issue 14): the single stream at most 1.15x the plain model per step, the two-stream AR at
most 2.2x.

    python benchmarks/training.py [--d-model 256 --layers 4 --seq-len 256 --batch 16]
    python benchmarks/training.py --quick                  # seconds, tiny sizes
    python benchmarks/training.py --compile --csv out.csv  # eager and compiled, one CSV row each
"""

from __future__ import annotations

import argparse
import csv
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table

from flowtext import Evo, schedules
from flowtext.attention import BACKENDS, LIVE
from flowtext.nn import FlowTransformer, FlowTransformerConfig
from flowtext.objectives import two_stream_loss

MODELS = ("plain", "single", "ar2", "evo")
NAMES = {
    "plain": "plain causal Transformer",
    "single": "flow, single stream (diffusion/Evo)",
    "ar2": "flow, AR two-stream",
    "evo": "Evo mixture (training_loss)",
}


class PlainCausalLM(torch.nn.Module):
    """The baseline: learned positions, pre-norm encoder layers under a causal mask, a readout."""

    def __init__(self, vocab, d_model, layers, heads, mlp_ratio, max_len):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d_model)
        self.pos = torch.nn.Embedding(max_len, d_model)
        layer = torch.nn.TransformerEncoderLayer(
            d_model,
            heads,
            int(mlp_ratio * d_model),
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.body = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = torch.nn.Linear(d_model, vocab)

    def forward(self, tokens):
        n = tokens.shape[1]
        h = self.emb(tokens) + self.pos(torch.arange(n, device=tokens.device))
        mask = torch.nn.Transformer.generate_square_subsequent_mask(n, device=tokens.device)
        return self.out(self.body(h, mask=mask, is_causal=True))


@dataclass
class Stepper:
    """One model's optimizer step: ``loss_fn`` then backward and AdamW."""

    name: str
    loss_fn: Callable[[], torch.Tensor]
    params: list
    device: torch.device
    amp: bool

    def __post_init__(self) -> None:
        self.opt = torch.optim.AdamW(self.params, lr=1e-4)

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            loss = self.loss_fn()
        loss.backward()
        self.opt.step()


def timed(stepper: Stepper, iters: int, clock: str) -> float:
    """Seconds per step of ``iters`` steps, on the CPU-time or the (synchronised) wall clock."""
    cuda = stepper.device.type == "cuda"
    now = time.process_time if clock == "cpu" else time.perf_counter
    if cuda:
        torch.cuda.synchronize()
    t0 = now()
    for _ in range(iters):
        stepper.step()
    if cuda:
        torch.cuda.synchronize()
    return (now() - t0) / iters


def interleaved(steppers: list[Stepper], a: argparse.Namespace) -> dict[str, float]:
    """Best seconds per step of each stepper over ``a.rounds`` interleaved rounds."""
    for s in steppers:
        for _ in range(a.warmup):
            s.step()
    best = {s.name: float("inf") for s in steppers}
    for _ in range(a.rounds):
        for s in steppers:
            best[s.name] = min(best[s.name], timed(s, a.iters, a.clock))
    return best


def profile(steppers: list[Stepper], rows: int) -> None:
    """Print the ``torch.profiler`` table (self CPU time) of one step of each stepper."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    for s in steppers:
        s.step()
        with torch_profile(activities=activities) as prof:
            s.step()
        print(f"=== {s.name}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def build(a: argparse.Namespace, dev: torch.device, compiled: bool) -> tuple[list[Stepper], dict]:
    """The steppers of ``a.models`` (compiled backbones if ``compiled``) and parameter counts."""
    torch.manual_seed(0)
    extra = {"compile": True} if compiled else {}
    cfg = FlowTransformerConfig(
        vocab_size=a.vocab,
        max_len=a.seq_len,
        d_model=a.d_model,
        n_layers=a.layers,
        n_heads=a.heads,
        attention_backend=a.backend,
        **extra,
    )
    tokens = torch.randint(0, a.vocab, (a.batch, a.seq_len), device=dev)
    plain = PlainCausalLM(a.vocab, a.d_model, a.layers, a.heads, cfg.mlp_ratio, a.seq_len).to(dev)
    if compiled:
        for layer in plain.body.layers:
            layer.compile()
    net = FlowTransformer(cfg).to(dev)
    evo = Evo(net=cfg).to(dev)
    sched = schedules.get("cosine")
    t_single = torch.rand(a.batch, a.seq_len, device=dev)
    o_single = torch.full((a.batch, a.seq_len), LIVE, device=dev)

    def plain_loss():
        logits = plain(tokens)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())

    def single_loss():
        z = net.embed(tokens) + torch.randn(a.batch, a.seq_len, cfg.d_embed, device=dev)
        logits = net(z, t_single, o_single).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())

    def ar2_loss():
        return two_stream_loss(net, tokens, sched, block_size=1).nats.mean()

    def evo_loss():
        return evo.training_loss(tokens)[0]

    fns = {"plain": (plain_loss, plain), "single": (single_loss, net), "ar2": (ar2_loss, net)}
    fns["evo"] = (evo_loss, evo)
    tag = "+compile" if compiled else ""
    steppers = [
        Stepper(name + tag, fns[name][0], list(fns[name][1].parameters()), dev, a.amp)
        for name in a.models
    ]
    counts = {"plain": sum(p.numel() for p in plain.parameters())}
    counts["flow"] = sum(p.numel() for p in net.parameters())
    return steppers, counts


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--iters", type=int, default=5, help="steps per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best counts")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    p.add_argument("--vocab", type=int, default=259)
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--quick", action="store_true", help="tiny sizes, seconds")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--clock", choices=("cpu", "wall"), help="default: cpu on CPU, wall on CUDA")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--compile", action="store_true", help="also time compiled backbones")
    p.add_argument("--profile", type=int, default=0, metavar="ROWS", help="profiler table rows")
    p.add_argument("--csv", help="write one row per model to this CSV file")
    p.add_argument(
        "--backend",
        default="sdpa",
        choices=[b for b in BACKENDS if b != "auto"],
        help="attention backend of the FlowTransformer (triton: the fused kernel, CUDA)",
    )
    a = p.parse_args(argv)
    if a.quick:
        a.d_model, a.layers, a.seq_len, a.batch, a.iters, a.rounds = 64, 2, 64, 4, 2, 2
    if a.clock is None:
        a.clock = "wall" if torch.device(a.device).type == "cuda" else "cpu"
    return a


def main(argv=None) -> dict[str, float]:
    """Run the benchmark; returns the best seconds per step of every model."""
    a = parse(argv)
    dev = torch.device(a.device)
    steppers, counts = build(a, dev, compiled=False)
    if a.compile:
        steppers += build(a, dev, compiled=True)[0]
    if a.profile:
        profile(steppers, a.profile)
    best = interleaved(steppers, a)
    report(a, dev, best, counts)
    return best


def report(a: argparse.Namespace, dev: torch.device, best: dict[str, float], counts) -> None:
    """Print the table (and write the CSV) of seconds per step and ratios to the plain model."""
    title = (
        f"training step, B={a.batch} L={a.seq_len} d={a.d_model} layers={a.layers} "
        f"({_where(dev)}, attention {a.backend}{', bf16 autocast' if a.amp else ''}, "
        f"{a.clock} time, best of {a.rounds} x {a.iters}, torch {torch.__version__})"
    )
    table = Table(title=title)
    for col in ("model", "s / step", "clean tokens/s", "ratio vs plain"):
        table.add_column(col, justify="right" if col != "model" else "left")
    rows = []
    for name, sec in best.items():
        base = best.get("plain+compile" if name.endswith("+compile") else "plain")
        ratio = sec / base if base else float("nan")
        model, _, tag = name.partition("+")
        rows.append([model, tag or "eager", sec, a.batch * a.seq_len / sec, ratio])
        label = NAMES[model] + (" [compiled]" if tag else "")
        table.add_row(label, f"{sec:.4f}", f"{rows[-1][3]:,.0f}", f"{ratio:.3f}x")
    Console().print(table)
    print(f"parameters: plain {counts['plain']:,}, flow {counts['flow']:,}")
    if a.csv:
        write_csv(a, dev, rows)


CSV_FIELDS = ("model", "mode", "device", "clock", "batch", "seq_len", "d_model", "layers",
              "backend", "amp", "s_per_step", "tokens_per_s", "ratio_vs_plain")  # fmt: skip


def write_csv(a: argparse.Namespace, dev: torch.device, rows: list) -> None:
    """One CSV row per model and mode: the run's settings, seconds per step and ratios."""
    with open(a.csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS)
        for model, mode, sec, tps, ratio in rows:
            settings = (_where(dev), a.clock, a.batch, a.seq_len, a.d_model, a.layers)
            w.writerow([model, mode, *settings, a.backend, a.amp,
                        f"{sec:.6g}", f"{tps:.6g}", f"{ratio:.4f}"])  # fmt: skip


def _where(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"CPU, {torch.get_num_threads()} thread(s)"


if __name__ == "__main__":
    main()
