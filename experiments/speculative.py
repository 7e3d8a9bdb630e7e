"""Self-speculative decoding on a trained Evo: tokens per evaluation, quality, draft agreement.

Reads a compare run's language-task checkpoints (``--ckpt-dir`` holding ``evo/`` and ``ar/``, as
``experiments/compare.py`` writes them) and prints three tables (docs/results.md §2d):

1. decoders side by side on the compare's validation prompts: the AR decoder and
   ``speculative`` at each ``--drafts`` size, at temperature 1 and greedy; NFE, tokens per
   evaluation, tokens/s and the AR model's bits per byte of the samples (the judge);
2. the same law, checked: the judge's mean and spread over ``--seeds`` sampling seeds, AR decoder
   against ``speculative`` (theory §3i says they are equal in law);
3. why the drafts hold as often as they do: teacher-forced on validation text, how well the
   slots' marginals at offsets ``0..draft-1`` agree with the AR conditionals (``1 - TV``, and the
   argmax agreement), and the drafts a pass keeps in expectation.

Usage::

    python -m experiments.speculative --ckpt-dir outputs/compare/RUN/lm
    python -m experiments.speculative --quick --ckpt-dir DIR   # seconds (the tests)
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from experiments import compare as C
from experiments.common import hardware, md_table, val_batches, write_csv


def decoder_rows(evo, judge, prompts, drafts, gen_len: int, seed: int, draft_t=None) -> list:
    """AR and speculative decoding of ``prompts`` at temperature 1 and greedy."""
    rows = []
    evo.lm.generate(prompt=prompts[:1], length=2)  # warm-up
    for greedy in (False, True):
        for policy, draft in [("autoregressive", None)] + [("speculative", d) for d in drafts]:
            res = evo.lm.generate(
                prompt=prompts, length=gen_len, greedy=greedy, policy=policy,
                policy_kwargs=None if draft is None else {"draft": draft,
                                                          "draft_temperature": draft_t},
                generator=torch.Generator().manual_seed(seed),
            )  # fmt: skip
            ids, _ = res.padded(0)
            seqs = torch.cat([prompts, ids], 1)
            rows.append({
                "decoder": policy if draft is None else f"speculative draft={draft}",
                "greedy": greedy, "nfe": res.stats.nfe,
                "tokens_per_eval": res.stats.tokens_per_eval,
                "tokens_per_s": res.stats.tokens_per_second,
                "judge_bpb": C.judge_bpb(judge, seqs, prompts.shape[1]),
            })  # fmt: skip
    return rows


def law_rows(evo, judge, prompts, draft: int, gen_len: int, seeds: int, draft_t=None) -> list:
    """The judge's score over ``seeds`` sampling seeds, AR decoder against speculative."""
    rows = []
    for policy in ("autoregressive", "speculative"):
        scores = []
        for seed in range(100, 100 + seeds):
            res = evo.lm.generate(
                prompt=prompts, length=gen_len, policy=policy,
                policy_kwargs={"draft": draft, "draft_temperature": draft_t}
                if policy == "speculative" else None,
                generator=torch.Generator().manual_seed(seed),
            )  # fmt: skip
            ids, _ = res.padded(0)
            scores.append(C.judge_bpb(judge, torch.cat([prompts, ids], 1), prompts.shape[1]))
        t = torch.tensor(scores)
        sd = float(t.std()) if len(scores) > 1 else 0.0
        rows.append({"decoder": policy, "seeds": seeds, "mean": float(t.mean()), "sd": sd})
    return rows


