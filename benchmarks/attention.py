"""Benchmark of the fused visibility-attention kernel against SDPA and FlexAttention.

Usage (one command, on a CUDA machine):

    python benchmarks/attention.py               # L = 1k, 4k, 16k; d = 64, 128; bf16
    python benchmarks/attention.py --quick       # a tiny smoke run (also works on CPU)
    python benchmarks/attention.py --lengths 4096 --dims 128 --layouts evo two-stream \\
        --flex-layouts two-stream --csv outputs/gpu/attention.csv

Prints, per layout (causal, block-causal, two-stream, Evo single-stream) and shape: forward,
backward and forward+backward time and TFLOP/s, and peak memory, for

* ``kernel``: :func:`flowtext.kernels.visibility_attention` with reused
  :func:`~flowtext.kernels.tile_summaries` (as every layer of a forward pass reuses them);
* ``sdpa``: PyTorch SDPA with the dense boolean mask of :func:`flowtext.attention.visibility_mask`
  (built once and reused);
* ``flex``: FlexAttention with the same visibility as a ``mask_mod`` and a BlockMask built once
  and reused (compiled; only for ``--flex-layouts``);

plus two dense (unmasked) baselines: ``kernel-dense`` (the kernel with every pair visible) and
``sdpa-flash`` (SDPA without a mask, FlashAttention backend). A ``prep`` row per method gives the
time to build what is reused (summaries, dense mask, BlockMask), once per batch in training. Each
case also checks the kernel's forward against SDPA (``err``, max abs difference).

Conventions: FLOPs count only *visible* (query, key) pairs, ``4 * D`` per pair and head forward
and ``2.5x`` that backward (the FlashAttention convention). Peak memory is the extra CUDA memory of
one forward+backward above the inputs. ``ratio`` is the method's time over the kernel's time for
the same pass (> 1: the kernel is faster); the dense rows compare with ``kernel-dense``.

``--csv PATH`` also writes one row per measurement (layout, L, d, dtype, backend, pass, ms,
TFLOP/s, ratio, peak MiB, err), flushed row by row so a timed-out run keeps what it measured.

On CPU (no CUDA) the kernel runs in Triton's interpreter; only ``--quick`` makes sense there.
"""

from __future__ import annotations

import argparse
import csv
import os
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from flowtext.attention import LIVE, two_stream_layout, visibility_mask  # noqa: E402
from flowtext.kernels import tile_summaries, visibility_attention  # noqa: E402

LAYOUTS = ("evo", "two-stream", "causal", "block-causal")
PASSES = ("prep", "fwd", "bwd", "fwd+bwd")
FIELDS = (
    "layout",
    "L",
    "d",
    "dtype",
    "backend",
    "pass",
    "ms",
    "tflops",
    "ratio",
    "peak_mib",
    "err",
)


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


def _flex(device):
    """(prepare, attend) of FlexAttention with the visibility rule as a ``mask_mod``."""
    # The bwd timing re-runs one graph's backward (retain_graph); donated buffers forbid that.
    import torch._functorch.config as functorch_config
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if hasattr(functorch_config, "donated_buffer"):
        functorch_config.donated_buffer = False
    flex = torch.compile(flex_attention, dynamic=False)

    def prepare(t, o):
        def mask_mod(b, h, qi, ki):
            tq, oq, tk, ok = t[b, qi], o[b, qi], t[b, ki], o[b, ki]
            committed = (tk == 0) & ((ok < oq) | ((ok == oq) & (tq == 0)))
            live = (tq > 0) & (tk > 0) & (tk < 1) & (ok == oq)
            return committed | live | (qi == ki)

        return create_block_mask(mask_mod, t.shape[0], None, t.shape[1], t.shape[1], device)

    return prepare, lambda q, k, v, block_mask: flex(q, k, v, block_mask=block_mask)


