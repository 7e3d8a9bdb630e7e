"""Exact resume: interrupted runs (also by SIGKILL) continue as if never stopped; atomic saves."""

import os
import signal
import subprocess
import sys
import time
import warnings

import lightning as L
import pytest
import torch

from flowtext.data import EpochSampler, FlowTextDataModule, ResumableLoader
from flowtext.training import AtomicCheckpointIO, cli_main, latest_checkpoint
from tests.test_training import ROOT, TINY

RESUME = [
    *TINY,
    "--data.train_samples_per_epoch=24",  # 6 batches per epoch: runs cross epoch boundaries
    "--checkpoint.every_n_train_steps=2",
]


class LossRecorder(L.Callback):
    def __init__(self):
        self.losses = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(outputs["loss"])


def configured(root, max_steps, config="evo-tiny.yaml", *extra):
    """The training CLI (not run) of ``config`` shrunk by ``RESUME``, writing under ``root``."""
    return cli_main(
        [
            "--config",
            str(ROOT / "experiments" / "configs" / config),
            f"--trainer.default_root_dir={root}",
            *RESUME,
            f"--trainer.max_steps={max_steps}",
            *extra,
        ],
        run=False,
    )


def run(root, max_steps, ckpt_path=None, config="evo-tiny.yaml", *extra):
    cli = configured(root, max_steps, config, *extra)
    rec = LossRecorder()
    cli.trainer.callbacks.append(rec)
    cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=ckpt_path)
    return cli, rec.losses


def weights(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("split", [4, 6], ids=["mid-epoch", "epoch-end"])
def test_straight_run_equals_interrupted_and_resumed_run(tmp_path, split):
    total = 8
    straight, losses = run(tmp_path / "a", total)
    run(tmp_path / "b", split)
    last = next((tmp_path / "b").rglob("last.ckpt"))
    assert torch.load(last, weights_only=False)["global_step"] == split
    with warnings.catch_warnings():
        warnings.simplefilter("error", category=UserWarning)
        warnings.filterwarnings("ignore", message=r"(?!.*not resumable)")
        resumed, resumed_losses = run(tmp_path / "b", total, str(last))
    assert resumed.trainer.global_step == total
    assert sorted(resumed_losses) == list(range(split + 1, total + 1))
    for step, loss in resumed_losses.items():  # bitwise: same data, noise and optimizer state
        assert loss == losses[step], (step, loss, losses[step])
    assert_same_weights(weights(straight.model), weights(resumed.model))


def test_loader_state_skips_what_was_consumed():
    dm = FlowTextDataModule("addition", seq_len=16, batch_size=2, train_samples_per_epoch=10)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader, ResumableLoader)
    it = iter(loader)
    seen = [next(it)["tokens"] for _ in range(2)]
    state = loader.state_dict()
    assert state == {"epoch": 0, "consumed": 4}
    rest = [b["tokens"] for b in it]
    fresh = FlowTextDataModule("addition", seq_len=16, batch_size=2, train_samples_per_epoch=10)
    fresh.setup("fit")
    again = fresh.train_dataloader()
    again.load_state_dict(state)
    resumed = [b["tokens"] for b in again]
    assert len(resumed) == len(rest) == 3
    assert all(torch.equal(x, y) for x, y in zip(resumed, rest))
    assert not any(torch.equal(x, y) for x in seen for y in resumed)
    # the next epoch is whole again
    assert len(list(again)) == 5


def test_sampler_resume_only_applies_to_its_epoch():
    s = EpochSampler(6)
    s.resume(epoch=2, consumed=4)
    s.set_epoch(2)
    assert list(s) == [16, 17]
    s.set_epoch(3)
    assert list(s) == list(range(18, 24))
    s.resume(epoch=1, consumed=3)
    s.set_epoch(2)  # Lightning moved on: the stale position is dropped
    assert list(s) == list(range(12, 18))


class Boom(RuntimeError):
    pass


def test_failed_save_leaves_last_checkpoint_intact(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, target)
    before = target.read_bytes()

    def half_then_crash(obj, f, *args, **kwargs):
        f.write(b"\x80\x02partial pickle")
        raise Boom("disk full")

    monkeypatch.setattr(torch, "save", half_then_crash)
    with pytest.raises(Boom):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, target)
    monkeypatch.undo()
    assert target.read_bytes() == before
    assert torch.load(target, weights_only=False)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"], "temporary file left behind"


def test_training_uses_the_atomic_writer(tmp_path):
    cli = configured(tmp_path, 1, "ar-tiny.yaml")
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    every = [c for c in cli.trainer.callbacks if getattr(c, "_every_n_train_steps", 0) == 2]
    assert len(every) == 1 and every[0].save_last


def _ckpt_step(path):
    try:
        return torch.load(path, weights_only=False)["global_step"]
    except Exception:  # being replaced right now: try again
        return None


@pytest.mark.slow
def test_sigkill_then_resume_matches_straight_run(tmp_path):
    args = [
        sys.executable,
        "-m",
        "flowtext.cli",
        "fit",
        "--config",
        str(ROOT / "experiments" / "configs" / "ar-tiny.yaml"),
        f"--trainer.default_root_dir={tmp_path / 'killed'}",
        *RESUME,
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        [*args, "--trainer.max_steps=100000"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        step = None
        while time.monotonic() < deadline:
            lasts = list((tmp_path / "killed").rglob("last.ckpt"))
            if lasts and (step := _ckpt_step(lasts[0])) is not None and step >= 4:
                break
            assert proc.poll() is None, "training died on its own"
            time.sleep(0.05)
        else:
            pytest.fail("no checkpoint within 120 s")
        time.sleep(0.3)  # die anywhere, possibly in the middle of writing a checkpoint
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    last = next((tmp_path / "killed").rglob("last.ckpt"))
    step = torch.load(last, weights_only=False)["global_step"]  # intact, whatever the timing
    total = step + 4
    done = subprocess.run(
        [*args, f"--trainer.max_steps={total}", "--ckpt_path=last"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    newest = latest_checkpoint(tmp_path / "killed")
    assert newest != last, "the resumed run writes into a new version folder"
    resumed = torch.load(newest, weights_only=False)
    assert resumed["global_step"] == total
    straight, _ = run(tmp_path / "straight", total, None, "ar-tiny.yaml")
    assert_same_weights(weights(straight.model), resumed["state_dict"])
