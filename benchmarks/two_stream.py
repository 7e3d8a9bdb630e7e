"""Two CPU fast paths of the two-stream training step, each on and off, side by side.

A ``block(B)`` bound trains on a ``2L`` sequence (clean stream + noisy stream, theory §3) with
per-token times. Two of its costs have a fast path on the CPU, each with the same values:

* ``widening_linear``: the adaLN up-projection ``cond_rank -> 6 d_model``
  (:func:`~flowtext.nn.layers.widening_linear`) runs its backward's two GEMMs transposed, where
  PyTorch's ``linear`` backward runs them in a slow layout;
* ``split``: the SDPA layout ``"split"`` (:func:`~flowtext.attention.sdpa_layout`) attends the
  clean half causally and masks only the noisy half's rows, instead of one dense ``2L x 2L`` mask.

Timed in interleaved rounds (best round kept, CPU time of the process): one Evo training step's
forward and backward on ``block(8)`` with 16 steps per block (the ``evo-tiny`` model's sizes),
with both fast paths, with each one off, and with both off; each line prints the ratio to both on.

    OMP_NUM_THREADS=1 python benchmarks/two_stream.py [--rounds 6 --block 8]
    python benchmarks/two_stream.py --quick
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

import flowtext.attention.reference as reference
import flowtext.nn.layers as layers
from flowtext import Evo
from flowtext.nn import FlowTransformerConfig
from flowtext.regime import TrainingRegime, block_bound

OFF: dict[str, tuple[object, str, Callable]] = {
    "widening_linear": (layers, "widening_linear", lambda x, linear: linear(x)),
    "split": (reference, "_split_flag", lambda t_q, *_: t_q.new_zeros((), dtype=torch.bool)),
}
"""Fast path -> (module, attribute, the plain replacement that turns it off)."""


def best_time(fn: Callable[[], None], iters: int) -> float:
    """CPU seconds per call of ``fn`` over ``iters`` calls, after one untimed call."""
    fn()
    t0 = time.process_time()
    for _ in range(iters):
        fn()
    return (time.process_time() - t0) / iters


def evo_step(args) -> Callable[[], None]:
    """One Evo training step (forward + backward) on the ``block(args.block)`` bound."""
    cfg = FlowTransformerConfig(
        max_len=args.seq_len, d_model=args.d_model, n_layers=args.layers, n_heads=4,
        d_embed=32, cond_dim=64, cond_rank=args.rank,
    )  # fmt: skip
    lm = Evo(net=cfg, regime=TrainingRegime.evo())
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (args.batch, args.seq_len), generator=gen)
    bound = block_bound(args.block, 16, args.seq_len)

    def step() -> None:
        lm.zero_grad(set_to_none=True)
        lm.bound_loss(tokens, bound)[0].backward()

    return step


def main(argv=None) -> None:
    """Print the step's time under each setting and its ratio to both fast paths on."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--block", type=int, default=8)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny sizes, one round (the tests)")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.seq_len, args.d_model, args.layers, args.rounds = 2, 16, 32, 1, 1
    step = evo_step(args)
    saved = {name: getattr(module, attr) for name, (module, attr, _) in OFF.items()}
    settings = {"both on": (), **{f"{n} off": (n,) for n in OFF}, "both off": tuple(OFF)}
    times: dict[str, list[float]] = {s: [] for s in settings}
    try:
        for _ in range(args.rounds):
            for setting, off in settings.items():
                for name, (module, attr, plain) in OFF.items():
                    setattr(module, attr, plain if name in off else saved[name])
                times[setting].append(best_time(step, args.iters))
    finally:
        for name, (module, attr, _) in OFF.items():
            setattr(module, attr, saved[name])
    base = min(times["both on"])
    for setting, ts in times.items():
        print(f"{setting}: {min(ts) * 1e3:.1f} ms, ratio to both on {min(ts) / base:.3f}")


if __name__ == "__main__":
    main()
