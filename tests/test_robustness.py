"""Careless and hostile use of the command line: every failure is one line and exit code 2.

Each test here stands for a case of issue 16 (corrupt or mismatched checkpoints, runs that share
a folder, SIGTERM, full disks, overrides on resume, bad prompts and outputs, resource bounds)
and names what a user now sees.
"""

import errno
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from flowtext.callbacks import ProgressBar, SampleCallback
from flowtext.checkpoint import read_checkpoint
from flowtext.cli import main
from flowtext.training import (
    claim_version,
    cli_main,
    latest_checkpoint,
    remove_orphaned_temporaries,
)
from tests.test_resume import RESUME
from tests.test_training import ROOT

AR = str(ROOT / "experiments" / "configs" / "ar-tiny.yaml")


def fit_argv(root, *extra, steps=2):
    return [
        "fit",
        "--config",
        AR,
        f"--trainer.default_root_dir={root}",
        *RESUME,
        f"--trainer.max_steps={steps}",
        *extra,
    ]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step ar-tiny run (checkpoint at step 2), shared by the checkpoint tests."""
    root = tmp_path_factory.mktemp("trained")
    assert main(fit_argv(root)) == 0
    return root, latest_checkpoint(root)


# ------------------------------------------------------------------ 2. overrides on resume
class NaNWhileLRAbove(L.Callback):
    """Makes the loss NaN from step 2 on while the optimizer's base learning rate is > 1e-3."""

    def on_fit_start(self, trainer, pl_module):
        original = pl_module.training_loss

        def poisoned(tokens, **kw):
            loss, logs = original(tokens, **kw)
            group = trainer.optimizers[0].param_groups[0]
            if trainer.global_step >= 2 and group.get("initial_lr", group["lr"]) > 1e-3:
                loss = loss * float("nan")
            return loss, logs

        pl_module.training_loss = poisoned


def test_the_documented_nan_remedy_works_a_lower_lr_on_resume_wins(tmp_path, capsys):
    poison = "--trainer.callbacks+=tests.test_robustness.NaNWhileLRAbove"
    assert main(fit_argv(tmp_path, poison, steps=6)) == 2  # lr 0.002 from the config
    assert "non-finite training loss nan at global step 2" in one_error_line(capsys)
    # docs/scale.md, "NaN and Inf": resume from last.ckpt with a lower learning rate
    lower = "--model.init_args.optimizer.init_args.lr=0.0005"
    assert main(fit_argv(tmp_path, poison, "--ckpt_path=last", lower, steps=4)) == 0
    state = read_checkpoint(latest_checkpoint(tmp_path))
    assert state["global_step"] == 4
    group = state["optimizer_states"][0]["param_groups"][0]
    assert group["initial_lr"] == 0.0005
    assert state["lr_schedulers"][0]["base_lrs"] == [0.0005]
    warm = 100  # ar-tiny's warm-up: the schedule's factor is kept, only the base rate changes
    assert group["lr"] == pytest.approx(0.0005 * 5 / warm)


# ------------------------------------------------------------ 3. runs sharing a root folder
def test_two_runs_into_one_root_claim_different_versions_and_keep_both(tmp_path):
    # both runs settle their version before either writes anything: the race of two fits
    # started at once (Lightning listed the folders and both took version_0)
    a = cli_main(fit_argv(tmp_path)[1:], run=False)
    b = cli_main(fit_argv(tmp_path)[1:], run=False)
    assert {a.trainer.logger.version, b.trainer.logger.version} == {0, 1}
    for cli in (a, b):
        cli.trainer.fit(cli.model, cli.datamodule)
    lasts = sorted(tmp_path.rglob("last.ckpt"))
    assert [p.parent.parent.name for p in lasts] == ["version_0", "version_1"]


