"""The adaLN up-projection's backward: ``widening_linear`` against ``nn.Linear``, side by side.

Every block modulates each token through ``cond_rank -> 6 d_model``
(:class:`~flowtext.nn.layers.LowRankModulation`). On the CPU, PyTorch's ``linear`` backward runs
that narrow-input product's two gradient GEMMs in a slow layout;
:func:`~flowtext.nn.layers.widening_linear` runs them transposed (same values). Timed here, in
interleaved rounds (best round kept, CPU time of the process):

* ``up``: the up-projection alone, forward and backward, on ``[batch, 2 seq_len, cond_rank]``;
* ``step``: one Evo training step's forward and backward on a ``block(8)`` bound with 16 steps per
  block (two streams, per-token times), from ``experiments/configs/evo-tiny.yaml``'s model.

    OMP_NUM_THREADS=1 python benchmarks/modulation.py [--rounds 6]
    python benchmarks/modulation.py --quick
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

import flowtext.nn.layers as layers
from flowtext import Evo
from flowtext.nn import FlowTransformerConfig
from flowtext.regime import TrainingRegime, block_bound


def best_time(fn: Callable[[], None], iters: int) -> float:
    """CPU seconds per call of ``fn`` over ``iters`` calls, after one untimed call."""
    fn()
    t0 = time.process_time()
    for _ in range(iters):
        fn()
    return (time.process_time() - t0) / iters


def cases(args) -> dict[str, Callable[[], None]]:
    """The two timed workloads, each reading ``layers.widening_linear`` at call time."""
    gen = torch.Generator().manual_seed(0)
    cfg = FlowTransformerConfig(
        max_len=args.seq_len, d_model=args.d_model, n_layers=args.layers, n_heads=4,
        d_embed=32, cond_dim=64, cond_rank=args.rank,
    )  # fmt: skip
    up = torch.nn.Linear(args.rank, 6 * args.d_model)
    x = torch.randn(args.batch, 2 * args.seq_len, args.rank, generator=gen, requires_grad=True)

    def up_step() -> None:
        layers.widening_linear(x, up).sum().backward()

    lm = Evo(net=cfg, regime=TrainingRegime.evo())
    tokens = torch.randint(0, 256, (args.batch, args.seq_len), generator=gen)
    bound = block_bound(8, 16, args.seq_len)

    def lm_step() -> None:
        lm.zero_grad(set_to_none=True)
        lm.bound_loss(tokens, bound)[0].backward()

    return {"up": up_step, "step": lm_step}


def main(argv=None) -> None:
    """Print each workload's time with both up-projections and their ratio."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny sizes, one round (the tests)")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.seq_len, args.d_model, args.layers, args.rounds = 2, 16, 32, 1, 1
    fast, plain = layers.widening_linear, lambda x, linear: linear(x)
    for name, fn in cases(args).items():
        times: dict[str, list[float]] = {"widening_linear": [], "nn.Linear": []}
        for _ in range(args.rounds):
            for label, impl in (("widening_linear", fast), ("nn.Linear", plain)):
                layers.widening_linear = impl
                times[label].append(best_time(fn, args.iters))
        layers.widening_linear = fast
        f, s = min(times["widening_linear"]), min(times["nn.Linear"])
        print(f"{name}: widening_linear {f * 1e3:.2f} ms, nn.Linear {s * 1e3:.2f} ms, "
              f"nn.Linear / widening_linear = {s / f:.3f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
