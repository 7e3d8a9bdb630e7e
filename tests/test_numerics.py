"""Mixed precision through Lightning's plugins, NaN/Inf detection, and the deterministic mode."""

import pytest
import torch

from flowtext.errors import NonFiniteError
from flowtext.sample import sample_main
from flowtext.training import latest_checkpoint
from tests.test_resume import configured, run


def test_bf16_mixed_precision_trains_on_cpu(tmp_path):
    cli, losses = run(tmp_path, 3, None, "evo-tiny.yaml", "--trainer.precision=bf16-mixed")
    assert cli.trainer.precision == "bf16-mixed"
    assert sorted(losses) == [1, 2, 3] and all(
        map(torch.isfinite, map(torch.tensor, losses.values()))
    )
    assert all(p.dtype == torch.float32 for p in cli.model.parameters())  # fp32 master weights
    for name in ("val/bpb_ar", "val/bpb_sync"):
        assert torch.isfinite(cli.trainer.callback_metrics[name])


def _fit_with(tmp_path, poison):
    """Train 4 steps (checkpoint every 2) with ``poison(model)`` applied to the model."""
    cli = configured(tmp_path, 4, "ar-tiny.yaml")
    poison(cli.model)
    with pytest.raises(NonFiniteError) as info:
        cli.trainer.fit(cli.model, cli.datamodule)
    return cli, str(info.value)


def _assert_last_checkpoint_good(tmp_path, step):
    last = latest_checkpoint(tmp_path)
    state = torch.load(last, weights_only=False)
    assert state["global_step"] == step
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values())
    cli, losses = run(tmp_path / "resumed", step + 1, str(last), "ar-tiny.yaml")
    assert cli.trainer.global_step == step + 1 and all(map(float.__abs__, losses.values()))


def test_nan_loss_names_step_and_batch_and_keeps_the_checkpoint(tmp_path):
    def poison(model):
        original = model.training_loss

        def nan_at_step_3(tokens, **kw):
            loss, logs = original(tokens, **kw)
            return (loss * float("nan") if model.global_step == 2 else loss), logs

        model.training_loss = nan_at_step_3

    _, message = _fit_with(tmp_path, poison)
    assert "loss" in message and "global step 2" in message and "batch 2" in message
    assert "learning rate" in message  # names a fix
    _assert_last_checkpoint_good(tmp_path, 2)


def test_inf_gradient_is_caught_before_the_weights_change(tmp_path):
    def poison(model):
        def on_after_backward():
            if model.global_step == 2:
                next(model.parameters()).grad.view(-1)[0] = float("inf")

        model.on_after_backward = on_after_backward

    cli, message = _fit_with(tmp_path, poison)
    assert "gradient of net." in message and "global step 2" in message
    assert all(torch.isfinite(p).all() for p in cli.model.parameters())
    _assert_last_checkpoint_good(tmp_path, 2)


def test_deterministic_mode_training_is_bit_reproducible(tmp_path):
    flag = "--trainer.deterministic=true"
    a, losses_a = run(tmp_path / "a", 3, None, "evo-tiny.yaml", flag)
    b, losses_b = run(tmp_path / "b", 3, None, "evo-tiny.yaml", flag)
    assert losses_a == losses_b
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), name


def test_deterministic_mode_sampling_is_bit_reproducible(tmp_path, capsys):
    run(tmp_path, 2, None, "ar-tiny.yaml")
    ckpt = str(latest_checkpoint(tmp_path))
    capsys.readouterr()
    outputs = []
    for _ in range(2):
        argv = ["--ckpt", ckpt, "--policy", "block", "--policy-arg", "size=4", "--length", "12"]
        assert sample_main([*argv, "--seed", "3", "--deterministic"]) == 0
        out = capsys.readouterr().out
        outputs.append(out.split("statistic")[0])  # the samples, not the timings
    assert outputs[0] == outputs[1]
    assert not torch.are_deterministic_algorithms_enabled()  # the flag does not leak
