"""The backbone gives the same outputs and gradients with the fused Triton backend as with SDPA.

Runs in a fresh process: without CUDA the kernel needs ``TRITON_INTERPRET=1`` set before Triton
defines it, which must not leak into other tests.
"""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)

SCRIPT = textwrap.dedent(
    """
    import torch
    from flowtext.attention import LIVE, two_stream_layout
    from flowtext.nn import FlowTransformer, FlowTransformerConfig

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    cfg = dict(vocab_size=11, max_len=24, d_model=32, n_layers=2, n_heads=2, d_embed=8,
               cond_dim=16, cond_rank=4)
    ref = FlowTransformer(FlowTransformerConfig(**cfg, attention_backend="sdpa")).to(dev)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.2 * torch.randn_like(p))
    fused = FlowTransformer(FlowTransformerConfig(**cfg, attention_backend="triton")).to(dev)
    fused.load_state_dict(ref.state_dict())

    b, n = 2, 10
    z = torch.randn(b, n, 8, device=dev)
    t = torch.rand(b, n, device=dev)
    t[:, :3], t[:, -2:] = 0.0, 1.0
    o = torch.where(t == 0, torch.arange(n, device=dev) % 2, LIVE)

    def check(a, c, what):
        err = (a - c).abs().max().item()
        assert err < 1e-4, f"{what}: {err}"

    outs = []
    for model in (ref, fused):
        out = model(z, t, o)
        x0 = model.x0_hat(out.logits)
        (out.logits.square().mean() + x0.square().mean() + out.difficulty.mean()).backward()
        outs.append((out, [p.grad.clone() for p in model.parameters()]))
    check(outs[0][0].logits, outs[1][0].logits, "single-stream logits")
    for g_ref, g_fused in zip(outs[0][1], outs[1][1]):
        check(g_ref, g_fused, "parameter gradient")

    # the tile summaries are built once per forward (not per layer), with the same results
    import flowtext.nn.transformer as tr
    from flowtext.kernels.visibility_attention import _api

    builds, build = [], _api.build_summaries
    _api.build_summaries = lambda *a: builds.append(1) or build(*a)
    per_forward, shared = [], tr.plan_attention
    for plan in (shared, lambda *a, **k: None):  # one plan per forward, then one per layer
        tr.plan_attention = plan
        builds.clear()
        fused.zero_grad()
        out = fused(z, t, o)
        out.logits.square().mean().backward()
        grads = [p.grad.clone() for p in fused.parameters() if p.grad is not None]
        per_forward.append((len(builds), out.logits, grads))
    tr.plan_attention = shared
    counts = [n for n, _, _ in per_forward]
    assert counts == [1, cfg["n_layers"]], counts
    assert torch.equal(per_forward[0][1], per_forward[1][1]), "logits differ"
    assert per_forward[0][2], "no gradients"
    assert all(torch.equal(a, c) for a, c in zip(per_forward[0][2], per_forward[1][2])), "grads"

    cache = fused.commit(fused.new_cache(b), z[:, :3], o[:, :3], torch.arange(3, device=dev))
    live = torch.arange(3, n, device=dev)
    cached = fused(z[:, 3:], t[:, 3:], o[:, 3:], positions=live, cache=cache)
    check(cached.logits, outs[0][0].logits[:, 3:], "cached logits")

    blocks = (torch.arange(n, device=dev) // 3).expand(b, n)
    t2, o2 = two_stream_layout(blocks, t.clamp_min(0.1))
    pos = torch.arange(n, device=dev).repeat(2)
    z2 = torch.cat([z, z], 1)
    check(ref(z2, t2, o2, positions=pos).logits, fused(z2, t2, o2, positions=pos).logits,
          "two-stream logits")
    print("OK")
    """
)


def _run_kernel_script(script: str, timeout: int) -> None:
    """Run ``script`` in a fresh interpreter (Triton's interpreter without CUDA); it prints OK."""
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_triton_backend_matches_sdpa():
    _run_kernel_script(SCRIPT, timeout=600)


COMPILED = textwrap.dedent(
    """
    import torch
    from flowtext.attention import LIVE
    from flowtext.nn import FlowTransformer, FlowTransformerConfig

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    cfg = dict(vocab_size=11, max_len=16, d_model=32, n_layers=2, n_heads=2, d_embed=8,
               cond_dim=16, cond_rank=4, attention_backend="triton")
    eager = FlowTransformer(FlowTransformerConfig(**cfg)).to(dev)
    with torch.no_grad():
        for p in eager.parameters():
            p.add_(0.2 * torch.randn_like(p))
    compiled = FlowTransformer(FlowTransformerConfig(**cfg, compile=True)).to(dev)
    compiled.load_state_dict(eager.state_dict())
    z = torch.randn(2, 12, 8, device=dev)
    t = torch.rand(2, 12, device=dev)
    t[:, :4] = 0.0
    o = torch.where(t == 0, torch.arange(12, device=dev), LIVE)
    losses = []
    for model in (eager, compiled):
        loss = model(z, t, o).logits.square().mean()
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 1e-5 * abs(losses[0]), losses
    for a, c in zip(eager.parameters(), compiled.parameters()):
        if a.grad is not None:
            assert (a.grad - c.grad).abs().max().item() < 1e-4
    print("OK")
    """
)


@pytest.mark.slow
def test_compiled_blocks_run_the_kernel_outside_the_graph():
    """``compile=True`` with the kernel: the same loss and gradients as eager (graph break)."""
    _run_kernel_script(COMPILED, timeout=900)
