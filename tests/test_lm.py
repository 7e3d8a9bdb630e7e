"""The Lightning modules: one code path, three configurations, regimes validated."""

import inspect

import pytest
import torch

import flowtext
from flowtext.errors import ConfigError
from flowtext.lm import FlowLM
from flowtext.nn import FlowTransformerConfig

TINY = dict(
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


@pytest.mark.parametrize("cls", [flowtext.Evo, flowtext.AutoregressiveLM, flowtext.DiffusionLM])
def test_special_cases_are_configurations_of_one_module(cls):
    assert issubclass(cls, FlowLM)
    own = {k for k, v in vars(cls).items() if callable(v) and not k.startswith("__")}
    assert own == set(), f"{cls.__name__} must only change defaults, but defines {own}"
    assert set(inspect.signature(cls).parameters) - {"kwargs"} <= set(
        inspect.signature(FlowLM).parameters
    )


@pytest.mark.parametrize("cls", [flowtext.Evo, flowtext.AutoregressiveLM, flowtext.DiffusionLM])
def test_training_and_validation_steps_run(cls):
    torch.manual_seed(0)
    model = cls(net=FlowTransformerConfig(**TINY), val_block_size=4, val_steps_per_block=4)
    tokens = torch.randint(0, 13, (3, 12))
    for _ in range(8):  # several draws of the regime mixture
        loss, logs = model.training_loss(tokens)
        assert torch.isfinite(loss) and loss.ndim == 0
        loss.backward()
    trained = [
        (n, p)
        for n, p in model.net.named_parameters()
        if model.difficulty_weight > 0 or not n.startswith("difficulty_head")
    ]
    assert all(p.grad is not None for _, p in trained), [n for n, p in trained if p.grad is None]
    logged = {}
    model.log = lambda name, value, **kw: logged.__setitem__(name, value)
    model.validation_step({"tokens": tokens}, 0)
    assert set(logged) == {"val/bpb_ar", "val/bpb_block4", "val/bpb_sync"}
    assert all(torch.isfinite(v) and v > 0 for v in logged.values())


def test_ar_module_trains_exactly_the_ar_likelihood():
    """With block size 1 and one jump the training ELBO is the teacher-forced NLL."""
    from flowtext.objectives import two_stream_loss

    torch.manual_seed(0)
    model = flowtext.AutoregressiveLM(net=FlowTransformerConfig(**TINY)).double()
    tokens = torch.randint(0, 13, (2, 9))
    loss, _ = model.training_loss(tokens)
    ref = two_stream_loss(model.net, tokens, model.schedule, block_size=1).nats.mean()
    torch.testing.assert_close(loss, ref)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(train_block_sizes=(4,), steps_per_block=1), "steps_per_block"),
        (dict(single_stream_fraction=1.5), "single_stream_fraction"),
        (dict(train_block_sizes=(), single_stream_fraction=0.0), "train_block_sizes"),
        (dict(train_block_sizes=(-2,)), ">= 0"),
        (dict(t_min=1.0, steps_per_block=4, train_block_sizes=(4,)), "t_min"),
        (dict(schedule="cosinus"), "valid names"),
    ],
)
def test_incompatible_configs_fail_with_a_clear_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        FlowLM(net=FlowTransformerConfig(**TINY), **kwargs)


def test_checkpoint_hparams_rebuild_the_module():
    model = flowtext.Evo(net=FlowTransformerConfig(**TINY))
    again = type(model)(**{k: v for k, v in model.hparams.items()})
    assert again.net.config == model.net.config
