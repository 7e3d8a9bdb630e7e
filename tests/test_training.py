"""The training CLI end to end on a tiny budget: fit, logs, checkpoints, resume, errors."""

from pathlib import Path

import pytest
import torch

from flowtext.data import tokenizer_from_state
from flowtext.errors import ConfigError
from flowtext.training import TINY_OVERRIDES, cli_main

ROOT = Path(__file__).resolve().parents[1]

TINY = [*TINY_OVERRIDES, "--trainer.val_check_interval=2"]


def fit(config, tmp_path, *extra):
    return cli_main(
        [
            "fit",
            "--config",
            str(ROOT / "experiments" / "configs" / config),
            f"--trainer.default_root_dir={tmp_path}",
            *TINY,
            *extra,
        ]
    )


@pytest.mark.parametrize("config", ["evo-tiny.yaml", "ar-tiny.yaml", "diffusion-tiny.yaml"])
def test_fit_writes_logs_checkpoints_and_validation_bpb(config, tmp_path):
    cli = fit(config, tmp_path, "--trainer.max_steps=4")
    metrics = cli.trainer.callback_metrics
    trained = {  # ar (the checkpoint monitor) and the policies each regime trains on
        "evo-tiny.yaml": ("ar", "block4", "sync"),
        "ar-tiny.yaml": ("ar",),
        "diffusion-tiny.yaml": ("ar", "sync"),
    }[config]
    assert {k for k in metrics if k.startswith("val/bpb_")} == {f"val/bpb_{n}" for n in trained}
    for name in trained:
        value = metrics[f"val/bpb_{name}"]
        assert torch.isfinite(value) and value > 0
    ckpts = list(tmp_path.rglob("last.ckpt"))
    assert ckpts, "no last.ckpt"
    assert list(tmp_path.rglob("events.out.tfevents*")), "no TensorBoard log"
    state = torch.load(ckpts[0], map_location="cpu", weights_only=False)
    tok = tokenizer_from_state(state["flowtext_tokenizer"])
    assert tok.vocab_size == cli.model.net.config.vocab_size


def test_resume_from_last_checkpoint_continues_the_step_count(tmp_path):
    fit("ar-tiny.yaml", tmp_path, "--trainer.max_steps=3")
    last = next(tmp_path.rglob("last.ckpt"))
    cli = fit("ar-tiny.yaml", tmp_path, "--trainer.max_steps=5", f"--ckpt_path={last}")
    assert cli.trainer.global_step == 5


def test_sequence_longer_than_context_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="max_len"):
        fit("ar-tiny.yaml", tmp_path, "--trainer.max_steps=1", "--data.seq_len=64")


def test_main_job_runs_end_to_end_on_a_tiny_budget(tmp_path):
    from flowtext.run import run_main

    code = run_main(["--out", str(tmp_path), "--trainer.max_steps=2", *TINY])
    assert code == 0
    for name in (
        "summary.md",
        "toy/time_grids.png",
        "toy/convergence.png",
        "decode/policies.png",
        "decode/maturity_adaptive.png",
        "decode/maturity_speculative.png",
    ):
        assert (tmp_path / name).is_file(), name
    summary = (tmp_path / "summary.md").read_text()
    assert "| ar |" in summary and "| adaptive |" in summary
