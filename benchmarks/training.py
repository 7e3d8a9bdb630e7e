"""Training throughput: flowtext's AR special case and Evo against a plain causal Transformer.

Side by side in one run, same width, depth, MLP ratio, heads, batch and sequence length:

* ``plain``: ``torch.nn.TransformerEncoder`` (pre-norm, causal mask through SDPA), the baseline;
* ``flow/single``: the FlowTransformer on one stream of ``L`` tokens with per-token times
  (the diffusion / Evo single-stream regime);
* ``flow/AR two-stream``: the AR special case, ``2L`` tokens per pass (clean + noisy stream);
* ``Evo mixture``: ``Evo.training_loss`` (its mixture of regimes).

Prints forward+backward training tokens/s (clean tokens of the batch per second) and the ratios
against the plain model. Goals (issue 3): single-stream conditioning costs at most 10% over the
plain model; two-stream AR at most 2.2x per clean token.

    python benchmarks/training.py [--d-model 256 --layers 4 --seq-len 256 --batch 16 --iters 10]

``Evo mixture`` goes through the module's regime (:class:`flowtext.regime.TrainingRegime`) and
:meth:`~flowtext.lm.FlowLM.policy_bound`, so it also measures their overhead.
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

from flowtext import Evo, schedules
from flowtext.attention import BACKENDS, LIVE
from flowtext.nn import FlowTransformer, FlowTransformerConfig
from flowtext.objectives import two_stream_loss


class PlainCausalLM(torch.nn.Module):
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


def timeit(fn, params, iters, warmup=2, device=None, amp=False):
    """Seconds per optimizer step of ``fn`` (a loss closure), after ``warmup`` untimed steps."""
    opt = torch.optim.AdamW(params, lr=1e-4)
    device = torch.device("cpu") if device is None else device
    cuda = device.type == "cuda"

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = fn()
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--vocab", type=int, default=259)
    p.add_argument("--quick", action="store_true", help="tiny sizes, seconds")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument(
        "--backend",
        default="sdpa",
        choices=[b for b in BACKENDS if b != "auto"],
        help="attention backend of the FlowTransformer (triton: the fused kernel, CUDA)",
    )
    a = p.parse_args(argv)
    if a.quick:
        a.d_model, a.layers, a.seq_len, a.batch, a.iters = 64, 2, 64, 4, 2
    return a


def main(argv=None):
    a = parse(argv)
    dev = torch.device(a.device)
    torch.manual_seed(0)
    cfg = FlowTransformerConfig(
        vocab_size=a.vocab,
        max_len=a.seq_len,
        d_model=a.d_model,
        n_layers=a.layers,
        n_heads=a.heads,
        attention_backend=a.backend,
    )
    tokens = torch.randint(0, a.vocab, (a.batch, a.seq_len), device=dev)
    plain = PlainCausalLM(a.vocab, a.d_model, a.layers, a.heads, cfg.mlp_ratio, a.seq_len).to(dev)
    net = FlowTransformer(cfg).to(dev)
    sched = schedules.get("cosine")

    def plain_step():
        logits = plain(tokens)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())

    t_single = torch.rand(a.batch, a.seq_len, device=dev)
    o_single = torch.full((a.batch, a.seq_len), LIVE, device=dev)

    def flow_single():
        z = net.embed(tokens) + torch.randn(a.batch, a.seq_len, cfg.d_embed, device=dev)
        logits = net(z, t_single, o_single).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())

    def flow_ar():
        return two_stream_loss(net, tokens, sched, block_size=1).nats.mean()

    evo = Evo(net=cfg).to(dev)

    def evo_step():
        return evo.training_loss(tokens)[0]

    kw = {"iters": a.iters, "device": dev, "amp": a.amp}
    rows = [
        ("plain causal Transformer", timeit(plain_step, plain.parameters(), **kw)),
        ("flow, single stream (diffusion/Evo)", timeit(flow_single, net.parameters(), **kw)),
        ("flow, AR two-stream", timeit(flow_ar, net.parameters(), **kw)),
        ("Evo mixture (training_loss)", timeit(evo_step, evo.parameters(), **kw)),
    ]
    report(a, dev, rows, plain, net)


def report(a, dev: torch.device, rows: list[tuple[str, float]], plain, net) -> None:
    """Print the table of seconds per step, tokens/s and ratios against the plain model."""
    base = rows[0][1]
    n_params = (
        sum(q.numel() for q in plain.parameters()),
        sum(q.numel() for q in net.parameters()),
    )
    table = Table(
        title=f"training step, B={a.batch} L={a.seq_len} d={a.d_model} layers={a.layers} "
        f"({_where(dev)}, attention {a.backend}{', bf16 autocast' if a.amp else ''}, "
        f"torch {torch.__version__})"
    )
    for col in ("model", "s / step", "clean tokens/s", "time ratio vs plain"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for name, sec in rows:
        table.add_row(name, f"{sec:.4f}", f"{a.batch * a.seq_len / sec:,.0f}", f"{sec / base:.2f}x")
    Console().print(table)
    print(f"parameters: plain {n_params[0]:,}, flow {n_params[1]:,}")


def _where(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"CPU, {torch.get_num_threads()} thread(s)"


if __name__ == "__main__":
    main()
