"""Decoding speed and sample quality of every policy on one checkpoint (a script, not a test).

For each policy it decodes ``--length`` tokens after a prompt, at batch 1 and batch 16, and
prints tokens/s, tokens per network evaluation (NFE) and a quality measure: the bits per byte
of the samples under the model's own AR bound, ``two_stream_loss(net, tokens, schedule,
block_size=1)``, which is the exact AR negative log-likelihood (theory §4), over the generated
tokens only. Lower means the samples are more likely under the model's AR reading; it is not a
diversity measure (greedy decoding scores best), so every row samples at the same temperature.

Usage::

    python benchmarks/decoding.py --ckpt runs/evo/last.ckpt --length 64
    python benchmarks/decoding.py --quick        # random-init evo-tiny network, runs in seconds

Rows: ``ar+cache`` (AR with the exact KV cache, the reference), ``block``, ``diagonal``,
``synchronous``, three ``adaptive`` settings, two ``speculative`` ones (the AR law, drafts from
the noisy stream), and the cache-less floors ``ar (no cache)`` and
``sync refine (no cache)`` (full-sequence refinement, one token's worth of steps per token).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flowtext.decoding import generate  # noqa: E402
from flowtext.objectives import two_stream_loss  # noqa: E402
from flowtext.schedules import get as get_schedule  # noqa: E402

LN2 = math.log(2.0)
EVO_TINY = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "evo-tiny.yaml"
"""The ``--quick`` model is this config's network (on the byte vocabulary), at random init."""


def policies(length: int) -> list[tuple[str, dict]]:
    """(label, generate kwargs) of every benchmarked configuration."""
    return [
        ("ar+cache", dict(policy="autoregressive", steps=length)),
        (
            "block(8), 4 steps/block",
            dict(policy="block", policy_kwargs={"size": 8}, steps=length // 2),
        ),
        (
            "diagonal(0.25), L/2 steps",
            dict(policy="diagonal", policy_kwargs={"width": 0.25}, steps=length // 2),
        ),
        ("synchronous, L/2 steps", dict(policy="synchronous", steps=length // 2)),
        (
            "adaptive thr=0.9",
            dict(policy="adaptive", policy_kwargs={"threshold": 0.9}, steps=length),
        ),
        (
            "adaptive thr=0.7 rate=1",
            dict(policy="adaptive", policy_kwargs={"threshold": 0.7, "rate": 1.0}, steps=length),
        ),
        (
            "adaptive thr=0.5 rate=1 w=32",
            dict(
                policy="adaptive",
                policy_kwargs={"threshold": 0.5, "rate": 1.0, "window": 32},
                steps=length,
            ),
        ),
        ("speculative draft=4", dict(policy="speculative", policy_kwargs={"draft": 4})),
        ("speculative draft=2", dict(policy="speculative", policy_kwargs={"draft": 2})),
        ("ar (no cache)", dict(policy="autoregressive", steps=length, use_cache=False)),
        ("sync refine (no cache)", dict(policy="synchronous", steps=length, use_cache=False)),
    ]


def score_bpb(net, schedule, prompt: list[int], tokens: list[list[int]], bytes_per_token: float):
    """Bits per byte of the generated tokens under the model's exact AR bound."""
    seqs = torch.tensor([prompt + row for row in tokens], dtype=torch.long)
    with torch.no_grad():
        nats = two_stream_loss(net, seqs, schedule, block_size=1).nats[:, len(prompt) :]
    return float(nats.mean()) / LN2 / bytes_per_token


def build(args):
    if args.ckpt:
        from flowtext.checkpoint import load_checkpoint

        lm, tok, note = load_checkpoint(args.ckpt)
        prompt = tok.encode(args.prompt)
        bpt = float(getattr(tok, "bytes_per_token", 1.0) or 1.0)
        return lm.net, lm.schedule, prompt, bpt, f"{args.ckpt} ({note})"
    from flowtext.data import ByteTokenizer
    from flowtext.nn import FlowTransformer, FlowTransformerConfig

    torch.manual_seed(0)
    sizes = yaml.safe_load(EVO_TINY.read_text())["model"]["init_args"]["net"]
    vocab = ByteTokenizer().vocab_size
    cfg = FlowTransformerConfig(vocab_size=vocab, attention_backend="sdpa", **sizes)
    net = FlowTransformer(cfg).eval()
    with torch.no_grad():  # a little structure, so the readout is not uniform
        net.readout.weight.mul_(8)
    prompt = list(b"def main():\n    ")
    return (
        net,
        get_schedule("cosine"),
        prompt,
        1.0,
        "random-init quick model (numbers say nothing of quality)",
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default=None)
    p.add_argument("--quick", action="store_true", help="random-init smoke mode")
    p.add_argument("--prompt", default="def main():\n    ")
    p.add_argument("--length", type=int, default=None)
    p.add_argument("--batches", default="1,16")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (best is kept)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if not args.ckpt and not args.quick:
        p.error("give --ckpt PATH or --quick")
    torch.set_num_threads(args.threads)
    length = args.length or (32 if args.quick else 64)
    net, schedule, prompt, bpt, what = build(args)
    print(
        f"model: {what}; prompt {len(prompt)} tokens; length {length}; "
        f"temperature {args.temperature}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads\n"
    )
    batches = [int(b) for b in args.batches.split(",")]
    header = (
        "| policy | "
        + " | ".join(f"B={b} tok/s | B={b} tok/NFE | B={b} bpb" for b in batches)
        + " |"
    )
    print(header)
    print("|" + "---|" * (1 + 3 * len(batches)))
    pols = policies(length)
    cells: dict[str, list[str]] = {label: [] for label, _ in pols}
    for b in batches:
        common = dict(prompt=[prompt] * b, length=length, temperature=args.temperature)
        for _, kw in pols:  # warm-up
            generate(net, schedule, **{**common, **kw})
        best = {label: math.inf for label, _ in pols}
        last = {}
        for _ in range(args.repeats):  # round-robin, so load bursts hit every policy alike
            for label, kw in pols:
                gens = [torch.Generator().manual_seed(100 + i) for i in range(b)]
                t0 = time.perf_counter()
                last[label] = generate(net, schedule, generator=gens, **common, **kw)
                best[label] = min(best[label], time.perf_counter() - t0)
        ref = last["ar+cache"].stats.tokens / best["ar+cache"]
        for label, _ in pols:
            res = last[label]
            tps = res.stats.tokens / best[label]
            bpb = score_bpb(net, schedule, prompt, res.tokens, bpt)
            cells[label].append(
                f"{tps:.0f} ({tps / ref:.2f}x) | {res.stats.tokens_per_eval:.2f} | {bpb:.3f}"
            )
    for label, _ in pols:
        print(f"| {label} | " + " | ".join(cells[label]) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
