"""Distributed training with Lightning's DDP on 2 CPU processes (gloo), and the sampler's sharding.

``W`` ranks with per-rank batch ``b`` see exactly the batches, regimes and noise of one process
with batch ``b`` and ``accumulate_grad_batches = W``; the weights must agree up to float
summation order.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from torch.utils.data import DistributedSampler

from flowtext.data import EpochSampler, FlowTextDataModule
from flowtext.training import latest_checkpoint
from tests.test_resume import RESUME, run
from tests.test_training import ROOT


class MetricDump(L.Callback):
    """Writes the logged training loss of every batch to ``{path}.rank{r}.json``."""

    def __init__(self, path: str):
        self.path = path
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(trainer.callback_metrics["loss"]))

    def on_train_end(self, trainer, pl_module):
        Path(f"{self.path}.rank{trainer.global_rank}.json").write_text(json.dumps(self.losses))


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("batch", [1, 4])
def test_shards_are_disjoint_and_interleave_by_batch(world, batch):
    n = 50
    shards = [list(EpochSampler(n, batch, world, r)) for r in range(world)]
    flat = [i for s in shards for i in s]
    assert len(flat) == len(set(flat)), "an index is seen twice"
    assert all(len(s) == len(shards[0]) for s in shards), "ranks must take the same steps"
    assert n - len(flat) < batch * world, "more than the tail was dropped"
    # step k of all ranks together is the k-th global batch of one process with batch*world
    steps = len(shards[0]) // batch
    single = list(EpochSampler(n))
    for k in range(steps):
        together = [i for s in shards for i in s[k * batch : (k + 1) * batch]]
        assert sorted(together) == single[k * batch * world : (k + 1) * batch * world]


def test_sampler_is_not_wrapped_again_and_resumes_per_rank():
    s = EpochSampler(40, batch_size=2, num_replicas=2, rank=1)
    assert isinstance(s, DistributedSampler)  # Lightning leaves DistributedSamplers alone
    full = list(s)
    s.resume(epoch=0, consumed=8)  # two global steps of 2 ranks x 2 items
    assert list(s) == full[4:]


def test_a_plain_epoch_sampler_under_lightnings_wrapper_has_no_duplicates():
    shards = [
        list(DistributedSamplerWrapper(EpochSampler(30), num_replicas=2, rank=r, shuffle=False))
        for r in range(2)
    ]
    assert not set(shards[0]) & set(shards[1])
    assert set(shards[0]) | set(shards[1]) == set(range(30))


def test_datamodule_shards_by_trainer_rank():
    class FakeTrainer:
        world_size, global_rank = 2, 1

    dm = FlowTextDataModule("addition", seq_len=16, batch_size=2, train_samples_per_epoch=8)
    dm.trainer = FakeTrainer()
    dm.setup("fit")
    sampler = dm.train_dataloader().sampler
    assert (sampler.num_replicas, sampler.rank, sampler.batch_size) == (2, 1, 2)
    assert list(sampler) == [2, 3, 6, 7]


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_equals_one_process_with_accumulation(tmp_path):
    """2 gloo ranks x batch 2 == 1 process x batch 2 x accumulate 2: weights and logged loss."""
    steps = 4
    common = ["--data.batch_size=2", "--checkpoint.every_n_train_steps=2"]
    dump = tmp_path / "ddp_losses"
    _ddp_fit(
        tmp_path,
        tmp_path / "ddp",
        steps,
        *common,
        "--trainer.callbacks+=tests.test_distributed.MetricDump",
        f"--trainer.callbacks.path={dump}",
    )
    ddp = torch.load(latest_checkpoint(tmp_path / "ddp"), weights_only=False)
    assert ddp["global_step"] == steps

    single_dump = tmp_path / "single_losses"
    cli, _ = run(
        tmp_path / "single",
        steps,
        None,
        "evo-tiny.yaml",
        *common,
        "--trainer.accumulate_grad_batches=2",
        "--trainer.callbacks+=tests.test_distributed.MetricDump",
        f"--trainer.callbacks.path={single_dump}",
    )
    for name, value in cli.model.state_dict().items():
        torch.testing.assert_close(ddp["state_dict"][name], value, rtol=1e-5, atol=1e-6)
    # the loss logged under DDP is reduced over ranks: the mean of the two micro-batches
    rank0 = json.loads(Path(f"{dump}.rank0.json").read_text())
    rank1 = json.loads(Path(f"{dump}.rank1.json").read_text())
    micro = json.loads(Path(f"{single_dump}.rank0.json").read_text())
    assert rank0 == pytest.approx(rank1, rel=1e-6)
    pairs = [(micro[2 * k] + micro[2 * k + 1]) / 2 for k in range(steps)]
    assert rank0 == pytest.approx(pairs, rel=1e-4)


def _ddp_fit(tmp_path, root, steps, *extra):
    cmd = [
        sys.executable,
        "-m",
        "flowtext.cli",
        "fit",
        "--config",
        str(ROOT / "experiments" / "configs" / "evo-tiny.yaml"),
        f"--trainer.default_root_dir={root}",
        *RESUME,
        f"--trainer.max_steps={steps}",
        "--trainer.strategy=ddp",
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        *extra,
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.mark.slow
def test_two_ranks_resumed_on_one_device_with_accumulation_is_exact(tmp_path):
    """A 2-rank checkpoint resumed on 1 device x accumulate 2 == 1 device x accumulate 2 throughout.

    The noise of a batch is keyed by the global index of its first sample (carried by the
    batch), not by the rank layout, and the loader's position counts samples over all ranks.
    """
    common = ["--data.batch_size=2", "--checkpoint.every_n_train_steps=2"]
    _ddp_fit(tmp_path, tmp_path / "ddp", 2, *common)
    ckpt = latest_checkpoint(tmp_path / "ddp")
    assert torch.load(ckpt, weights_only=True)["global_step"] == 2
    accumulate = "--trainer.accumulate_grad_batches=2"
    resumed, _ = run(tmp_path / "ddp", 4, str(ckpt), "evo-tiny.yaml", *common, accumulate)
    straight, _ = run(tmp_path / "single", 4, None, "evo-tiny.yaml", *common, accumulate)
    assert resumed.trainer.global_step == straight.trainer.global_step == 4
    for name, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=1e-5, atol=1e-6)