def methods(layout, device, flex_layouts):
    """name -> (prepare(t, o), attend(q, k, v, prepared)); what ``prepare`` builds is reused."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if layout == "dense":
        return {
            "kernel-dense": (_kernel_prepare, _kernel),
            "sdpa-flash": (lambda t, o: None, lambda q, k, v, _: sdpa(q, k, v)),
        }
    out = {
        "kernel": (_kernel_prepare, _kernel),
        "sdpa": (
            lambda t, o: visibility_mask(t, o, t, o)[:, None],
            lambda q, k, v, mask: sdpa(q, k, v, attn_mask=mask),
        ),
    }
    if device.type == "cuda" and layout in flex_layouts:
        out["flex"] = _flex(device)
    return out


def _kernel_prepare(t, o):
    s = tile_summaries(t, o, t, o)
    s.pattern  # noqa: B018  (the autotuning key, computed once with the summaries)
    return t, o, s


def _kernel(q, k, v, prepared):
    t, o, s = prepared
    return visibility_attention(q, k, v, t, o, t, o, summaries=s)


def measure(prepare, attend, q, k, v, t, o, timer, reps):
    """``{pass: ms}`` plus ``peak`` (MiB) and ``out`` (the forward output), or an error string."""
    g = torch.randn_like(q)
    cuda = q.device.type == "cuda"
    try:
        prepared = prepare(t, o)
        out = attend(q, k, v, prepared)  # warm-up / compile / autotune
        out.backward(g)
        result = {"prep": timer(lambda: prepare(t, o), reps), "out": out.detach()}
        result["fwd"] = timer(lambda: attend(q, k, v, prepared), reps)
        out = attend(q, k, v, prepared)
        result["bwd"] = timer(lambda: out.backward(g, retain_graph=True), reps)
        result["fwd+bwd"] = timer(lambda: attend(q, k, v, prepared).backward(g), reps)
        result["peak"] = float("nan")
        if cuda:
            del out
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            attend(q, k, v, prepared).backward(g)
            torch.cuda.synchronize()
            result["peak"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        return result
    except torch.cuda.OutOfMemoryError:
        return "OOM"
    except Exception as e:  # a baseline that cannot run this case is reported, not fatal
        return f"{type(e).__name__}: {str(e).splitlines()[0][:60]}"
    finally:
        for x in (q, k, v):
            x.grad = None
        if cuda:
            torch.cuda.empty_cache()


def rows_of(case, results, flops_fwd):
    """CSV rows of one case: every method and pass, with ratios against the kernel."""
    base = results.get("kernel", results.get("kernel-dense"))
    ref_out = next(
        (r["out"] for m, r in results.items() if "sdpa" in m and isinstance(r, dict)), None
    )
    rows = []
    for method, r in results.items():
        if isinstance(r, str):
            rows.append({**case, "backend": method, "pass": "error", "err": r})
            continue
        err = ""
        if method.startswith("kernel") and ref_out is not None:
            err = f"{(r['out'].float() - ref_out.float()).abs().max().item():.3g}"
        for name in PASSES:
            flops = {"prep": 0, "fwd": 1, "bwd": 2.5, "fwd+bwd": 3.5}[name] * flops_fwd
            ratio = r[name] / base[name] if isinstance(base, dict) else float("nan")
            rows.append(
                {**case, "backend": method, "pass": name, "ms": f"{r[name]:.4f}",
                 "tflops": f"{flops / r[name] / 1e9:.2f}" if flops else "",
                 "ratio": f"{ratio:.3f}", "peak_mib": f"{r['peak']:.1f}", "err": err}
            )  # fmt: skip
    return rows


def print_rows(rows):
    for row in rows:
        if row["pass"] == "error":
            print(f"{row['layout']:13}{row['L']:>6}{row['d']:>5} {row['backend']:13}{row['err']}")
            continue
        print(
            f"{row['layout']:13}{row['L']:>6}{row['d']:>5} {row['backend']:13}{row['pass']:>8}"
            f" {row['ms']:>11}{row['tflops']:>9}{row['ratio']:>8}{row['peak_mib']:>9}  {row['err']}"
        )


def cases(args, device):
    """``(length, d, layout)`` in the order given (layouts first: the most important first)."""
    for layout in [*args.layouts, "dense"]:
        for length in args.lengths:
            for d in args.dims:
                yield length, d, layout


def run_case(length, d, layout, args, device, dtype, timer, gen):
    b = max(1, args.tokens // length)
    h = max(1, 2048 // d) if device.type == "cuda" else 2
    q, k, v = (
        torch.randn(b, h, length, d, device=device, dtype=dtype).mul_(0.5).requires_grad_()
        for _ in range(3)
    )
    t, o = make_layout(layout, b, length, device, gen)
    flops_fwd = 4 * d * h * visible_pairs(t, o)
    reps = 1 if device.type == "cpu" else 10
    results = {
        name: measure(prepare, attend, q, k, v, t, o, timer, reps)
        for name, (prepare, attend) in methods(layout, device, args.flex_layouts).items()
    }
    case = {"layout": layout, "L": length, "d": d, "dtype": str(dtype).split(".")[-1]}
    return rows_of(case, results, flops_fwd)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke configuration")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--tokens", type=int, default=16384, help="batch * length per case")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    parser.add_argument(
        "--flex-layouts", nargs="*", default=list(LAYOUTS), help="layouts also run with Flex"
    )
    parser.add_argument("--csv", default=None, help="also write one row per measurement here")
    return parser.parse_args()


def main():
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.quick or device.type == "cpu":
        args.lengths, args.dims, args.tokens = [64], [32], 64
        if device.type == "cuda":
            args.lengths, args.tokens = [1024], 2048
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (Triton interpreter)"
    print(f"device: {name}; dtype: {dtype}; torch {torch.__version__}")
    print("FLOPs: visible pairs only (4*D per pair and head fwd, 2.5x bwd); ratio = method time /")
    print("kernel time (> 1: kernel faster); prep = building the reused summaries / mask.\n")
    print(f"{'layout':13}{'L':>6}{'d':>5} {'backend':13}{'pass':>8} {'ms':>11}{'TFLOP/s':>9}"
          f"{'ratio':>8}{'peak MiB':>9}  err")  # fmt: skip
    sink = open(args.csv, "w", newline="") if args.csv else None  # noqa: SIM115
    writer = csv.DictWriter(sink, FIELDS) if sink else None
    if writer:
        writer.writeheader()
    timer, gen, summary = Timer(device), torch.Generator().manual_seed(0), []
    for length, d, layout in cases(args, device):
        rows = run_case(length, d, layout, args, device, dtype, timer, gen)
        print_rows(rows)
        summary += [r for r in rows if r["pass"] in ("fwd", "fwd+bwd") and r.get("ratio")]
        if writer:
            writer.writerows(rows)
            sink.flush()
    print("\nratios (method time / kernel time, > 1: kernel faster)")
    for r in summary:
        if not r["backend"].startswith("kernel"):
            print(f"  {r['layout']:13} L={r['L']:<6} d={r['d']:<4} {r['pass']:8} "
                  f"{r['backend']:11} {r['ratio']}")  # fmt: skip


if __name__ == "__main__":
    main()
