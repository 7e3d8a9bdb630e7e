"""The tiny test networks, in one place (every test module sizes its nets from here)."""

import math

import torch

from flowtext.nn import FlowTransformer, FlowTransformerConfig

BASE = dict(
    vocab_size=13,
    max_len=16,
    d_model=32,
    n_layers=2,
    n_heads=2,
    d_embed=8,
    cond_dim=16,
    cond_rank=4,
    attention_backend="sdpa",
)


def tiny(**overrides) -> dict:
    """Keyword arguments of a tiny :class:`FlowTransformerConfig`, with ``overrides``."""
    return {**BASE, **overrides}


def perturbed_net(seed: int = 0, scale: float = 0.2, **overrides) -> FlowTransformer:
    """A float64 tiny network in eval mode whose weights are moved off their initialization.

    Zero-initialized adaLN gates would otherwise hide bugs in the time conditioning.
    """
    torch.manual_seed(seed)
    net = FlowTransformer(FlowTransformerConfig(**tiny(**overrides))).double().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn_like(p))
    return net


def validate_and_decode(model, tokens: torch.Tensor, **generate_kwargs):
    """Run one validation step of a ``FlowLM`` (every logged score finite), then decode.

    Returns the result of ``model.generate(batch_size=2, length=6, steps=4,
    solver="ancestral-mixture", **generate_kwargs)``, whose rows are checked to be 6 long.
    """
    model.on_validation_start()
    logged: dict[str, float] = {}
    model.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    with torch.no_grad():
        model.validation_step({"tokens": tokens}, 0)
    assert logged and all(math.isfinite(v) for v in logged.values()), logged
    res = model.generate(batch_size=2, length=6, steps=4, solver="ancestral-mixture",
                         **generate_kwargs)  # fmt: skip
    assert all(len(row) == 6 for row in res.tokens)
    return res