def test_version_claims_are_atomic_under_threads(tmp_path):
    got = []
    threads = [
        threading.Thread(target=lambda: got.append(claim_version(tmp_path))) for _ in range(16)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert sorted(got) == list(range(16))


# ------------------------------------------------------------- 4. seeds given on their own
@pytest.mark.parametrize("flag", ["--data.seed=5", "--model.init_args.seed=1"])
def test_a_data_or_model_seed_alone_trains(tmp_path, flag, capsys):
    assert main(fit_argv(tmp_path, flag, "--trainer.limit_val_batches=0", steps=1)) == 0


# ---------------------------------------------------------------------------- 5. SIGTERM
class StepFile(L.Callback):
    """Writes the global step to ``path`` after every batch (to time a signal)."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, *args):
        Path(self.path).write_text(str(trainer.global_step))


def test_sigterm_saves_last_checkpoint_and_exits_143(tmp_path):
    steps = tmp_path / "step"
    cmd = [sys.executable, "-m", "flowtext.cli"] + fit_argv(
        tmp_path / "run",
        "--trainer.limit_val_batches=0",
        "--checkpoint.every_n_train_steps=100000",  # only the SIGTERM save writes last.ckpt
        "--trainer.callbacks+=tests.test_robustness.StepFile",
        f"--trainer.callbacks.path={steps}",
        steps=100000,
    )
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while not (steps.is_file() and steps.read_text().strip() not in ("", "0", "1", "2")):
            assert proc.poll() is None and time.monotonic() < deadline, "no training progress"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("error: stopped by SIGTERM"), err[-3000:]
    last = latest_checkpoint(tmp_path / "run")
    assert last is not None, "nothing saved on SIGTERM"
    assert read_checkpoint(last)["global_step"] >= 3


# ------------------------------------------------------------------ 7. raw tracebacks
@pytest.mark.parametrize("kind", ["empty", "truncated", "random"])
def test_fit_from_a_corrupt_checkpoint_is_one_line(tmp_path, trained, kind, capsys):
    good = trained[1].read_bytes()
    data = {"empty": b"", "truncated": good[: len(good) // 2], "random": os.urandom(4096)}[kind]
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(data)
    assert main(fit_argv(tmp_path / "run", f"--ckpt_path={bad}", steps=3)) == 2
    line = one_error_line(capsys)
    assert "CheckpointError" in line and str(bad) in line
    assert ("empty" if kind == "empty" else "corrupt") in line


@pytest.mark.parametrize("how", ["file", "last"])
def test_resume_into_another_model_size_is_refused(tmp_path, trained, how, capsys):
    root, ckpt = trained
    path = str(ckpt) if how == "file" else "last"
    bigger = "--model.init_args.net.d_model=64"
    assert main(fit_argv(root, f"--ckpt_path={path}", bigger, steps=3)) == 2
    line = one_error_line(capsys)
    assert "net.d_model=32, but this run configures net.d_model=64" in line


def test_full_disk_is_one_line_and_the_last_checkpoint_survives(tmp_path, monkeypatch, capsys):
    import flowtext.training as training

    real, calls = torch.save, []

    def save_once_then_disk_full(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            f.write(b"\x80partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(training.torch, "save", save_once_then_disk_full)
    assert main(fit_argv(tmp_path, steps=6)) == 2
    line = one_error_line(capsys)
    assert "No space left on device" in line
    monkeypatch.undo()
    last = latest_checkpoint(tmp_path)
    assert f"the last good checkpoint {last} is intact" in line
    assert read_checkpoint(last)["global_step"] == 2
    assert not list(tmp_path.rglob("*.tmp")), "temporary file left behind"


def test_run_with_a_missing_corpus_is_one_line_before_any_work(tmp_path, capsys):
    from flowtext.run import run_main

    code = run_main(["--out", str(tmp_path), "--data.corpus=/no/such/corpus", *RESUME])
    assert code == 2
    line = one_error_line(capsys)
    assert "/no/such/corpus" in line and "does not exist" in line
    assert not (tmp_path / "toy").exists(), "the toy demo ran before the config was checked"


def test_run_with_a_prompt_longer_than_the_context_fails_before_training(tmp_path, capsys):
    from flowtext.run import run_main

    code = run_main(["--out", str(tmp_path), "--prompt", "x" * 40, *RESUME])
    assert code == 2
    line = one_error_line(capsys)
    assert "--prompt is 40 tokens" in line and "at most 31 tokens" in line
    assert not list(tmp_path.rglob("*.ckpt")), "trained before checking the prompt"


# --------------------------------------------------------------------------- 9. small ones
def test_orphaned_temporary_checkpoint_files_are_removed_on_resume(tmp_path, trained, capsys):
    root, _ = trained
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = latest_checkpoint(root).parent
    orphan = folder / f".last.ckpt.{dead.pid}.tmp"
    live = folder / f".last.ckpt.{os.getppid()}.tmp"  # a live process: another run writing
    orphan.write_bytes(b"partial")
    live.write_bytes(b"partial")
    assert remove_orphaned_temporaries(root) == [orphan]
    assert live.exists() and not orphan.exists()
    live.unlink()


def test_run_log_has_no_warnings_a_user_cannot_act_on(tmp_path, capfd):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli_main(fit_argv(tmp_path, "--trainer.limit_val_batches=0", steps=1))
    out, err = capfd.readouterr()
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "args parameter" in m or "deprecated" in m.lower()], messages
    assert "Tip" not in out + err


def test_progress_bar_reads_epoch_n_without_an_epoch_limit():
    class Trainer:
        max_epochs = -1

    bar = ProgressBar()
    bar._trainer = Trainer()
    assert bar._get_train_description(0).strip() == "Epoch 0"
    Trainer.max_epochs = 3
    assert bar._get_train_description(1).strip() == "Epoch 1/2"


def test_validation_panel_shows_every_score_and_no_markup(tmp_path):
    cli = cli_main(fit_argv(tmp_path, steps=2)[1:], run=False)
    cb = next(c for c in cli.trainer.callbacks if isinstance(c, SampleCallback))
    cb.prompt = "[bold]x"
    cb.console = type(cb.console)(width=60, record=True, force_terminal=False)
    cli.trainer.fit(cli.model, cli.datamodule)
    text = cb.console.export_text()
    scores = [k.split("/")[-1] for k in cli.trainer.callback_metrics if k.startswith("val/")]
    flat = "".join(text.split())
    for name in scores:
        assert f"{name}=" in flat, text
    assert "[bold]x" in text  # printed as text, not read as markup


def test_block_policy_refuses_a_boolean_size():
    from flowtext import policies
    from flowtext.errors import ConfigError

    with pytest.raises(ConfigError, match="size"):
        policies.get("block", size=True)


# ----------------------------------------------------------------- the sample command line
def sample(capsys, ckpt, *args):
    from flowtext.sample import sample_main

    code = sample_main(["--ckpt", str(ckpt), "--length", "4", *args])
    return code, capsys.readouterr()


def test_sample_prints_the_prompt_as_text_not_markup(trained, capsys):
    code, out = sample(capsys, trained[1], "--prompt", "x", "--policy", "autoregressive")
    assert code == 0
    assert "[bold]" not in out.out and "[/bold]" not in out.out


def test_sample_takes_a_non_utf8_prompt_as_raw_bytes(trained, capsys):
    prompt = b"caf\xe9".decode("utf-8", errors="surrogateescape")  # as Python passes argv
    code, out = sample(capsys, trained[1], "--prompt", prompt, "--policy", "autoregressive")
    assert code == 0, out.err
    assert "caf\ufffd" in out.out


def test_sample_refuses_an_unwritable_heatmap_before_decoding(trained, tmp_path, capsys):
    target = tmp_path / "no" / "such" / "dir" / "m.png"
    code, out = sample(capsys, trained[1], "--heatmap", str(target))
    assert code == 2
    assert out.out == "", "decoded before checking the output path"
    assert f"cannot write --heatmap {target}" in one_error_line_of(out.err)


def test_sample_refuses_a_prompt_that_fills_the_context(trained, capsys):
    code, out = sample(capsys, trained[1], "--prompt", "x" * 32)
    assert code == 2
    line = one_error_line_of(out.err)
    assert "--prompt is 32 tokens" in line and "at most 31 prompt tokens" in line
    assert "length <= 0" not in line


@pytest.mark.parametrize(
    "args", [["--steps", "100000000", "--policy", "synchronous"], ["--batch", "10000000"]]
)
def test_sample_refuses_decodes_beyond_memory_before_allocating(trained, capsys, args):
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code, out = sample(capsys, trained[1], *args, "--max-memory", "1")
    assert code == 2
    line = one_error_line_of(out.err)
    assert "GB" in line and "limit is 1.0 GB (--max-memory 1)" in line
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 500, f"allocated {grown_mb:.0f} MB before refusing"


def test_sample_shows_its_memory_estimate(trained, capsys):
    code, out = sample(capsys, trained[1], "--policy", "autoregressive")
    assert code == 0 and "memory estimate (MB)" in out.out


def test_sample_from_a_directory_names_the_checkpoint_inside(trained, capsys):
    code, out = sample(capsys, trained[0])
    assert code == 2
    line = one_error_line_of(out.err)
    assert "is a directory" in line and "last.ckpt" in line


def one_error_line_of(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]
