"""Benchmark of the fused visibility-attention kernel against SDPA and FlexAttention.

Usage (one command, on a CUDA machine):

    python benchmarks/attention.py               # L = 1k, 4k, 16k; d = 64, 128; bf16
    python benchmarks/attention.py --quick       # a tiny smoke run (also works on CPU)

Prints, per layout (causal, block-causal, two-stream, Evo single-stream) and shape: forward,
backward and forward+backward time and TFLOP/s, and peak memory, for

* ``kernel``: :func:`flowtext.kernels.visibility_attention` (mask computed in the kernel);
* ``sdpa``: PyTorch SDPA with the dense boolean mask of :func:`flowtext.attention.visibility_mask`;
* ``flex``: FlexAttention with the same visibility as a ``mask_mod`` (compiled);

plus two dense (unmasked) baselines: ``kernel-dense`` (the kernel with every pair visible) and
``sdpa-flash`` (SDPA without a mask, FlashAttention backend), and the ratios
kernel / flex and kernel / sdpa of forward+backward throughput.

Conventions: FLOPs count only *visible* (query, key) pairs, ``4 * D`` per pair and head forward
and ``2.5x`` that backward (the FlashAttention convention). Masks change every batch, so the
``fwd`` and ``fwd+bwd`` times of ``sdpa`` and ``flex`` include building the dense mask / the
BlockMask; ``bwd`` is the backward alone. Peak memory is the extra CUDA memory of one
forward+backward above the inputs.

On CPU (no CUDA) the kernel runs in Triton's interpreter; only ``--quick`` makes sense there.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from flowtext.attention import LIVE, sdpa_attention, two_stream_layout, visibility_mask  # noqa: E402
from flowtext.kernels import visibility_attention  # noqa: E402

LAYOUTS = ("causal", "block-causal", "two-stream", "evo")


def make_layout(name, b, length, device, gen):
    """Times and orders ``[B, L]`` of one layout (two-stream: L/2 clean + L/2 noisy tokens)."""
    block = max(1, min(128, length // 8))  # block size of block-causal and two-stream
    idx = torch.arange(length)
    if name == "causal":
        t, o = torch.zeros(b, length), idx.expand(b, length)
    elif name == "block-causal":
        t, o = torch.zeros(b, length), (idx // block).expand(b, length)
    elif name == "two-stream":
        half = length // 2
        ids = (torch.arange(half) // block).expand(b, half)
        t_noisy = torch.rand(b, half, generator=gen).clamp_min(1e-3)
        t, o = two_stream_layout(ids, t_noisy)
    elif name == "evo":  # committed (random orders), live (0 < t < 1) and pure-noise tokens
        u = torch.rand(b, length, generator=gen)
        t = torch.rand(b, length, generator=gen).clamp(1e-3, 0.999)
        t[u < 0.5] = 0.0
        t[u > 0.9] = 1.0
        o = torch.randint(0, 64, (b, length), generator=gen)
        o[t > 0] = LIVE
    elif name == "dense":  # every pair visible: all live, one group, informative
        t, o = torch.full((b, length), 0.5), torch.zeros(b, length, dtype=torch.long)
    else:
        raise ValueError(name)
    return t.contiguous().to(device), o.contiguous().to(device)


def visible_pairs(t, o, chunk=1024):
    """Number of visible (query, key) pairs, from the reference mask in chunks of queries."""
    total, length = 0, t.shape[1]
    for s in range(0, length, chunk):
        e = min(s + chunk, length)
        tq, oq = t[:, s:e], o[:, s:e]
        # Queries are the last keys of the reference: keys [0, e) directly (self included), and
        # keys [e, L) placed before the queries (their positions only matter for the self key).
        total += int(visibility_mask(tq, oq, t[:, :e], o[:, :e]).sum())
        if e < length:
            tk, ok = torch.cat([t[:, e:], tq], 1), torch.cat([o[:, e:], oq], 1)
            total += int(visibility_mask(tq, oq, tk, ok)[:, :, : length - e].sum())
    return total


class Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn, reps):
        if self.cuda:
            import triton.testing

            return triton.testing.do_bench(fn, warmup=10, rep=reps * 10)
        fn()
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - start) / reps * 1e3


def methods(device):
    """name -> forward(q, k, v, t, o) building whatever it needs from the per-token vectors."""
    out = {
        "kernel": lambda q, k, v, t, o: visibility_attention(q, k, v, t, o, t, o),
        "sdpa": lambda q, k, v, t, o: sdpa_attention(q, k, v, t, o, t, o),
    }
    if device.type == "cuda":
        # The bwd timing re-runs one graph's backward (retain_graph); donated buffers forbid that.
        import torch._functorch.config as functorch_config
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        if hasattr(functorch_config, "donated_buffer"):
            functorch_config.donated_buffer = False
        flex = torch.compile(flex_attention, dynamic=False)

        def flex_fn(q, k, v, t, o):
            def mask_mod(b, h, qi, ki):
                tq, oq, tk, ok = t[b, qi], o[b, qi], t[b, ki], o[b, ki]
                committed = (tk == 0) & ((ok < oq) | ((ok == oq) & (tq == 0)))
                live = (tq > 0) & (tk > 0) & (tk < 1) & (ok == oq)
                return committed | live | (qi == ki)

            bm = create_block_mask(mask_mod, t.shape[0], None, t.shape[1], t.shape[1], device)
            return flex(q, k, v, block_mask=bm)

        out["flex"] = flex_fn
    return out


def measure(fn, q, k, v, t, o, timer, reps):
    """(fwd ms, bwd ms, fwd+bwd ms, peak MiB) or an error string."""
    g = torch.randn_like(q)
    cuda = q.device.type == "cuda"
    try:
        out = fn(q, k, v, t, o)  # warm-up / compile / autotune
        out.backward(g)
        fwd = timer(lambda: fn(q, k, v, t, o), reps)
        out = fn(q, k, v, t, o)
        bwd = timer(lambda: out.backward(g, retain_graph=True), reps)
        both = timer(lambda: fn(q, k, v, t, o).backward(g), reps)
        peak = float("nan")
        if cuda:
            del out
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn(q, k, v, t, o).backward(g)
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        return fwd, bwd, both, peak
    except torch.cuda.OutOfMemoryError:
        return "OOM"
    except Exception as e:  # a baseline that cannot run this case is reported, not fatal
        return f"{type(e).__name__}: {str(e).splitlines()[0][:60]}"
    finally:
        for x in (q, k, v):
            x.grad = None
        if cuda:
            torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke configuration")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--tokens", type=int, default=16384, help="batch * length per case")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.quick or device.type == "cpu":
        args.lengths, args.dims, args.tokens = [64], [32], 64
        if device.type == "cuda":
            args.lengths, args.tokens = [1024], 2048
    reps = 3 if device.type == "cpu" else 10
    timer = Timer(device)
    gen = torch.Generator().manual_seed(0)
    fns = methods(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (Triton interpreter)"
    print(f"device: {name}; dtype: {dtype}; torch {torch.__version__}")
    print("FLOPs: visible pairs only (4*D per pair and head fwd, 2.5x bwd); mask building is")
    print("included in sdpa/flex fwd and fwd+bwd (masks change per batch).\n")
    header = (
        f"{'layout':13}{'L':>6}{'d':>5}{'density':>8} {'method':13}"
        f"{'fwd ms':>9}{'fwd TF/s':>10}{'bwd TF/s':>10}{'f+b TF/s':>10}{'peak MiB':>10}"
    )
    print(header)
    print("-" * len(header))
    ratios = []
    for length in args.lengths:
        b = max(1, args.tokens // length)
        for d in args.dims:
            h = max(1, 2048 // d) if device.type == "cuda" else 2
            q, k, v = (
                torch.randn(b, h, length, d, device=device, dtype=dtype).mul_(0.5).requires_grad_()
                for _ in range(3)
            )
            for layout in [*args.layouts, "dense"]:
                t, o = make_layout(layout, b, length, device, gen)
                pairs = visible_pairs(t, o)
                flops_fwd = 4 * d * h * pairs
                density = pairs / (b * length * length)
                rows = fns
                if layout == "dense":
                    rows = {"kernel-dense": fns["kernel"], "sdpa-flash": _sdpa_plain}
                result = {}
                for mname, fn in rows.items():
                    r = measure(fn, q, k, v, t, o, timer, reps)
                    result[mname] = r
                    if isinstance(r, str):
                        print(f"{layout:13}{length:>6}{d:>5}{density:>8.3f} {mname:13}{r}")
                        continue
                    fwd, bwd, both, peak = r
                    tf = [flops_fwd / ms / 1e9 for ms in (fwd,)]
                    tf += [2.5 * flops_fwd / bwd / 1e9, 3.5 * flops_fwd / both / 1e9]
                    print(
                        f"{layout:13}{length:>6}{d:>5}{density:>8.3f} {mname:13}{fwd:>9.3f}"
                        f"{tf[0]:>10.2f}{tf[1]:>10.2f}{tf[2]:>10.2f}{peak:>10.1f}"
                    )
                if layout != "dense":
                    mine = result.get("kernel")
                    for other in ("flex", "sdpa"):
                        theirs = result.get(other)
                        if isinstance(mine, tuple) and isinstance(theirs, tuple):
                            ratios.append((layout, length, d, other, theirs[2] / mine[2]))
    print("\nkernel speed-up in fwd+bwd time (>1: kernel faster)")
    for layout, length, d, other, ratio in ratios:
        print(f"  {layout:13} L={length:<6} d={d:<4} vs {other:5} {ratio:6.2f}x")


def _sdpa_plain(q, k, v, t, o):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v)


if __name__ == "__main__":
    main()
