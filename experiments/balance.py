"""Evo's balance (issue 12): training regimes side by side at equal steps, and gradient noise.

Trains one model per regime on the default corpus (stdlib bytes) with the same network, data
order, optimizer, learning-rate schedule and seed, then reports for each:

* validation bits/byte of the exact AR bound and of the ``block(B)`` and synchronous bounds;
* for every bound the regime draws, the cosine between the gradients of its term (as the regime
  weighs it, without the AR term added on every batch) under two independent noise draws on the
  same batch (1 = noiseless; the AR bound has no noise), the cosine of their mean with the AR
  term's gradient, and its norm relative to the AR term's.

::

    python -m experiments.balance --quick --out /tmp/balance          # seconds
    python -m experiments.balance --steps 400 --out runs/balance       # minutes

Regimes (``--regimes``): ``ar`` (the AR special case), ``evo`` (:meth:`TrainingRegime.evo`),
``evo-plain`` (Evo before issue 12 item 3: the plain sum of the terms, Gaussian-mean step), and
any ``--variant`` (Evo's fields replaced), all on the same network. Outputs in
``--out``: ``balance.csv`` (bounds), ``gradients.csv`` and ``balance.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch
from rich.progress import track

from experiments.common import (
    bound_bpb,
    datamodule,
    hardware,
    md_table,
    training_arguments,
    val_batches,
    write_csv,
)
from flowtext.lm import FlowLM
from flowtext.nn import FlowTransformerConfig
from flowtext.objectives import LN2
from flowtext.policies import Block
from flowtext.regime import TrainingRegime

REGIMES = {
    "ar": TrainingRegime.autoregressive,
    "evo": TrainingRegime.evo,
    "diffusion": TrainingRegime.diffusion,
    "evo-plain": lambda: dataclasses.replace(
        TrainingRegime.evo(), normalize=False, reverse="gaussian", bound_weights={}
    ),
}


def build(name: str, dm, args) -> FlowLM:
    """A fresh model for regime ``name`` on ``dm``'s vocabulary (same initial weights for all)."""
    net = FlowTransformerConfig(
        vocab_size=dm.vocab_size, max_len=args.length, d_model=args.width, n_layers=args.layers,
        n_heads=args.heads, d_embed=args.d_embed, cond_dim=64, cond_rank=8,
        attention_backend="sdpa", self_condition=args.self_condition,
        output_prior=args.output_prior,
    )  # fmt: skip
    regime = REGIMES[name]() if name in REGIMES else _variant(name, args.variant)
    if args.steps_per_block:
        regime = dataclasses.replace(regime, steps_per_block=args.steps_per_block)
    torch.manual_seed(args.seed)

    def adamw(params):
        return torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)

    lm = FlowLM(
        net=net, regime=regime, seed=args.seed, optimizer=adamw, bytes_per_token=dm.bytes_per_token,
        schedule=args.schedule,
        warmup_steps=min(100, args.steps // 4), max_lr_steps=args.steps,
    )  # fmt: skip
    lm.init_output_prior(dm)  # the unigram start of the output prior (no-op without it)
    return lm


def _variant(name: str, variants: list[str]) -> TrainingRegime:
    fields = json.loads(dict(v.split("=", 1) for v in variants)[name])
    base = REGIMES[fields.pop("base", "evo")]()
    return TrainingRegime(**(base.to_dict() | fields))


def train(name: str, lm: FlowLM, dm, args) -> float:
    """``args.steps`` optimizer steps on the data module's batches; returns seconds taken."""
    conf = lm.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    lm.train()
    start, loader = time.perf_counter(), iter(dm.train_dataloader())
    for step in track(range(args.steps), description=f"{name}: training", transient=True):
        batch = next(loader)
        regime_gen, noise = lm.batch_generators(step, step * args.batch)
        lm._gen.manual_seed(noise)
        loss, _ = lm.training_loss(batch["tokens"], regime_generator=regime_gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        sched.step()
    lm.eval()
    return time.perf_counter() - start


def _grad(lm: FlowLM, loss: torch.Tensor) -> torch.Tensor:
    params = [p for p in lm.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                      for g, p in zip(grads, params)]).double()  # fmt: skip


def _drawn_gradient(lm: FlowLM, tokens: torch.Tensor, bound, seed: int) -> torch.Tensor:
    """Gradient of the drawn bound's term alone, as the regime weighs it (no AR term)."""
    lm._gen.manual_seed(seed)
    elbo = lm.bound_loss(tokens, bound)[1][f"train/elbo_bpt_{bound.label}"] * LN2
    scale = lm.regime.weight(bound.label) / (float(elbo.detach()) if lm.regime.normalize else 1.0)
    return scale * _grad(lm, elbo)


def gradient_rows(name: str, lm: FlowLM, batches: list[torch.Tensor], args) -> list[dict]:
    """Per drawn bound: noise-draw cosine, cosine with the AR term's gradient, norm ratio.

    The AR term is the one the regime adds on every batch (``ar_weight``, or the drawn AR bound
    for a pure-AR regime), scaled as the regime trains it.
    """
    cos = torch.nn.functional.cosine_similarity
    length, rows, regime = batches[0].shape[1], [], lm.regime
    lm.train()  # the estimators as training draws them (one draw per row, no covering)
    labels = {}
    for seed in range(200):  # every label the regime draws, with its bound
        bound = regime.draw(length, torch.Generator().manual_seed(seed))
        labels.setdefault(bound.label, bound)
    ar_bound = TrainingRegime.autoregressive().block_bound(1, length)
    for label, bound in sorted(labels.items()):
        same, with_ar, ratio = [], [], []
        for i, tokens in enumerate(batches):
            ar_nats = lm.policy_bound(tokens, ar_bound.policy, ar_bound.steps).nats.mean()
            ar_scale = (regime.ar_weight or 1.0) / (
                float(ar_nats.detach()) if regime.normalize else 1.0
            )
            ar = ar_scale * _grad(lm, ar_nats)
            draws = [_drawn_gradient(lm, tokens, bound, 1000 * i + d) for d in range(2)]
            same.append(float(cos(draws[0], draws[1], dim=0)))
            mean = (draws[0] + draws[1]) / 2
            with_ar.append(float(cos(mean, ar, dim=0)))
            ratio.append(float(mean.norm() / ar.norm()))
        rows.append({
            "regime": name, "bound": label, "p": regime.probabilities()[label],
            "cos_noise": sum(same) / len(same), "cos_ar": sum(with_ar) / len(with_ar),
            "norm_vs_ar": sum(ratio) / len(ratio),
        })  # fmt: skip
    lm.eval()
    return rows


def bound_rows(name: str, lm: FlowLM, batches: list[torch.Tensor], seconds: float, args) -> dict:
    """Validation bits/byte of the AR, ``block(B)`` and synchronous bounds."""
    length = batches[0].shape[1]
    row: dict = {"regime": name, "train_s": seconds}
    gen = torch.Generator().manual_seed(args.seed + 1)
    kw = dict(bytes_per_token=lm.bytes_per_token, repeats=args.repeats, generator=gen)
    row["ar"] = bound_bpb(lm, batches, Block(size=1), length, **kw)[0]
    for m in args.eval_steps:
        block = Block(size=args.block)
        row[f"block{args.block}x{m}"] = bound_bpb(lm, batches, block, -(-length // args.block) * m,
                                                  **kw)[0]  # fmt: skip
        row[f"sync{m}"] = bound_bpb(lm, batches, "synchronous", m, **kw)[0]
    return row


def parse(argv=None) -> argparse.Namespace:
    """Command-line options (``--quick`` shrinks everything to a smoke test)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--regimes", default="ar,evo-plain,evo")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="a regime NAME (list it in --regimes): Evo's fields (or those of the preset named "
        'by "base") replaced by a JSON object, e.g. w02=\'{"bound_weights": {"block0": 0.2}}\'',
    )
    training_arguments(p, "runs/balance", steps=400, length=128, lr=2e-3, repeats=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--d-embed", type=int, default=32, help="latent width of every network")
    p.add_argument("--schedule", default="cosine", help="noise schedule of every model")
    p.add_argument("--self-condition", action="store_true", help="self-conditioned networks")
    p.add_argument("--output-prior", action="store_true", help="networks with the output prior")
    p.add_argument("--steps-per-block", type=int, default=0, help="0: the regime's own")
    p.add_argument("--eval-steps", type=int, nargs="+", default=[16])
    p.add_argument("--grad-batches", type=int, default=2, help="0: skip the gradient rows")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.length, args.batch, args.width, args.layers = 3, 16, 4, 32, 1
        args.heads, args.steps_per_block, args.eval_steps = 2, 2, [2]
        args.val_batches, args.grad_batches, args.block = 1, 1, 4
    named = set(REGIMES) | {v.split("=", 1)[0] for v in args.variant}
    unknown = set(args.regimes.split(",")) - named
    if unknown:
        p.error(f"unknown regime(s) {sorted(unknown)}; valid: {', '.join(sorted(named))}")
    return args


def main(argv=None) -> int:
    """Train each regime, measure, write ``balance.csv``, ``gradients.csv``, ``balance.md``."""
    args = parse(argv)
    data = dict(corpus="stdlib", tokenizer="byte", seq_len=args.length, batch_size=args.batch,
                max_bytes=4_000_000, train_samples_per_epoch=max(1000, args.steps * args.batch),
                eval_samples=args.val_batches * args.batch)  # fmt: skip
    dm = datamodule(None, data)
    dm.setup("fit")
    val = val_batches(dm, args.val_batches)
    bounds, grads = [], []
    for name in args.regimes.split(","):
        lm = build(name, dm, args)
        seconds = train(name, lm, dm, args)
        bounds.append(bound_rows(name, lm, val, seconds, args))
        if args.grad_batches > 0:  # 0: bounds only
            grads += gradient_rows(name, lm, val[: args.grad_batches], args)
        print(json.dumps(bounds[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "balance.csv", bounds)
    write_csv(args.out / "gradients.csv", grads)
    head = [f"# Evo's balance at {args.steps} steps ({hardware()})", "",
            "Validation bits/byte (lower is better):", ""]  # fmt: skip
    lines = head + md_table(bounds)
    if grads:
        lines += ["", "Gradients of each drawn bound:", "", *md_table(grads)]
    (args.out / "balance.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