@torch.no_grad()
def agreement(evo, tokens: torch.Tensor, draft: int, start: int) -> dict:
    """Teacher-forced agreement of slot marginals with AR conditionals, per offset.

    For every prefix length ``n`` from ``start`` in steps of ``draft``, slots at ``t = 1`` for
    positions ``n .. n + draft - 1`` see ``x_{<n}``; their readouts ``q`` are compared with the
    AR conditionals ``p(x_j | x_{<j})`` of the true text.
    """
    net, sched = evo.lm.net, evo.lm.schedule
    b, length = tokens.shape
    emb = net.embed(tokens)
    pos = torch.arange(length).expand(b, length)
    p = torch.softmax(net(emb, emb.new_zeros(b, length), pos, pos).logits.float(), -1)
    tv, hit, kept = torch.zeros(draft), torch.zeros(draft), []
    gen, count = torch.Generator().manual_seed(0), 0
    for n in range(start, length - draft + 1, draft):
        noise = torch.randn(b, draft, emb.shape[-1], generator=gen, dtype=emb.dtype)
        z = torch.cat([emb[:, :n], sched.sigma(torch.ones(b, draft))[..., None] * noise], 1)
        t = torch.cat([emb.new_zeros(b, n), emb.new_ones(b, draft)], 1)
        o = torch.cat([torch.arange(n).expand(b, n), torch.full((b, draft), n)], 1)
        q = torch.softmax(net(z, t, o, torch.arange(n + draft).expand(b, -1)).logits.float(), -1)
        pj = p[:, n - 1 : n - 1 + draft]
        overlap = torch.minimum(pj, q[:, n:]).sum(-1)  # 1 - TV, [b, draft]
        tv += overlap.sum(0)
        hit += (pj.argmax(-1) == q[:, n:].argmax(-1)).float().sum(0)
        kept.append(torch.cumprod(overlap[:, 1:], 1).sum(1))  # slot 0 is the exact token
        count += b
    if not count:
        raise ValueError(f"no prefix of {length} tokens from {start} leaves {draft} slots")
    return {"one_minus_tv": (tv / count).tolist(), "argmax_agreement": (hit / count).tolist(),
            "expected_kept_drafts": float(torch.cat(kept).mean())}  # fmt: skip


def parse(argv=None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ckpt-dir", type=Path, required=True, help="holds evo/ and ar/ runs")
    p.add_argument("--drafts", default="2,4,8")
    p.add_argument("--seeds", type=int, default=8, help="sampling seeds of the law check")
    p.add_argument("--draft-temperature", type=float, default=None, help="the drafts' law")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--csv", type=Path, default=None, help="write the decoder table here")
    p.add_argument("--quick", action="store_true", help="few samples, short, 2 seeds")
    args = p.parse_args(argv)
    if args.quick:
        args.samples, args.prompt_len, args.gen_len, args.seeds = 2, 4, 6, 2
        args.drafts = "2,3"
    return args


def main(argv=None) -> int:
    """Run the three measurements and print them (JSON lines, and markdown tables)."""
    args = parse(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:  # load_run copies configs: not into the run
        evo = C.load_run("evo", args.ckpt_dir, Path(scratch) / "evo")
        judge = C.load_run("ar", args.ckpt_dir, Path(scratch) / "ar")
    batch = torch.cat(val_batches(evo.dm, 1 if args.quick else C.parse([]).val_batches))
    windows = batch[: args.samples, : args.prompt_len + args.gen_len]
    prompts, drafts = windows[:, : args.prompt_len], [int(d) for d in args.drafts.split(",")]
    dt = args.draft_temperature
    rows = decoder_rows(evo, judge, prompts, drafts, args.gen_len, args.seed, dt)
    law_draft = drafts[0] if args.quick else 4
    law = law_rows(evo, judge, prompts, law_draft, args.gen_len, args.seeds, dt)
    agree = agreement(evo, windows, max(drafts), args.prompt_len)
    keys = ["decoder", "greedy", "nfe", "tokens_per_eval", "tokens_per_s", "judge_bpb"]
    print(f"{args.ckpt_dir}; {hardware()}")
    print(*md_table(rows, keys), "", *md_table(law, ["decoder", "seeds", "mean", "sd"]), sep="\n")
    print(json.dumps({"agreement": agree}))
    if args.csv is not None:
        write_csv(args.csv, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
